"""``sweep_manifest.json``: what a sweep directory holds and how far each run got."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from curriculum.config import Config
from curriculum.errors import ConfigError
from pipeline.rundir import RunDir
from pipeline.sweep.grid import run_name

MANIFEST = "sweep_manifest.json"


class Manifest:
    """``sweep_manifest.json``: the LRs, and per run its overrides, peak LRs, status and trainer launches.

    Run status: ``pending`` (not started), ``running``, ``done`` (summary.json written), ``diverged`` (the spike
    guard stopped it, exit status 1; a result, not relaunched), ``failed`` (any other exit status than 0),
    ``stopped`` (exited 0 before the end, e.g. on SIGTERM; resumable).
    Written atomically after every change, so a sweep killed at any moment leaves a readable manifest."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, sweep_dir: Path, config: Config, config_arg: str, overlays: Sequence[str],
             sets: Sequence[str]) -> "Manifest":
        """The sweep directory's manifest, or a new one. The config a sweep directory was started with is
        recorded (its hash); continuing it with a different config would mix incomparable runs, unless no run has
        trained a step yet (e.g. the first one was refused its data directory)."""
        path = sweep_dir / MANIFEST
        config_sha256 = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
                                       ).hexdigest()
        if path.exists():
            data = _read(path)
            trained = any(_has_lines(RunDir(sweep_dir / name).metrics) for name in data.get("runs", {}))
            if data.get("config_sha256") != config_sha256 and trained:
                raise ConfigError("--output-dir", str(sweep_dir),
                                  f"holds a sweep of a different config ({MANIFEST}: --config {data.get('config')}, "
                                  f"sets {data.get('sets')}); give another --output-dir")
            if data.get("config_sha256") == config_sha256:
                return cls(path, data)
        return cls(path, {"name": config.name, "config": config_arg, "overlays": list(overlays), "sets": list(sets),
                          "config_sha256": config_sha256, "base_lr": config.curriculum.base_lr,
                          "swept": "curriculum.base_lr", "lrs": [], "runs": {}})

    def add_run(self, lr: float, overrides: list[str], peak_lrs: list[float]) -> None:
        run = self.data["runs"].setdefault(run_name(lr), {"lr": lr, "status": "pending", "launches": 0})
        run.update({"overrides": overrides, "peak_lrs": peak_lrs})
        self.data["lrs"] = sorted(set(self.data["lrs"]) | {lr})

    def run(self, name: str) -> dict[str, Any]:
        return self.data["runs"][name]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def _read(path: Path) -> dict[str, Any]:
    """A manifest as the sweep wrote it; anything else is one error naming the file (the runs' own directories
    are untouched either way)."""
    damaged = f"{MANIFEST} is damaged: move it away to start the sweep's bookkeeping afresh (the runs' directories " \
              "stay, and are resumed)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError("--output-dir", str(path.parent), f"{damaged}; reading it gave: {err}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not isinstance(data.get("lrs"), list) or not all(
            isinstance(run, dict) and isinstance(run.get("lr"), (int, float)) and isinstance(run.get("launches"), int)
            for run in runs.values()):
        raise ConfigError("--output-dir", str(path.parent), f"{damaged}; it is not a sweep manifest")
    return data


def _has_lines(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0
