"""Spike guard: looks at each step's loss (before the update) and gradient norm, and decides what the loop does.

The training loop asks it twice per step. ``before_update`` once the step's mean loss over ranks (and, with fp32
weights without ZeRO, the gradient norm) is known, so the update can still be dropped; ``after_update`` with the
gradient norm DeepSpeed computed inside its step (bf16 mode, ZeRO), when it is too late to drop the update. Each
returns a ``Verdict``: ``apply`` (a clean step, taken into the running averages), ``skip``, ``scale_lr`` or
``rollback``, and whether the run must stop (``guard.max_events`` reached). The guard owns the LR factor that
``scale_lr`` events compound.

Running averages cover the last ``window`` accepted steps of the current stage: a stage switch changes the loss
level (longer sequences, other batch), so they restart there and nothing is flagged in the first ``window`` steps
of a stage. Its state is small and goes into checkpoints.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from curriculum.config import GuardConfig


@dataclass(frozen=True)
class Spike:
    reason: str
    """``non_finite_loss``, ``loss_spike``, ``non_finite_grad_norm`` or ``grad_norm_spike``."""
    value: float
    running_average: Optional[float]

    @property
    def non_finite(self) -> bool:
        return self.reason.startswith("non_finite")


@dataclass(frozen=True)
class Verdict:
    """What the loop does with a step: ``apply`` it, or handle ``spike`` with ``action``."""

    action: str
    """``apply``, ``skip``, ``scale_lr`` or ``rollback``."""
    spike: Optional[Spike] = None
    stop: bool = False
    """``guard.max_events`` reached with this event: the run checkpoints its last good state and stops."""

    @property
    def update_applies(self) -> bool:
        """Whether the step's update is applied: clean steps and LR-scaled finite spikes."""
        return self.action == "apply" or (self.action == "scale_lr" and not self.spike.non_finite)  # type: ignore


APPLY = Verdict("apply")


class SpikeGuard:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.stage: Optional[int] = None
        self.losses: deque[float] = deque(maxlen=config.window)
        self.grad_norms: deque[float] = deque(maxlen=config.window)
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
        return self._event(step, self.config.action, spike)

    def after_update(self, step: int, stage: int, loss: float, grad_norm: Optional[float]) -> Verdict:
        """The verdict on a gradient norm known only after the update was applied: too late to drop it, so the LR
        is scaled from the next step on, or (``rollback``, or a non-finite norm) the run rolls back. A clean step
        is accepted."""
        spike = self.check_grad_norm(stage, grad_norm)
        if spike is None:
            self.accept(loss, grad_norm)
            return APPLY
        rollback = self.config.action == "rollback" or spike.non_finite
        return self._event(step, "rollback" if rollback else "scale_lr", spike)

    def _event(self, step: int, action: str, spike: Spike) -> Verdict:
        self.record(step, action)
        return Verdict(action, spike, stop=self.exhausted)

    # --------------------------------------------------------------------------------------------- detection

    def _enter(self, stage: int) -> None:
        if stage != self.stage:
            self.stage = stage
            self.losses.clear()
            self.grad_norms.clear()

    def check_loss(self, stage: int, loss: float) -> Optional[Spike]:
        self._enter(stage)
        if not self.config.enabled:
            return None
        if not math.isfinite(loss):
            return Spike("non_finite_loss", loss, _mean(self.losses))
        if len(self.losses) == self.config.window and loss > self.config.loss_factor * _mean(self.losses):
            return Spike("loss_spike", loss, _mean(self.losses))
        return None

    def check_grad_norm(self, stage: int, grad_norm: Optional[float]) -> Optional[Spike]:
        self._enter(stage)
        if not self.config.enabled or grad_norm is None:
            return None
        if not math.isfinite(grad_norm):
            return Spike("non_finite_grad_norm", grad_norm, _mean(self.grad_norms))
        if (len(self.grad_norms) == self.config.window
                and grad_norm > self.config.grad_norm_factor * _mean(self.grad_norms)):
            return Spike("grad_norm_spike", grad_norm, _mean(self.grad_norms))
        return None

    def accept(self, loss: float, grad_norm: Optional[float]) -> None:
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

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
        return {"stage": self.stage, "losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "events": self.events, "lr_factor": self.lr_factor_value, "scale_until": self.scale_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
        self.losses = deque(state["losses"], maxlen=self.config.window)
        self.grad_norms = deque(state["grad_norms"], maxlen=self.config.window)
        self.events = state["events"]
        self.lr_factor_value = state["lr_factor"]
        self.scale_until = state["scale_until"]


def _mean(values: deque[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None
