"""Spike guard: looks at each step's loss (before the update) and gradient norm, and says what to do.

The training loop calls it at three points of a step: ``check_loss`` once the step's mean loss over ranks is known
(before the optimizer update, so the update can still be dropped), ``check_grad_norm`` once a gradient norm is
known, and ``accept`` for a step that was applied. Running averages cover the last ``window`` accepted steps of
the current stage: a stage switch changes the loss level (longer sequences, other batch), so they restart there and
nothing is flagged in the first ``window`` steps of a stage. Its state is small and goes into checkpoints.
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


class SpikeGuard:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.stage: Optional[int] = None
        self.losses: deque[float] = deque(maxlen=config.window)
        self.grad_norms: deque[float] = deque(maxlen=config.window)
        self.events = 0
        self.lr_factor_value = 1.0
        self.scale_until = -1

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
