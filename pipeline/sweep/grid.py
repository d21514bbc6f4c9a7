"""The LR grid of a sweep: parsing ``--lrs`` and ``--gpus``, the default grid, run names, the overrides that move
a whole LR schedule to another base LR, and those that name a run in wandb."""

from __future__ import annotations

import json
import math
from typing import Sequence

from curriculum.config import CurriculumConfig
from curriculum.errors import ConfigError

DEFAULT_GRID_POINTS = 7
DEFAULT_GRID_SPAN = 10.0  # the default grid runs from base_lr / 10 to base_lr * 10


def parse_lrs(text: str) -> list[float]:
    """``--lrs 1e-4,3e-4,1e-3``: positive finite numbers, each once, in increasing order."""
    lrs: list[float] = []
    for item in text.split(","):
        try:
            lr = float(item)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError("--lrs", item.strip(),
                              "must be comma-separated positive numbers, e.g. --lrs 1e-4,3e-4,1e-3")
        if lr in lrs:
            raise ConfigError("--lrs", item.strip(), "given twice")
        lrs.append(lr)
    return check_run_names(sorted(lrs))


def default_lrs(base_lr: float, points: int = DEFAULT_GRID_POINTS, span: float = DEFAULT_GRID_SPAN) -> list[float]:
    """``points`` log-spaced LRs from ``base_lr / span`` to ``base_lr * span``, with 3 significant digits (the base
    itself exactly): for 3e-3, 3e-4, 6.46e-4, 1.39e-3, 3e-3, 6.46e-3, 1.39e-2, 3e-2."""
    if points == 1:
        return [base_lr]
    middle = (points - 1) / 2
    return [base_lr if k == middle else float(f"{base_lr * span ** ((k - middle) / middle):.3g}")
            for k in range(points)]


def run_name(lr: float) -> str:
    """The run directory of one LR: ``lr_3.00e-04``."""
    return f"lr_{lr:.2e}"


def check_run_names(lrs: Sequence[float]) -> list[float]:
    names: dict[str, float] = {}
    for lr in lrs:
        if run_name(lr) in names:
            raise ConfigError("--lrs", f"{names[run_name(lr)]!r},{lr!r}",
                              f"both would train in {run_name(lr)}: LRs must differ in their first 3 "
                              "significant digits")
        names[run_name(lr)] = lr
    return list(lrs)


def lr_overrides(curriculum: CurriculumConfig, base_lr: float) -> list[str]:
    """The ``--set`` overrides that move the whole LR schedule to ``base_lr``.

    ``curriculum.base_lr`` itself, and every absolute peak (``lr: <number>``, in a stage or the pacing segment)
    times ``base_lr / curriculum.base_lr``. ``lr_mult`` and ``lr: auto`` peaks are computed from ``base_lr`` by the
    schedule, so they need nothing; ``lr_max`` caps stay. Values are written with ``repr`` (YAML reads them back
    as the same float)."""
    scale = base_lr / curriculum.base_lr
    overrides = [f"curriculum.base_lr={base_lr!r}"]
    segments = ([(f"curriculum.stages.{i}", stage) for i, stage in enumerate(curriculum.stages)]
                if curriculum.stages is not None else [("curriculum.pacing", curriculum.pacing)])
    for path, segment in segments:
        if segment is not None and isinstance(segment.lr, float):  # absolute; None and "auto" follow base_lr
            overrides.append(f"{path}.lr={segment.lr * scale!r}")
    return overrides


def wandb_overrides(group: str, name: str) -> list[str]:
    """The ``--set`` overrides that put a run in the wandb group ``group`` under ``name`` (used when
    ``run.wandb.enabled``). Values are written as JSON strings, which YAML reads back as the same strings whatever
    they hold."""
    return [f"run.wandb.group={json.dumps(group)}", f"run.wandb.name={json.dumps(name)}"]


def parse_gpus(text: str, cuda_devices: int) -> list[int]:
    """``--gpus 0,1,2,3``: distinct ids of CUDA devices this process can see (``cuda_devices`` of them)."""
    if cuda_devices == 0:
        raise ConfigError("--gpus", text, "this machine has no CUDA device; leave --gpus out to train the runs "
                                          "one after another")
    gpus: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ConfigError("--gpus", item, "must be comma-separated GPU ids (0, 1, ...), e.g. --gpus 0,1,2,3")
        if int(item) >= cuda_devices:
            raise ConfigError("--gpus", item, f"this machine has {cuda_devices} CUDA device(s): ids 0 .. "
                                              f"{cuda_devices - 1}")
        if int(item) in gpus:
            raise ConfigError("--gpus", item, "given twice")
        gpus.append(int(item))
    return gpus
