"""Atomic checkpoints through ``engine.save_checkpoint``, keep-last-N, and the state a resume needs.

Layout of ``<run dir>/checkpoints``::

    step00000100/          a complete checkpoint: the engine's files + rank<r>.pt for every rank
    step00000200/
    step00000250/          saved for ``best`` only (an evaluation improved between periodic checkpoints)
    latest                 the name of the newest checkpoint to resume from (replaced atomically)
    best                   the name of the checkpoint with the lowest eval loss (replaced atomically)
    step00000300.partial/  a save in progress; never read, removed at the next start

Each checkpoint holds the engine's files, ``rank<r>.pt`` for every rank and ``run_state.json``, the shared part of
the ``RunState`` in a form that can be read without loading the engine (``Checkpointer.peek``): a resume checks
that the checkpoint fits the run (its model, its step) before anything is built from it.

A save writes into ``<tag>.partial``, waits for every rank, then rank 0 renames it to ``<tag>`` and replaces
``latest``. A kill at any moment leaves ``latest`` pointing at a complete checkpoint. The checkpoint is named by
the number of steps done, which is also the step the resumed run starts at. ``best`` is a pointer like ``latest``,
not a second copy; pruning to the newest ``keep`` checkpoints never removes the one ``latest`` or ``best`` names.
Resume and rollback read ``latest``; ``best`` is for ``export``.

What a run's progress is, beyond the engine's weights and optimizer state, is one typed ``RunState``; resume and
rollback both read it back through ``Checkpointer.load``. Its shared part is rank 0's client state (stored by
DeepSpeed); what differs between ranks (RNG states, the fingerprint of the data the rank trained on) goes to
``rank<r>.pt``, since DeepSpeed keeps only rank 0's client state.

A checkpoint resumes on another world size (``run_state.json`` records the world size and ZeRO stage it was saved
with; for older checkpoints the number of ``rank<r>.pt`` files gives the world size). The data cursor counts
samples over all ranks and the schedule is global, so both carry over; the config's validation for the new world
size says when the plan no longer fits (a global batch the new ranks cannot split).
Where the optimizer state is partitioned by rank (ZeRO 1 and 2, and DeepSpeed's bf16 optimizer:
``*zero_pp_rank_*`` files), rank 0 first converts the checkpoint with DeepSpeed's ``ds_to_universal`` into
``<tag>/universal/`` (once; kept with the checkpoint and pruned with it; a failed conversion leaves
``<tag>/universal.error``, which the other ranks, polling the shared filesystem, read and raise) and every rank
loads that; a ZeRO-0
checkpoint holds the whole optimizer state and loads as it is. The per-rank state cannot be split again: every rank
takes rank 0's RNG state, and starts its data fingerprint from the hash of all the saved ranks' fingerprints. A
ZeRO-3 checkpoint is refused on another world size: converted the same way, its resumed losses drifted from the
straight run's (8.1159, 7.9980, 7.9766 against 8.1158, 7.9944, 7.9710 on the tiny test model, where ZeRO-2's
conversion matched to 1e-5), so its optimizer state does not come back exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from curriculum.errors import ConfigError

LATEST = "latest"
BEST = "best"
PARTIAL = ".partial"
RUN_STATE = "run_state.json"
RANK_FILES = "rank*.pt"
PARTITIONED_OPTIMIZER_FILES = "*zero_pp_rank_*"
"""The optimizer state files DeepSpeed writes one per rank: ZeRO 1-3 and its bf16 optimizer."""
PARTITIONED_MODEL_FILES = "zero_pp_rank_*_model_states.pt"
"""The module's partitions, one per rank: ZeRO-3."""
UNIVERSAL = "universal"
"""A checkpoint's universal form (``ds_to_universal``), made inside it for a resume on another world size."""


@dataclass
class RunState:
    """A run's progress: everything a checkpoint holds besides the engine's own state."""

    step: int = 0
    """Steps done, which is the step to run next (steps count from 0)."""
    tokens: int = 0
    """Tokens trained by steps ``0 .. step - 1``, counted from the batches trained."""
    cursor: int = 0
    """Samples drawn from the data so far, over all ranks (the sampler's whole state)."""
    elapsed_s: float = 0.0
    """Wall-clock seconds of the run so far: start-up, compilation, steps, evaluations, checkpoints; summed over
    resumed segments."""
    train_s: float = 0.0
    """Seconds spent in training steps only."""
    data_sha256: str = field(default_factory=lambda: hashlib.sha256().hexdigest())
    """This rank's data fingerprint: a sha256 chain with one link per step over the step's input rows (a sha256
    object's running state cannot be saved, its last digest can)."""
    guard: dict[str, Any] = field(default_factory=dict)
    """``SpikeGuard.state_dict()``."""
    best_eval_loss: float = math.inf
    """The lowest eval loss so far (what ``run.keep_best`` and ``guard.eval_rise`` compare with); ``inf`` before the
    first evaluation."""
    curriculum: dict[str, Any] = field(default_factory=dict)
    """The curriculum section the state was saved with: a resume reports what changed since."""
    params_sha256: Optional[str] = None
    """The parameters' hash at the save (written when the guard may roll back, so a rollback can prove it restored
    exactly these)."""
    model: dict[str, Any] = field(default_factory=dict)
    """The model's transformers config fields (``pipeline.model.model_config_dict``): a checkpoint only fits a model
    of the same shape."""
    world_size: int = 0
    """The ranks that saved it (0 in checkpoints from before it was recorded: their ``rank<r>.pt`` are counted)."""
    zero_stage: Optional[int] = None
    """The ZeRO stage it was saved under, which lays out the engine's files: a resume keeps it (None: not
    recorded)."""

    RANK_FIELDS = ("data_sha256",)

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(client_state, rank_state)``: what rank 0 stores for all, and what each rank stores for itself."""
        values = asdict(self)
        rank_state = {key: values.pop(key) for key in self.RANK_FIELDS}
        return values, rank_state

    @classmethod
    def from_checkpoint(cls, client_state: dict[str, Any], rank_state: dict[str, Any]) -> "RunState":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in {**client_state, **rank_state}.items() if key in known})


def tag_for(steps_done: int) -> str:
    return f"step{steps_done:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def saved_world_size(path: Path) -> int:
    """The number of ranks that saved the checkpoint at ``path``: its ``run_state.json`` says, and a checkpoint from
    before it did has one ``rank<r>.pt`` per rank."""
    state = Checkpointer.peek(path)
    return state.world_size if state is not None and state.world_size else len(list(path.glob(RANK_FILES)))


def check_world_size(path: Path, world_size: int) -> None:
    """Refuse what cannot resume on ``world_size`` ranks: a ZeRO-3 checkpoint of another world size (see above)."""
    saved = saved_world_size(path)
    if saved != world_size and any(path.glob(PARTITIONED_MODEL_FILES)):
        raise ConfigError("--resume", str(path), f"a ZeRO-3 checkpoint resumes only on the world size that saved it "
                                                 f"({saved}; this run has {world_size}): DeepSpeed's universal "
                                                 "conversion does not bring its optimizer state back exactly; launch "
                                                 f"{saved} ranks")


class Checkpointer:
    """Saves and finds checkpoints of one run; every rank calls ``save`` and ``load``."""

    def __init__(self, directory: Path, keep: int, rank: int, world_size: int = 1) -> None:
        """Nothing is created here (the directory appears with the first save); rank 0 removes the ``.partial``
        directories a killed save left behind (never complete, never read)."""
        self.directory = directory
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        if rank == 0:
            for leftover in directory.glob(f"*{PARTIAL}"):
                shutil.rmtree(leftover, ignore_errors=True)
        _barrier()

    def latest(self) -> Optional[Path]:
        return pointed(self.directory, LATEST)

    def best(self) -> Optional[Path]:
        return pointed(self.directory, BEST)

    def mark_best(self, checkpoint: Path) -> None:
        """``best`` names ``checkpoint``, and the one it named before is pruned unless it is among the newest
        (rank 0 writes; a ``best`` directory, the full copy that runs saved before ``best`` became a pointer, is
        replaced)."""
        if self.rank != 0:
            return
        if (self.directory / BEST).is_dir():
            shutil.rmtree(self.directory / BEST)
        self._point(BEST, checkpoint)
        self._prune()

    def save_state(self, engine: Any, state: RunState, latest: bool = True) -> Path:
        """The engine and ``state`` as ``step<state.step>`` (see ``save``), with ``run_state.json``."""
        client_state, rank_state = state.to_checkpoint()
        return self.save(engine, state.step, client_state, rank_state, latest,
                         readable=json.dumps(client_state, indent=2, default=str) + "\n")

    @staticmethod
    def peek(path: Path) -> Optional[RunState]:
        """The run state saved at ``path`` (without this rank's part), read without the engine; None for a checkpoint
        without ``run_state.json``."""
        readable = path / RUN_STATE
        if not readable.is_file():
            return None
        try:
            return RunState.from_checkpoint(json.loads(readable.read_text()), {})
        except (ValueError, TypeError) as err:
            raise ConfigError("--resume", str(path), f"{RUN_STATE} is damaged ({err}); resume from another "
                                                     "checkpoint") from None

    def load_state(self, engine: Any, path: Path) -> RunState:
        """Restore engine, optimizer and this rank's RNG from ``path``; the run state saved with them."""
        return RunState.from_checkpoint(*self.load(engine, path))

    def save(self, engine: Any, steps_done: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             latest: bool = True, readable: Optional[str] = None) -> Path:
        """Save as ``step<N>``; with ``latest``, ``latest`` names it and old ones are pruned (a checkpoint saved for
        ``best`` only moves neither); ``readable``: the text of ``run_state.json``."""
        tag = tag_for(steps_done)
        partial = self.directory / f"{tag}{PARTIAL}"
        self.directory.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.directory), tag=partial.name, client_state=client_state, save_latest=False)
        partial.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates it only on ranks that write engine files
        torch.save({"rng": rng_state(), **rank_state}, partial / self._rank_file)
        if readable is not None and self.rank == 0:
            (partial / RUN_STATE).write_text(readable)
        _barrier()
        if self.rank == 0:
            self._commit(partial, self.directory / tag, update_latest=latest)
        _barrier()
        return self.directory / tag

    def _commit(self, partial: Path, final: Path, update_latest: bool = True) -> None:
        move_into_place(partial, final)  # a step saved again: after a resume, or promoted from a best-only save
        if not update_latest:
            return
        self._point(LATEST, final)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints, and the ones ``latest`` and ``best`` name."""
        latest, best = self.latest(), self.best()
        # oldest first, but latest's last: after resuming from an older checkpoint a newer one of the abandoned run
        # may still be here, and pruning must never take the checkpoint that latest names
        complete = sorted(complete_checkpoints(self.directory), key=lambda p: (p == latest, p.name))
        for old in complete[: -self.keep]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)

    def _point(self, pointer: str, checkpoint: Path) -> None:
        """Replace the file ``pointer`` with one naming ``checkpoint``, atomically."""
        pointer_tmp = self.directory / f"{pointer}.tmp"
        with open(pointer_tmp, "w") as f:
            f.write(checkpoint.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self.directory / pointer)

    @property
    def _rank_file(self) -> str:
        return f"rank{self.rank}.pt"

    def load(self, engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore engine, optimizer and this rank's RNG; return the client state and this rank's state. A
        checkpoint of another world size goes through ``_load_resharded``."""
        saved = saved_world_size(path)
        missing = [f"rank{r}.pt" for r in range(max(saved, 1)) if not (path / f"rank{r}.pt").is_file()]
        if missing:
            raise ConfigError("--resume", str(path), f"not a complete checkpoint of this pipeline: "
                                                     f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                                                     f"missing of its {max(saved, 1)} ranks' files; resume from "
                                                     "another checkpoint")
        if saved != self.world_size:
            return self._load_resharded(engine, path, saved)
        client_state = _load_engine(engine, path.parent, path.name)
        rank_state = torch.load(path / self._rank_file, weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return client_state, rank_state

    def _load_resharded(self, engine: Any, path: Path, saved: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """A checkpoint of ``saved`` ranks on this run's world size (see the module docstring). Rank 0 converts
        while the others wait for its result on the filesystem they all read the checkpoint from, not in a
        collective with a timeout (a conversion of a large model takes minutes)."""
        from pipeline.engine import loading_universal

        check_world_size(path, self.world_size)
        if any(path.glob(PARTITIONED_OPTIMIZER_FILES)):
            universal, failed = path / UNIVERSAL, path / f"{UNIVERSAL}.error"
            if self.rank == 0:
                failed.unlink(missing_ok=True)  # an earlier attempt's
            _barrier()
            if self.rank == 0 and not universal.is_dir():
                try:
                    error = _convert_to_universal(path, universal)
                except Exception as err:  # whatever it is, the waiting ranks must hear of it
                    error = f"converting it for {self.world_size} ranks failed: {type(err).__name__}: {err}"
                if error is not None:
                    failed.write_text(error)
            while not universal.is_dir() and not failed.is_file():  # a rank 0 that dies ends the job (peers.py)
                time.sleep(1.0)
            if failed.is_file():
                raise ConfigError("--resume", str(path), failed.read_text())
            with loading_universal(engine):
                client_state = _load_engine(engine, path, UNIVERSAL)
        else:
            client_state = _load_engine(engine, path.parent, path.name)
        saved_states = [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(saved)]
        set_rng_state(saved_states[0]["rng"])
        chain = hashlib.sha256("".join(s["data_sha256"] for s in saved_states).encode()).hexdigest()
        return client_state, {"data_sha256": chain}


def _load_engine(engine: Any, load_dir: Path, tag: str) -> dict[str, Any]:
    load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
    if load_path is None:
        raise ConfigError("--resume", str(load_dir / tag), "DeepSpeed could not load this checkpoint")
    return client_state


def _convert_to_universal(path: Path, universal: Path) -> Optional[str]:
    """DeepSpeed's ``ds_to_universal`` of the checkpoint at ``path`` into ``universal`` (through a ``.partial``
    directory, so a kill leaves nothing half-made); None, or what went wrong in one line."""
    import subprocess
    import sys

    partial = universal.with_name(universal.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    workers = str(min(8, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                           "--output_folder", str(partial), "--num_extract_workers", workers,
                           "--num_merge_workers", workers, "--inject_missing_state"], capture_output=True, text=True)
    (path / "latest_universal").unlink(missing_ok=True)  # written beside the output; naming the .partial
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"DeepSpeed's ds_to_universal could not convert it for another world size: {last}"
    move_into_place(partial, universal)
    return None


def resolve_resume(arg: str, checkpointer: Checkpointer, log: Optional[Callable[[str], None]] = None
                   ) -> Optional[Path]:
    """``auto``: the run's latest checkpoint if any; ``none``: start fresh; else a checkpoint directory. A checkpoint
    with a damaged file (``damaged_file``) is an error before anything is built to load it.

    A ``latest`` that names a checkpoint that is not there (deleted, or the directory copied without it) is never
    a silent fresh start: ``auto`` resumes from the newest complete ``step<N>`` checkpoint and says so (``log``),
    and is an error when there is none."""
    path = _resume_path(arg, checkpointer, log)
    rank, world_size = _rank_and_world()
    damage = _first_of_ranks(damaged_file(path, rank, world_size) if path is not None else None, world_size)
    if damage is not None:
        raise ConfigError("--resume", str(path), f"{damage}; resume from another checkpoint")
    return path


def _resume_path(arg: str, checkpointer: Checkpointer, log: Optional[Callable[[str], None]]) -> Optional[Path]:
    if arg == "none":
        return None
    if arg == "auto":
        latest = checkpointer.latest()
        pointer = checkpointer.directory / LATEST
        if latest is not None or not pointer.is_file():
            return latest
        named = pointer.read_text().strip()
        complete = complete_checkpoints(checkpointer.directory)
        if not complete:
            raise ConfigError("--resume", arg, f"{pointer} names {named}, which is not there, and no complete "
                                               "checkpoint is: restore it, or train into another --output-dir")
        if log is not None:
            log(f"{pointer} names {named}, which is not there: resuming from the newest complete checkpoint, "
                f"{complete[-1].name}")
        return complete[-1]
    path = Path(arg)
    if path.is_dir() and (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not path.is_dir():
        raise ConfigError("--resume", arg, "must be auto, none, a checkpoint directory or a checkpoints directory")
    return path


def damaged_file(checkpoint: Path, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """The first file of ``checkpoint`` that ``torch.save`` wrote (``*.pt``: the engine's and ``rank<r>.pt``) and that
    is damaged, said in a few words; None when every one is whole. A file is damaged when it is not a whole zip
    archive (a save killed while writing, a copy cut short, a full disk: the archive's directory, at its end, is
    lost) or when a record does not read back as written: a checksum that does not match, a header overwritten
    (bytes changed on the disk or in a copy; ``torch.load`` checks no checksum and loads changed bytes as weights).
    Not checked: files in torch.save's legacy format (``checkpoint.checkpoint_serialization: false``) and archives
    saved without checksums (``torch.serialization.set_crc32_options(False)``), which keep none.

    Every record is read (about 2 GB/s from the page cache on a 2-core CPU machine): with ``world_size`` ranks,
    ``rank`` reads every ``world_size``-th file only, and ``resolve_resume`` shares the verdicts."""
    for file in sorted(checkpoint.glob("*.pt"))[rank::world_size]:
        try:
            with file.open("rb") as head:
                if head.read(1) == b"\x80":  # a pickle: torch.save's legacy format, with no checksums
                    continue
            with zipfile.ZipFile(file) as archive:
                unreadable = _unreadable_record(archive)
        except (zipfile.BadZipFile, OSError) as err:
            return f"{file.name} is damaged (not a whole torch.save archive: {err})"
        except Exception as err:  # zipfile on a changed header byte: a name that does not decode
            # (UnicodeDecodeError), a version or flags it does not know (NotImplementedError, RuntimeError), ...
            return f"{file.name} is damaged (its zip headers do not read: {type(err).__name__}: {err})"
        if unreadable is not None:
            return f"{file.name} is damaged ({unreadable})"
    return None


def _unreadable_record(archive: zipfile.ZipFile) -> Optional[str]:
    """What goes wrong reading the first record of ``archive`` that does not read back as written, or None."""
    records = [info for info in archive.infolist() if info.file_size]
    if all(info.CRC == 0 for info in records):  # saved without checksums
        return None
    for info in records:
        if info.external_attr & 0x10:  # the MS-DOS directory flag on a record with data: zipfile skips such a record
            return f"its record {info.filename} is marked a directory"
        try:
            with archive.open(info) as record:
                while record.read(1 << 24):
                    pass
        except (zipfile.BadZipFile, EOFError) as err:
            return f"its record {info.filename} does not read back: {err}"
    return None


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _first_of_ranks(found: Optional[str], world_size: int) -> Optional[str]:
    """The first rank's ``found`` that is not None, on every rank (each rank looked at its share), or None."""
    if world_size == 1:
        return found
    every: list[Optional[str]] = [None] * world_size
    dist.all_gather_object(every, found)
    return next((one for one in every if one is not None), None)


def move_into_place(partial: Path, final: Path) -> None:
    """Rename the directory ``partial`` to ``final``; a ``final`` already there stays until the new one is in
    place."""
    replaced = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, replaced)
    os.replace(partial, final)
    shutil.rmtree(replaced, ignore_errors=True)


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete ``step<N>`` checkpoints in ``directory``, oldest first."""
    return sorted(p for p in directory.glob("step*") if p.is_dir() and not p.name.endswith(PARTIAL))


def pointed(directory: Path, pointer: str) -> Optional[Path]:
    """The checkpoint directory the file ``pointer`` names; None when there is no such file or no such checkpoint."""
    path = directory / pointer
    if not path.is_file():
        return None
    named = directory / path.read_text().strip()
    return named if named.is_dir() else None


def _barrier() -> None:
    if _rank_and_world()[1] > 1:
        dist.barrier()
