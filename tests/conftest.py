"""Shared test helpers: a validated config from plain dicts, the real CLI in a subprocess, and a reader of wandb's
offline run files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pytest

from curriculum.config import Config
from curriculum.loading import validate_config
from pipeline.environment import LAUNCHER_VARIABLES

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


# --------------------------------------------------------------------------------------------------- training runs
# Shared by the integration tests that start the real trainer in processes of their own.

TINY_LLAMA_YAML = """\
model:
  arch: llama
  preset: tiny
  overrides: {{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
              num_key_value_heads: 4}}
data:
  dir: {data_dir}
"""
"""The model and data sections of the integration tests' configs (a ``str.format`` template: ``data_dir``): a
Llama of 2 layers, d_model 64, on the session's data directory. Each test file adds its name, stages and run."""

def process_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """This environment without ``CPT_*`` overrides or launcher variables, with DeepSpeed's CPU accelerator and a
    shared JIT-extension cache inside the repository (kept when CI has set one)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CPT_", "TORCHELASTIC_")) and key not in LAUNCHER_VARIABLES}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 standard-library files, a 512-token BPE: ~380 K training tokens, ~5 s to prepare."""
    from pipeline.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "stdlib-40"
    prepare_data(["python-stdlib"], out, tokenizer=None, vocab_size=512, text_field="text", val_fraction=0.05,
                 dtype="auto", seed=1234, num_proc=1, max_files=40)
    return out


def read_wandb_run(path: Path) -> list[Any]:
    """The records of a ``run-*.wandb`` file, as wandb's own protobuf ``Record`` messages.

    The file is a 7-byte header (``:W&B``, a magic number, a version) and then LevelDB's log format: 32 KiB blocks of
    chunks, each a 7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last) and the bytes of a record
    or of part of one; a block's tail shorter than a chunk header is zero padding."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, header = 32 * 1024, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending, position = [], b"", header
    while position + header <= len(data):
        left_in_block = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + header])
        if left_in_block < header or (kind, length) == (0, 0):  # padding up to the next block
            position += left_in_block
            continue
        pending += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):  # a record ends here
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records
