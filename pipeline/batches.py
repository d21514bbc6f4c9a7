"""From the packed token file to the micro-batches of one optimizer step.

A *sample* is a full-length window: sample ``k`` is tokens ``[k * L_max, k * L_max + L_max + 1)`` of the training
file (``L_max + 1`` so the last position has a label). Samples are visited in a permuted order that is a pure
function of ``(seed, epoch)``; the *cursor* counts samples drawn so far over all ranks and is the sampler's whole
state (it goes into the checkpoint).

Each step draws ``stage.samples_per_step`` samples starting at the cursor. ``shape_batch`` turns them into rows of
the stage's length: ``truncate`` keeps the first ``L + 1`` tokens of each sample; ``reshape`` cuts each sample into
``L_max / L`` rows so no token is skipped. Rank ``r`` of ``W`` takes rows ``[r B / W, (r + 1) B / W)`` of the
step's ``B`` rows and splits them into ``grad_accum`` micro-batches of ``micro_batch`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from curriculum.errors import ConfigError
from curriculum.schedule import Stage


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
    """Validation batches at full length: consecutive windows of the held-out file, the same every evaluation,
    dealt out round-robin to ranks. Fewer batches when the split is short; at least one window is required."""
    available = (len(tokens) - 1) // seq_len
    if available < world_size:
        raise ConfigError("data.dir", f"{len(tokens)} validation tokens",
                          f"too few for one {seq_len}-token evaluation sequence per rank; prepare the data with a "
                          "larger --val-fraction")
    per_rank = min(batch * num_batches, available // world_size)
    sampler = TokenSampler(tokens, seq_len, seed=0)
    ids = np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)
    samples = sampler.read(ids, seq_len + 1)
    inputs, labels = samples[:, :-1], samples[:, 1:]
    return list(zip(inputs.split(batch), labels.split(batch)))
