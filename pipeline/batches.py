"""From the packed token file to the micro-batches of one optimizer step.

A *sample* is a full-length window: sample ``k`` is tokens ``[k * L_max, k * L_max + L_max + 1)`` of the training
file (``L_max + 1`` so the last position has a label). Samples are visited in a permuted order that is a pure
function of ``(seed, epoch)``; the *cursor* counts samples drawn so far over all ranks and is the sampler's whole
state (it goes into the checkpoint).

Each step draws ``stage.samples_per_step`` samples starting at the cursor. ``shape_batch`` turns them into rows of
the stage's length: ``truncate`` keeps the first ``L + 1`` tokens of each sample; ``reshape`` cuts each sample into
``L_max / L`` rows so no token is skipped. Rank ``r`` of ``W`` takes rows ``[r B / W, (r + 1) B / W)`` of the
step's ``B`` rows and splits them into ``grad_accum`` micro-batches of ``micro_batch`` rows.

``Prefetcher`` reads the next step's rows in a background thread while the current step trains and, on a GPU,
copies them from pinned memory on a side stream; what it returns is a pure function of ``(step, cursor)``, so a
resumed run reads exactly what an uninterrupted one did.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Optional

import numpy as np
import torch

from curriculum.errors import ConfigError
from curriculum.schedule import Schedule, Stage


def shape_batch(samples: torch.Tensor, seq_len: int, mode: Literal["truncate", "reshape"]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples``: ``[n, L_max + 1]`` token ids. Returns ``(inputs, labels)`` of ``[rows, seq_len]``, labels
    shifted by one. ``truncate``: ``rows = n``. ``reshape``: ``rows = n * L_max / seq_len``."""
    if mode == "truncate":
        return samples[:, :seq_len], samples[:, 1:seq_len + 1]
    return samples[:, :-1].reshape(-1, seq_len), samples[:, 1:].reshape(-1, seq_len)


@dataclass(frozen=True)
class TokenSampler:
    """Deterministic, rank-sharded sample order over a packed token array."""

    tokens: np.ndarray
    max_seq_len: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("data.dir", f"{len(self.tokens)} training tokens",
                              f"too few for one sample of the longest stage ({self.max_seq_len + 1} tokens)")

    @property
    def num_samples(self) -> int:
        return (len(self.tokens) - 1) // self.max_seq_len

    def sample_ids(self, cursor: int, count: int) -> np.ndarray:
        """Ids of the ``count`` samples starting at global position ``cursor``."""
        positions = np.arange(cursor, cursor + count)
        epochs, offsets = np.divmod(positions, self.num_samples)
        return np.array([_permutation(self.seed, int(e), self.num_samples)[o] for e, o in zip(epochs, offsets)],
                        dtype=np.int64)

    def read(self, ids: np.ndarray, length: int) -> torch.Tensor:
        """The first ``length`` tokens of each sample, as ``int64 [len(ids), length]``."""
        starts = ids * self.max_seq_len
        window = starts[:, None] + np.arange(length)[None, :]
        return torch.from_numpy(self.tokens[window].astype(np.int64))

    def step_micro_batches(self, stage: Stage, cursor: int, rank: int, mode: Literal["truncate", "reshape"]
                           ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of ``(inputs, labels)`` for one step from ``cursor``."""
        rows_per_sample = 1 if mode == "truncate" else self.max_seq_len // stage.seq_len
        rows_per_rank = stage.global_batch // stage.world_size
        first_row = rank * rows_per_rank
        first_sample, last_sample = first_row // rows_per_sample, (first_row + rows_per_rank - 1) // rows_per_sample
        ids = self.sample_ids(cursor + first_sample, last_sample - first_sample + 1)
        length = stage.seq_len + 1 if mode == "truncate" else self.max_seq_len + 1
        inputs, labels = shape_batch(self.read(ids, length), stage.seq_len, mode)
        skip = first_row - first_sample * rows_per_sample
        inputs, labels = inputs[skip:skip + rows_per_rank], labels[skip:skip + rows_per_rank]
        return list(zip(inputs.split(stage.micro_batch), labels.split(stage.micro_batch)))


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def eval_batches(tokens: np.ndarray, seq_len: int, batch: int, num_batches: int, rank: int, world_size: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches at full length: the first ``batch x num_batches`` windows of the held-out file (fewer
    whole batches when the split is short), the same every evaluation and for every world size. Each batch of
    ``batch`` windows is shared out like a training step: rank ``r`` takes rows ``[r b, (r + 1) b)``,
    ``b = batch / world_size``. Every batch has the same shape (one compiled graph)."""
    if batch % world_size:
        raise ConfigError("run.eval_batch", batch, f"must be divisible by the world size {world_size}")
    available = (len(tokens) - 1) // seq_len
    if available < world_size:
        raise ConfigError("data.dir", f"{len(tokens)} validation tokens",
                          f"too few for one {seq_len}-token evaluation sequence per rank; prepare the data with a "
                          "larger --val-fraction")
    if available < batch:  # a short split: one smaller batch of every window there is, shared out evenly
        batch = available // world_size * world_size
    count = min(num_batches, available // batch)
    per_rank = batch // world_size
    ids = np.array([b * batch + rank * per_rank + i for b in range(count) for i in range(per_rank)], dtype=np.int64)
    samples = TokenSampler(tokens, seq_len, seed=0).read(ids, seq_len + 1)
    inputs, labels = samples[:, :-1].contiguous(), samples[:, 1:].contiguous()
    return list(zip(inputs.split(per_rank), labels.split(per_rank)))


@dataclass(frozen=True)
class StepBatch:
    """One step's rows on this rank, ready on the training device."""

    step: int
    cursor: int
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
    """``grad_accum`` pairs of ``(inputs, labels)``, each ``[micro_batch, seq_len]`` int64, contiguous."""
    digest: bytes
    """sha256 of the step's input rows on this rank: the link input of the run's data fingerprint."""
    tokens: int
    """Input tokens on this rank."""
    ready: Optional[Any] = None
    """A CUDA event the copy to the device recorded (the consuming stream waits on it)."""


class Prefetcher:
    """Reads step ``s + 1``'s rows in a background thread while step ``s`` trains.

    ``get(step, cursor)`` returns the prefetched batch when it is the one asked for (the usual case) and reads it
    now otherwise (the first step, after a rollback), then starts reading the step after. On CUDA the rows are
    pinned and copied on a side stream; the batch's event orders the copy before the step's kernels."""

    def __init__(self, sampler: TokenSampler, schedule: Schedule, rank: int, device: torch.device,
                 fixed_stage: Optional[Stage] = None) -> None:
        """``fixed_stage``: every step has that stage's shape, without end (``bench`` times one shape at a time)."""
        self.sampler = sampler
        self.schedule = schedule
        self.rank = rank
        self.device = device
        self.fixed_stage = fixed_stage
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: Optional[tuple[tuple[int, int], Future[StepBatch]]] = None

    def load(self, stage: Stage, step: int, cursor: int) -> StepBatch:
        """Step ``step``'s rows on this rank, drawn from ``cursor``, copied to the device."""
        micro_batches = self.sampler.step_micro_batches(stage, cursor, self.rank, self.schedule.mode)
        digest = hashlib.sha256()
        for inputs, _ in micro_batches:
            digest.update(inputs.numpy().tobytes())
        tokens = sum(inputs.numel() for inputs, _ in micro_batches)
        if self._stream is None:
            pairs = [(x.contiguous(), y.contiguous()) for x, y in micro_batches]
            return StepBatch(step, cursor, pairs, digest.digest(), tokens)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            pairs = [(x.contiguous().pin_memory().to(self.device, non_blocking=True),
                      y.contiguous().pin_memory().to(self.device, non_blocking=True)) for x, y in micro_batches]
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return StepBatch(step, cursor, pairs, digest.digest(), tokens, ready)

    def get(self, step: int, cursor: int) -> StepBatch:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (step, cursor):
            batch = pending[1].result()
        else:
            batch = self.load(self._stage_at(step), step, cursor)
        if batch.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(batch.ready)
            for inputs, labels in batch.micro_batches:  # memory made on the side stream, used on this one
                inputs.record_stream(current)
                labels.record_stream(current)
        following = step + 1
        if self.fixed_stage is not None or following < self.schedule.total_steps:
            next_cursor = cursor + self._stage_at(step).samples_per_step
            self._pending = ((following, next_cursor),
                             self._pool.submit(self.load, self._stage_at(following), following, next_cursor))
        return batch

    def _stage_at(self, step: int) -> Stage:
        return self.fixed_stage if self.fixed_stage is not None else self.schedule.stage_at(step)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class RunData:
    """What a run reads from its data directory: the manifest, the training sampler and the evaluation set (on
    the training device)."""

    manifest: dict[str, Any]
    sampler: TokenSampler
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]]


def load_run_data(config: Any, schedule: Schedule, rank: int, world_size: int, device: torch.device) -> RunData:
    """The data directory of ``config`` checked and opened, before anything is built or written: every problem is
    a ``ConfigError`` on ``data.dir`` (``pipeline.data``: the manifest, the token files and their ids, and with
    ``run.export`` the tokenizer the model is exported with)."""
    from pipeline.data import check_tokenizer, load_tokens, read_manifest

    manifest = read_manifest(config.data.dir)
    if config.run.export:
        check_tokenizer(config.data.dir, manifest)
    sampler = TokenSampler(load_tokens(config.data.dir, "train"), schedule.max_seq_len, config.run.seed)
    # evaluation at the full length, never at the curriculum's current length
    batches = eval_batches(load_tokens(config.data.dir, "val"), schedule.max_seq_len, config.run.eval_batch,
                           config.run.eval_batches, rank, world_size)
    return RunData(manifest, sampler, [(x.to(device), y.to(device)) for x, y in batches])
