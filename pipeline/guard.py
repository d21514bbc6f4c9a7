"""Spike guard: looks at each step's loss (before the update) and gradient norm, and decides what the loop does.

What a spike is, is ``pipeline.spikes`` (shared with ``diagnose`` and ``sweep``). The training loop asks the guard
twice per step. ``before_update`` once the step's mean loss over ranks (and, with fp32 weights without ZeRO, the
gradient norm) is known, so the update can still be dropped; ``after_update`` with the gradient norm DeepSpeed
computed inside its step (bf16 mode, ZeRO), when it is too late to drop the update. Each returns a ``Verdict``:
``apply`` (a clean step, taken into the history), ``skip``, ``scale_lr`` or ``rollback``, and whether the run must
stop (``guard.max_events`` reached). A gradient norm that starts a new level (``pipeline.spikes``: flagged after
``guard.new_level_after`` norm spikes in a row) is not skipped once more: skipping leaves the weights where they
are, so it would be flagged for ever; its update is applied at the scaled LR (``scale_lr``). Under ``rollback`` there
is no new level: the rollback puts the weights back where the old level holds. The guard owns the LR
factor that ``scale_lr`` events compound. Its state is small and goes into checkpoints. After each evaluation,
``held_out_rose`` says whether the held-out loss climbed so far above its lowest (``guard.eval_rise``) that the run
must stop: a slow divergence no single step gives away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from curriculum.config import GuardConfig
from pipeline.spikes import Spike, SpikeDetector, SpikeRule, risen_above


@dataclass(frozen=True)
class Verdict:
    """What the loop does with a step: ``apply`` it, or handle ``spike`` with ``action``."""

    action: str
    """``apply``, ``skip``, ``scale_lr`` or ``rollback``."""
    spike: Optional[Spike] = None
    stop: bool = False
    """``guard.max_events`` reached with this event: the run checkpoints its last good state and stops."""
    new_level: bool = False
    """The spike starts a new level of the gradient norm: the norm history restarted from it."""

    @property
    def update_applies(self) -> bool:
        """Whether the step's update is applied: clean steps and LR-scaled finite spikes."""
        return self.action == "apply" or (self.action == "scale_lr" and not self.spike.non_finite)  # type: ignore


APPLY = Verdict("apply")


class SpikeGuard:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.detector = SpikeDetector(SpikeRule.of(config))
        self.events = 0
        self.lr_factor_value = 1.0
        self.scale_until = -1

    # --------------------------------------------------------------------------------------------- decisions

    def before_update(self, step: int, stage: int, loss: float, grad_norm: Optional[float],
                      norm_follows: bool = False) -> Verdict:
        """The verdict on a step before its update. A clean step is accepted into the running averages, unless
        its gradient norm is only known after the update (``norm_follows``): then ``after_update`` accepts it."""
        spike = self.check_loss(stage, loss) or self.check_grad_norm(stage, grad_norm)
        if spike is None:
            if not norm_follows:
                self.accept(loss, grad_norm)
            return APPLY
        # a rollback puts the weights back at the old level: the norm history must stay there too
        new_level = self.config.action != "rollback" and self.detector.flag(spike)
        action = "scale_lr" if new_level and self.config.action == "skip" else self.config.action
        return self._event(step, action, spike, new_level)

    def after_update(self, step: int, stage: int, loss: float, grad_norm: Optional[float]) -> Verdict:
        """The verdict on a gradient norm known only after the update was applied: too late to drop it, so the LR
        is scaled from the next step on, or (``rollback``, or a non-finite norm) the run rolls back. A clean step
        is accepted."""
        spike = self.check_grad_norm(stage, grad_norm)
        if spike is None:
            self.accept(loss, grad_norm)
            return APPLY
        rollback = self.config.action == "rollback" or spike.non_finite
        new_level = not rollback and self.detector.flag(spike)
        return self._event(step, "rollback" if rollback else "scale_lr", spike, new_level)

    def _event(self, step: int, action: str, spike: Spike, new_level: bool) -> Verdict:
        self.record(step, action)
        return Verdict(action, spike, stop=self.exhausted, new_level=new_level)

    # --------------------------------------------------------------------------------------------- detection

    def held_out_rose(self, eval_loss: float, lowest: float) -> bool:
        """Whether a held-out loss is non-finite or more than ``guard.eval_rise`` above ``lowest``, the lowest one
        before it (``inf`` at the first evaluation)."""
        rise = self.config.eval_rise
        if not self.config.enabled or rise is None:
            return False
        return not math.isfinite(eval_loss) or risen_above(eval_loss, lowest, rise)

    def check_loss(self, stage: int, loss: float) -> Optional[Spike]:
        return self.detector.check_loss(stage, loss) if self.config.enabled else None

    def check_grad_norm(self, stage: int, grad_norm: Optional[float]) -> Optional[Spike]:
        return self.detector.check_grad_norm(stage, grad_norm) if self.config.enabled else None

    def accept(self, loss: float, grad_norm: Optional[float]) -> None:
        self.detector.accept(loss, grad_norm)

    @property
    def losses(self) -> Any:
        return self.detector.losses

    # --------------------------------------------------------------------------------------------- events, LR

    def record(self, step: int, action: str) -> None:
        """Count an event; ``scale_lr`` compounds the LR factor and holds it for ``lr_scale_steps`` steps."""
        self.events += 1
        if action == "scale_lr":
            self.lr_factor_value *= self.config.lr_scale
            self.scale_until = step + 1 + self.config.lr_scale_steps

    def lr_factor(self, step: int) -> float:
        if step >= self.scale_until:
            self.lr_factor_value = 1.0
        return self.lr_factor_value

    @property
    def exhausted(self) -> bool:
        return self.events >= self.config.max_events

    # --------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {**self.detector.state_dict(), "events": self.events, "lr_factor": self.lr_factor_value,
                "scale_until": self.scale_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)
        self.events = state["events"]
        self.lr_factor_value = state["lr_factor"]
        self.scale_until = state["scale_until"]
