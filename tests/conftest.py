"""Shared test helpers: a validated config from plain dicts, and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from curriculum.config import Config
from curriculum.loading import validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_config(curriculum: dict[str, Any], run: Optional[dict[str, Any]] = None, **sections: Any) -> Config:
    """A validated ``Config`` from plain dicts, as a YAML file would give them."""
    raw: dict[str, Any] = {"curriculum": curriculum, **sections}
    if run is not None:
        raw["run"] = run
    return validate_config(raw)


def run_cli(args: Sequence[str], env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline.cli ARGS`` with no ``CPT_*`` variables inherited (only those in ``env``)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CPT_")}
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=clean, timeout=60)

