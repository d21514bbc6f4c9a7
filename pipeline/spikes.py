"""What a spike is: one definition for the spike guard (during training), ``diagnose`` and ``sweep`` (after).

A language-model loss falls fast and then slowly, and its step-to-step noise is a few per cent of it; a ratio to
the running mean is the wrong yardstick there (3.0 -> 5.5 is "only" 1.83x). The ``robust`` rule measures how far a
step is above its recent level in units of its recent spread:

- **loss**: against the last ``window`` accepted losses of the same stage (a stage switch changes the loss level,
  so the history restarts there), judged once it holds ``MIN_HISTORY`` of them. ``centre`` is their median and
  ``spread`` 1.4826 x their median absolute deviation (the standard deviation for Gaussian noise), but at least
  ``SPREAD_FLOOR`` (1 %) of the centre, so a flat stretch does not make a 1 % wobble a spike. A loss above
  ``centre + loss_spread x spread`` (6 by default) is a spike;
- **gradient norm**: against the median of the last ``window`` accepted norms, across stages (a stage switch moves
  the norm by 2-3x, a blow-up by 10x or more); above ``grad_norm_factor`` (10) times that median is a spike;
- a non-finite loss or norm is always one;
- a gradient norm flagged after ``new_level_after`` (3) gradient-norm spikes in a row is a **new level**: still
  reported, but the norm history restarts at it (judged against it from the next step). Flagged steps never enter
  the history, so without this a lasting change of the norm (a model moved into a region of larger gradients, which
  skipping its updates cannot move it out of) would be judged against the old level for ever: on an H200, GPT-2
  124M runs whose gradient norm went from 2 to 25-90 in their first 15 steps (loss 6.8 -> 7.9) were skipped step
  after step until the guard stopped them. The norm changes level for good reasons (stage switches, early
  training) and clipping bounds the update whatever it is; a loss that stays high is what divergence looks like, so
  loss spikes never start a new level.

On the cases that ratio missed (``tests/test_spikes.py``): 3.0 -> 5.5 with +-0.05 of noise is 82 spreads; a loss
jump 3.9 -> 7.4 is 89, with its gradient norm 1 -> 21 (21x); the tiny test model after a 10x LR event, loss 5.4 ->
7.65 at the second step of a stage (gradient norm 0.8 -> 18), is caught by its gradient norm, the loss history of
the new stage being too short. Normal runs of the shipped recipes stay under 4 spreads and 3x (tiny-cpu on a CPU:
3.3 and 2.3x; the shortened gpt2-124m-curriculum on an H200: 1.7 and 1.9x). A 10x LR event on tiny-cpu itself
raises the loss 7-10 % for a few steps, within that model's noise (at most 5.7 spreads): no rule flags it.

The ``ratio`` rule is the earlier one, kept as an option: the loss above ``loss_factor`` x the mean of the last
``window`` accepted losses of the stage (judged once it holds ``window``), the norm above ``grad_norm_factor`` x the
mean of the stage's last ``window`` norms. Pure Python, no torch.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Optional

MIN_HISTORY = 10
"""Accepted values the robust rule needs before it judges (or the whole window, when it is shorter)."""
SPREAD_FLOOR = 0.01
"""The robust loss spread is at least this share of the centre."""
MAD_TO_SD = 1.4826
"""Median absolute deviation x this = standard deviation, for Gaussian noise."""

Method = Literal["robust", "ratio"]


@dataclass(frozen=True)
class SpikeRule:
    """The thresholds (from ``guard`` in the run config, or from ``diagnose``'s arguments)."""

    method: Method = "robust"
    window: int = 20
    loss_spread: float = 6.0
    loss_factor: float = 2.0
    grad_norm_factor: float = 10.0
    new_level_after: int = 3

    @classmethod
    def of(cls, config: Any) -> "SpikeRule":
        """The rule of a ``GuardConfig``."""
        return cls(config.method, config.window, config.loss_spread, config.loss_factor, config.grad_norm_factor,
                   config.new_level_after)

    @property
    def history(self) -> int:
        """Accepted values a history must hold before the next one is judged: the whole window for ``ratio``,
        ``MIN_HISTORY`` (or the window, when shorter) for ``robust``. A stage's first ``history`` losses are never
        judged (only a non-finite one is a spike there)."""
        return self.window if self.method == "ratio" else min(MIN_HISTORY, self.window)


@dataclass(frozen=True)
class Spike:
    reason: str
    """``non_finite_loss``, ``loss_spike``, ``non_finite_grad_norm`` or ``grad_norm_spike``."""
    value: float
    running_average: Optional[float]
    """What the value was judged against: the history's median (robust) or mean (ratio); None without history."""
    spreads: Optional[float] = None
    """Robust loss spikes: how many spreads above the centre."""

    @property
    def non_finite(self) -> bool:
        return self.reason.startswith("non_finite")


class SpikeDetector:
    """Online: ``check_loss`` / ``check_grad_norm`` judge a step against the history of accepted ones, ``accept``
    adds a clean step to it, ``flag`` notes a flagged one. The state is small and goes into checkpoints
    (``state_dict``)."""

    def __init__(self, rule: SpikeRule) -> None:
        self.rule = rule
        self.stage: Optional[int] = None
        self.losses: deque[float] = deque(maxlen=rule.window)
        self.grad_norms: deque[float] = deque(maxlen=rule.window)
        self.flagged_in_a_row = 0

    def _enter(self, stage: int) -> None:
        if stage != self.stage:
            self.stage = stage
            self.losses.clear()
            if self.rule.method == "ratio":  # the robust rule keeps the norms' history across stages
                self.grad_norms.clear()

    def check_loss(self, stage: int, loss: float) -> Optional[Spike]:
        self._enter(stage)
        if not math.isfinite(loss):
            return Spike("non_finite_loss", loss, self._loss_centre())
        if len(self.losses) < self.rule.history:
            return None
        if self.rule.method == "ratio":
            return Spike("loss_spike", loss, _mean(self.losses)) if loss > self.rule.loss_factor * _mean(self.losses) \
                else None
        centre, spread = robust_centre_and_spread(self.losses)
        spreads = (loss - centre) / spread
        return Spike("loss_spike", loss, centre, spreads) if spreads > self.rule.loss_spread else None

    def check_grad_norm(self, stage: int, grad_norm: Optional[float]) -> Optional[Spike]:
        self._enter(stage)
        if grad_norm is None:
            return None
        if not math.isfinite(grad_norm):
            return Spike("non_finite_grad_norm", grad_norm, self._norm_centre())
        if len(self.grad_norms) < self.rule.history:
            return None
        centre = self._norm_centre()
        assert centre is not None
        return Spike("grad_norm_spike", grad_norm, centre) if grad_norm > self.rule.grad_norm_factor * centre \
            else None

    def accept(self, loss: float, grad_norm: Optional[float]) -> None:
        self.flagged_in_a_row = 0
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def flag(self, spike: Spike) -> bool:
        """Note a flagged step. True when it is a new level of the gradient norm: a ``grad_norm_spike`` after
        ``new_level_after`` of them in a row; the norm history then restarts as ``history`` copies of its value, so
        the next norm is judged against the new level at once."""
        if spike.reason != "grad_norm_spike":
            self.flagged_in_a_row = 0
            return False
        if self.flagged_in_a_row < self.rule.new_level_after:
            self.flagged_in_a_row += 1
            return False
        self.flagged_in_a_row = 0
        self.grad_norms.clear()
        self.grad_norms.extend([spike.value] * self.rule.history)
        return True

    def _loss_centre(self) -> Optional[float]:
        if not self.losses:
            return None
        return _mean(self.losses) if self.rule.method == "ratio" else statistics.median(self.losses)

    def _norm_centre(self) -> Optional[float]:
        if not self.grad_norms:
            return None
        return _mean(self.grad_norms) if self.rule.method == "ratio" else statistics.median(self.grad_norms)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "flagged_in_a_row": self.flagged_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
        self.losses = deque(state["losses"], maxlen=self.rule.window)
        self.grad_norms = deque(state["grad_norms"], maxlen=self.rule.window)
        self.flagged_in_a_row = state.get("flagged_in_a_row", 0)  # absent from checkpoints of earlier versions


def risen_above(loss: float, lowest: float, margin: float) -> bool:
    """Whether ``loss`` is more than ``margin`` (a fraction) above ``lowest``: the held-out rule of
    ``guard.eval_rise``, which stops a run in the guard and calls a finished run diverged in ``sweep``/``compare``."""
    return loss > lowest * (1 + margin)


def robust_centre_and_spread(values: "deque[float] | list[float]") -> tuple[float, float]:
    """Median, and 1.4826 x the median absolute deviation floored at ``SPREAD_FLOOR`` of the median."""
    centre = statistics.median(values)
    mad = statistics.median(abs(v - centre) for v in values)
    return centre, max(MAD_TO_SD * mad, SPREAD_FLOOR * abs(centre), 1e-12)


def find_spike_steps(rows: list[dict[str, Any]], rule: SpikeRule) -> dict[int, Spike]:
    """Replay a run's train lines (in step order) through a detector, as the guard sees them: step -> spike for
    every flagged step (a flagged step is not accepted into the history, as the guard does not accept it; a new
    level of the gradient norm restarts the norm history)."""
    detector = SpikeDetector(rule)
    found: dict[int, Spike] = {}
    for row in rows:
        norm = row.get("grad_norm")
        norm = norm if isinstance(norm, (int, float)) and not isinstance(norm, bool) else None
        spike = detector.check_loss(row["stage"], row["loss"]) or detector.check_grad_norm(row["stage"], norm)
        if spike is None:
            detector.accept(row["loss"], norm)
        else:
            detector.flag(spike)
            found[row["step"]] = spike
    return found


def _mean(values: "deque[float]") -> float:
    return sum(values) / len(values)
