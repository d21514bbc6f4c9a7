"""Shared test helpers: a validated config from plain dicts, the real CLI in a subprocess, training runs in processes
of their own (one, two ranks through a launcher, or several launchers at once as the nodes of one job), and a reader
of wandb's offline run files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pytest

from curriculum.config import Config
from curriculum.loading import validate_config
from pipeline.environment import LAUNCHER_VARIABLES, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 300  # one run is 5-25 s; the first engine start on a fresh machine adds a ~40 s JIT build


def make_config(curriculum: dict[str, Any], run: Optional[dict[str, Any]] = None, **sections: Any) -> Config:
    """A validated ``Config`` from plain dicts, as a YAML file would give them."""
    raw: dict[str, Any] = {"curriculum": curriculum, **sections}
    if run is not None:
        raw["run"] = run
    return validate_config(raw)


def run_cli(args: Sequence[str], env: Optional[Mapping[str, str]] = None,
            not_installed: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline.cli ARGS`` with no ``CPT_*`` variables inherited (only those in ``env``); each package of
    ``not_installed`` fails to import as a package that is not installed does (``None`` in ``sys.modules``)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CPT_")}
    clean.update(env or {})
    command = [sys.executable, "-m", "pipeline.cli", *args]
    if not_installed:
        command[1:3] = ["-c", f"import sys; sys.modules.update(dict.fromkeys({list(not_installed)!r})); "
                              f"from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=clean, timeout=60)


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


def log_tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Run:
    """A finished (or stopped, or killed) training run: its directory and its processes' output."""

    dir: Path
    output: str = ""

    def records(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def train_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == "train"]

    def eval_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == "eval"]

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.train_rows()]

    def summary(self) -> dict[str, Any]:
        return json.loads((self.dir / "summary.json").read_text())

    def replicas(self) -> dict[str, Any]:
        return self.summary()["replicas"]


def assert_two_replicas(run: Run) -> None:
    """Two data-parallel replicas with identical parameters after training on different data."""
    replicas = run.replicas()
    assert run.summary()["world_size"] == 2
    assert len(replicas["params_sha256"]) == len(replicas["data_sha256"]) == 2
    assert replicas["params_identical"] is True
    assert replicas["params_sha256"][0] == replicas["params_sha256"][1]
    assert replicas["data_sha256"][0] != replicas["data_sha256"][1], "both ranks trained on the same data"


def train_args(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--output-dir", str(run_dir), *extra]


def two_ranks(launcher: str, *program: str) -> list[str]:
    """The command that starts ``program`` as two ranks on this machine through ``launcher``: ``torchrun``
    (``-m pipeline.train ...`` or a script and its arguments) or ``deepspeed`` (``--module pipeline.train ...`` or a
    script), each on a free port."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), *program]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            *program]


def run_process(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None) -> str:
    """Run ``cmd`` from the repository root; its stdout and stderr together, after checking it exited 0."""
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=REPO_ROOT, env=process_env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=PROCESS_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, (f"exit status {proc.returncode} after {elapsed:.1f} s: {' '.join(cmd)}\n"
                                  f"{log_tail(proc.stdout)}")
    return proc.stdout


@dataclass
class Finished:
    """A process of ``run_together``: its exit status, its output, and when it was seen to end (``time.time()``)."""

    status: int
    output: str
    ended_at: float


def run_together(commands: Sequence[Sequence[str]], log_dir: Path,
                 envs: Optional[Sequence[Optional[Mapping[str, str]]]] = None) -> list[Finished]:
    """Start every command at once from the repository root (``envs``: extra variables for each), each in a process
    group of its own with its output in ``log_dir``, and wait for all of them, noting when each ends (to 0.1 s).
    Whatever is left after ``PROCESS_TIMEOUT_S``, or of a process group once its leader ended, is killed."""
    procs, ended = [], {}
    for i, cmd in enumerate(commands):
        with open(log_dir / f"process{i}.log", "w") as log:
            procs.append(subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=process_env(envs[i] if envs else None),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while len(ended) < len(procs) and time.monotonic() < deadline:
            ended.update({i: time.time() for i, proc in enumerate(procs) if i not in ended and proc.poll() is not None})
            time.sleep(0.1)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the whole group is gone
                pass
            proc.wait(timeout=30)
    return [Finished(proc.returncode, (log_dir / f"process{i}.log").read_text(), ended.get(i, float("inf")))
            for i, proc in enumerate(procs)]


def write_wrapper(path: Path, patch: str) -> Path:
    """A script that applies ``patch`` (Python source) and then runs ``pipeline.train.main()`` with its argv."""
    path.write_text("import os, signal, sys, time\n\n" + textwrap.dedent(patch)
                    + "\nfrom pipeline.train import main\n\nsys.exit(main())\n")
    return path


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
