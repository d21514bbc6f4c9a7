"""A sweep's processes: each run is the real trainer in a process of its own, one at a time or one per GPU."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from pipeline.commands import BAD_INPUT, NOT_INSTALLED
from pipeline.environment import LAUNCHER_VARIABLES, free_port
from pipeline.rundir import RunDir

ABORTING_EXITS = (BAD_INPUT, NOT_INSTALLED)
"""The trainer's exit statuses that every run of the sweep would end with too: bad input, a package not installed."""


@dataclass
class Job:
    """One trainer process to run: its name (the run directory's), directory and command."""

    name: str
    run_dir: Path
    command: list[str]


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen[bytes]
    log: Any
    gpu: Optional[int]
    port: Optional[int]
    started: float


class SweepAborted(Exception):
    """The first run exited with one of ``ABORTING_EXITS`` (``status``): the other runs would fail the same way."""

    def __init__(self, job: Job, status: int, message: str) -> None:
        self.job = job
        self.status = status
        super().__init__(message)


def child_environment(environ: Mapping[str, str], gpu: Optional[int], port: Optional[int]) -> dict[str, str]:
    """A run's environment: no launcher variables (each run is one process of its own); with a GPU, that device
    alone (``CUDA_VISIBLE_DEVICES``, mapped through the sweep's own when it has one) and its own ``MASTER_PORT``."""
    env = {key: value for key, value in environ.items() if key not in LAUNCHER_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if gpu < len(visible) else str(gpu)
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return env


def _free_port(taken: set[int]) -> int:
    """A free port not given to another run still starting."""
    while True:
        port = free_port()
        if port not in taken:
            return port


def run_jobs(jobs: Sequence[Job], gpus: Optional[Sequence[int]], environ: Mapping[str, str],
             on_start: Callable[[Job, Optional[int]], None], on_finish: Callable[[Job, int, float], None],
             poll_s: float = 0.2) -> None:
    """Run the jobs, one at a time (``gpus`` None) or at most one per GPU at a time, each with its output appended
    to ``<run dir>/train.log``. ``on_start(job, gpu)`` and ``on_finish(job, exit_status, seconds)`` are called as
    they go. If the first job exits with one of ``ABORTING_EXITS`` (bad input, a package not installed), the others
    are stopped (SIGTERM: the trainer checkpoints and exits) and ``SweepAborted`` is raised; any other failure is left
    to ``on_finish``."""
    slots: list[Optional[int]] = list(gpus) if gpus else [None]
    pending = list(jobs)
    running: list[_Running] = []
    first = jobs[0] if jobs else None
    try:
        while pending or running:
            busy = {r.gpu for r in running}
            for gpu in [slot for slot in slots if slot not in busy]:
                if not pending:
                    break
                job = pending.pop(0)
                port = _free_port({r.port for r in running if r.port}) if gpu is not None else None
                job.run_dir.mkdir(parents=True, exist_ok=True)
                log = open(RunDir(job.run_dir).train_log, "ab")
                log.write(f"\n=== sweep: {' '.join(job.command)}"
                          f"{'' if gpu is None else f' (GPU {gpu}, MASTER_PORT {port})'}\n".encode())
                log.flush()
                on_start(job, gpu)
                try:
                    process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                               env=child_environment(environ, gpu, port))
                except OSError:
                    log.close()
                    raise
                running.append(_Running(job, process, log, gpu, port, time.monotonic()))
            time.sleep(poll_s)
            for entry in [r for r in running if r.process.poll() is not None]:
                running.remove(entry)
                entry.log.close()
                status = entry.process.returncode
                if entry.job is first and status in ABORTING_EXITS:
                    raise SweepAborted(entry.job, status, _error_line(RunDir(entry.job.run_dir).train_log))
                on_finish(entry.job, status, time.monotonic() - entry.started)
    finally:
        for entry in running:  # an abort or an interrupt: let the others checkpoint and exit
            if entry.process.poll() is None:
                entry.process.send_signal(signal.SIGTERM)
        for entry in running:
            try:
                entry.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                entry.process.kill()
                entry.process.wait()
            entry.log.close()
            on_finish(entry.job, entry.process.returncode, time.monotonic() - entry.started)


def _error_line(log: Path) -> str:
    """The trainer's ``error: ...`` line (its last one), without the prefix."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "the trainer exited with status 2")


def trainer_command(config_arg: str, overlays: Sequence[str], sets: Sequence[str], run_dir: Path) -> list[str]:
    """The real trainer in a process of its own, resuming the run directory's latest checkpoint if any."""
    command = [sys.executable, "-m", "pipeline.train", "--config", config_arg]
    for overlay in overlays:
        command += ["--overlay", overlay]
    for assignment in sets:
        command += ["--set", assignment]
    return command + ["--output-dir", str(run_dir), "--resume", "auto"]


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
