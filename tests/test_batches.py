"""The training batches: ``shape_batch`` on hand-made tensors, the sampler's order, and rank sharding.

Token files here are ``arange``: token ``t`` has the value ``t``, so a row's values say exactly where in the file it
came from, and "every token once" or "ranks are disjoint" can be checked by value. Ranks are faked by calling
``step_micro_batches`` with each ``rank`` of a schedule built for ``world_size`` ranks; no processes are started.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from conftest import make_config

from curriculum.errors import ConfigError
from curriculum.schedule import Schedule, Stage, build_schedule
from pipeline.batches import TokenSampler, eval_batches, shape_batch

Mode = Literal["truncate", "reshape"]


def file_of(num_tokens: int) -> np.ndarray:
    """A token file whose token ``t`` is ``t`` (uint16, like a prepared ``train.bin``)."""
    return np.arange(num_tokens, dtype=np.uint16)


# --------------------------------------------------------------------------------------------------- shape_batch

# two samples of L_max = 8 (+1 for the last label): sample 0 is 0..8, sample 1 is 10..18
SAMPLES = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8],
                        [10, 11, 12, 13, 14, 15, 16, 17, 18]])


def test_truncate_keeps_the_first_tokens_of_each_sample() -> None:
    inputs, labels = shape_batch(SAMPLES, 4, "truncate")
    assert inputs.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]  # rows = samples, the first 4 tokens
    assert labels.tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]  # shifted by one


def test_truncate_of_a_sample_read_at_the_stage_length() -> None:
    """The sampler reads only ``L + 1`` tokens when truncating; the result is the same."""
    inputs, labels = shape_batch(SAMPLES[:, :5], 4, "truncate")
    assert inputs.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert labels.tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]


def test_truncate_at_full_length_is_the_whole_sample() -> None:
    inputs, labels = shape_batch(SAMPLES, 8, "truncate")
    assert torch.equal(inputs, SAMPLES[:, :-1]) and torch.equal(labels, SAMPLES[:, 1:])


def test_reshape_cuts_each_sample_into_rows() -> None:
    # rows = n * L_max / L = 2 * 8 / 4 = 4
    inputs, labels = shape_batch(SAMPLES, 4, "reshape")
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13], [14, 15, 16, 17]]
    # within a sample the label of a row's last token is the next row's first input (and 8, 18 end the samples)
    assert labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [11, 12, 13, 14], [15, 16, 17, 18]]


@pytest.mark.parametrize("seq_len", [1, 2, 4, 8])
def test_reshape_uses_every_input_token_once(seq_len: int) -> None:
    inputs, labels = shape_batch(SAMPLES, seq_len, "reshape")
    assert inputs.shape == (2 * 8 // seq_len, seq_len)
    assert sorted(inputs.flatten().tolist()) == sorted(SAMPLES[:, :-1].flatten().tolist())
    # the label of every input token is the token after it in the same sample
    position = {value: (row, col) for row, sample in enumerate(SAMPLES.tolist()) for col, value in enumerate(sample)}
    for x, y in zip(inputs.flatten().tolist(), labels.flatten().tolist()):
        row, col = position[x]
        assert y == SAMPLES[row, col + 1]


# --------------------------------------------------------------------------------------------------- TokenSampler


def test_sample_k_is_its_window_of_the_file() -> None:
    """Sample ``k`` is tokens ``[k L_max, k L_max + L_max + 1)``; ``read`` gives its first ``length``."""
    sampler = TokenSampler(file_of(5 * 8 + 1), max_seq_len=8, seed=0)  # (41 - 1) // 8 = 5 samples
    assert sampler.num_samples == 5
    rows = sampler.read(np.array([4, 0, 2]), 9)
    assert rows.dtype == torch.int64
    assert rows.tolist() == [list(range(32, 41)), list(range(0, 9)), list(range(16, 25))]
    assert sampler.read(np.array([1]), 3).tolist() == [[8, 9, 10]]


def test_samples_round_down_to_whole_windows() -> None:
    # 44 tokens: (44 - 1) // 8 = 5 samples; tokens 41..43 are never a sample's start
    assert TokenSampler(file_of(44), max_seq_len=8, seed=0).num_samples == 5
    # a sample needs L_max + 1 tokens: 40 tokens hold only (40 - 1) // 8 = 4
    assert TokenSampler(file_of(40), max_seq_len=8, seed=0).num_samples == 4


def test_same_seed_same_order_other_seed_other_order() -> None:
    tokens = file_of(50 * 8 + 1)  # 50 samples: two seeds agreeing by chance is a 1 in 50! event
    first = TokenSampler(tokens, 8, seed=3).sample_ids(0, 120)
    assert np.array_equal(first, TokenSampler(tokens, 8, seed=3).sample_ids(0, 120))
    assert not np.array_equal(first, TokenSampler(tokens, 8, seed=4).sample_ids(0, 120))


def test_every_epoch_is_a_permutation_of_all_samples() -> None:
    sampler = TokenSampler(file_of(50 * 8 + 1), 8, seed=1)
    epochs = [sampler.sample_ids(epoch * 50, 50) for epoch in range(3)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(50))
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch is shuffled anew
    assert not np.array_equal(epochs[1], epochs[2])


def test_sample_ids_across_an_epoch_boundary() -> None:
    """Positions 3..8 with 5 samples per epoch: the last two of epoch 0, then the first four of epoch 1."""
    sampler = TokenSampler(file_of(5 * 8 + 1), 8, seed=7)
    epoch0, epoch1 = sampler.sample_ids(0, 5), sampler.sample_ids(5, 5)
    across = sampler.sample_ids(3, 6)
    assert across.tolist() == epoch0[3:].tolist() + epoch1[:4].tolist()
    # the cursor is the whole state: drawing in pieces gives the same ids as drawing at once
    assert np.concatenate([sampler.sample_ids(0, 3), sampler.sample_ids(3, 4), sampler.sample_ids(7, 3)]).tolist() \
        == sampler.sample_ids(0, 10).tolist()


@pytest.mark.parametrize("num_tokens", [0, 1, 8])
def test_too_few_tokens_for_one_sample(num_tokens: int) -> None:
    # one sample of L_max = 8 needs 9 tokens
    with pytest.raises(ConfigError) as err:
        TokenSampler(file_of(num_tokens), max_seq_len=8, seed=0)
    assert err.value.field == "data.dir"
    assert "9 tokens" in str(err.value)


def test_exactly_one_sample() -> None:
    sampler = TokenSampler(file_of(9), max_seq_len=8, seed=0)
    assert sampler.num_samples == 1
    assert sampler.sample_ids(0, 3).tolist() == [0, 0, 0]


# --------------------------------------------------------------------------------------------------- rank sharding

MAX_SEQ_LEN = 32
NUM_SAMPLES = 10  # short, so the cursors below cross epoch boundaries

STAGES: dict[str, list[dict[str, int]]] = {
    # global batch 8 and 4: per-rank 8/4/2 and 4/2/1 rows at world sizes 1/2/4
    "truncate": [
        {"until_step": 2, "seq_len": 16, "global_batch": 8, "micro_batch": 2},
        {"until_step": 4, "seq_len": 32, "global_batch": 4, "micro_batch": 1},
    ],
    # samples_per_step = global_batch * seq_len / 32:
    # stage 0: 8 rows x 8 = 64 tokens = 2 samples of 4 rows; at world size 4 a rank's 2 rows may start mid-sample
    # stage 1: 8 rows x 16 = 128 tokens = 4 samples of 2 rows; stage 2: 4 rows x 32 = 128 tokens = 4 samples
    "reshape": [
        {"until_step": 2, "seq_len": 8, "global_batch": 8, "micro_batch": 1},
        {"until_step": 4, "seq_len": 16, "global_batch": 8, "micro_batch": 2},
        {"until_step": 6, "seq_len": 32, "global_batch": 4, "micro_batch": 1},
    ],
}


def schedule_for(mode: Mode, world_size: int) -> Schedule:
    config = make_config({"mode": mode, "stages": STAGES[mode]})
    return build_schedule(config, world_size)


def sampler() -> TokenSampler:
    return TokenSampler(file_of(NUM_SAMPLES * MAX_SEQ_LEN + 1), MAX_SEQ_LEN, seed=11)


def all_rows(stage: Stage, cursor: int, mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's micro-batches of one step, concatenated in rank order."""
    batches = [batch for rank in range(stage.world_size)
               for batch in sampler().step_micro_batches(stage, cursor, rank, mode)]
    return torch.cat([inputs for inputs, _ in batches]), torch.cat([labels for _, labels in batches])


@pytest.mark.parametrize("mode", ["truncate", "reshape"])
def test_world_size_1_rows_are_the_step_samples_shaped(mode: Mode) -> None:
    """At world size 1 a step's rows are ``shape_batch`` of the ``samples_per_step`` samples from the cursor."""
    data = sampler()
    for stage in schedule_for(mode, 1).stages:
        for cursor in (0, 7, 9):
            samples = data.read(data.sample_ids(cursor, stage.samples_per_step), MAX_SEQ_LEN + 1)
            expected_inputs, expected_labels = shape_batch(samples, stage.seq_len, mode)
            inputs, labels = all_rows(stage, cursor, mode)
            assert torch.equal(inputs, expected_inputs) and torch.equal(labels, expected_labels)
            assert inputs.shape == (stage.global_batch, stage.seq_len)


@pytest.mark.parametrize("mode", ["truncate", "reshape"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_split_the_world_size_1_rows(mode: Mode, world_size: int) -> None:
    """The ranks' rows are disjoint and, in rank order, exactly the rows one process would train on."""
    single = schedule_for(mode, 1)
    sharded = schedule_for(mode, world_size)
    for one, stage in zip(single.stages, sharded.stages):
        assert stage.samples_per_step == one.samples_per_step  # the cursor advances the same at any world size
        for cursor in (0, 7, 9):  # 7 + 4 samples and 9 + 2 cross the end of epoch 0 (10 samples)
            inputs, labels = all_rows(stage, cursor, mode)
            expected_inputs, expected_labels = all_rows(one, cursor, mode)
            assert torch.equal(inputs, expected_inputs) and torch.equal(labels, expected_labels)
        # Inside one epoch a step takes no sample twice, and the file is arange, so a row's first token names the
        # row: the ranks' rows are disjoint by value. (Across an epoch boundary the same sample may come back from
        # the next epoch's order; the equality above already shows each row position goes to one rank.)
        firsts = [{int(inputs[row, 0]) for inputs, _ in sampler().step_micro_batches(stage, 0, rank, mode)
                   for row in range(inputs.shape[0])}
                  for rank in range(world_size)]
        assert sum(len(rows) for rows in firsts) == stage.global_batch
        assert len(set().union(*firsts)) == stage.global_batch


@pytest.mark.parametrize("mode", ["truncate", "reshape"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_micro_batches_per_rank(mode: Mode, world_size: int) -> None:
    """grad_accum micro-batches of micro_batch rows of seq_len on each rank; labels are inputs shifted by one."""
    for stage in schedule_for(mode, world_size).stages:
        # micro_batch x grad_accum x world_size = global_batch
        assert stage.micro_batch * stage.grad_accum * world_size == stage.global_batch
        for rank in range(world_size):
            micro_batches = sampler().step_micro_batches(stage, 3, rank, mode)
            assert len(micro_batches) == stage.grad_accum
            for inputs, labels in micro_batches:
                assert inputs.shape == labels.shape == (stage.micro_batch, stage.seq_len)
                assert inputs.dtype == labels.dtype == torch.int64
                # within a sample of an arange file, the next token is the value + 1
                assert torch.equal(labels, inputs + 1)


def test_reshape_rank_starting_mid_sample() -> None:
    """Reshape stage 0 at world size 4: 2 rows per rank, 4 rows per sample, so ranks 1 and 3 start mid-sample."""
    stage = schedule_for("reshape", 4).stages[0]
    data = sampler()
    first, second = data.sample_ids(0, 2).tolist()  # the step's two samples
    starts = [[int(inputs[0, 0]) for inputs, _ in data.step_micro_batches(stage, 0, rank, "reshape")]
              for rank in range(4)]
    # sample k starts at token 32 k; rows of 8 tokens
    assert starts == [[32 * first, 32 * first + 8], [32 * first + 16, 32 * first + 24],
                      [32 * second, 32 * second + 8], [32 * second + 16, 32 * second + 24]]


# --------------------------------------------------------------------------------------------------- eval_batches


def test_eval_batches_at_full_length_disjoint_and_fixed() -> None:
    """Batches of 4 windows over 2 ranks: each rank evaluates 2 rows of each of the 3 batches."""
    tokens = file_of(20 * 16 + 1)  # 20 windows of 16
    per_rank = [eval_batches(tokens, seq_len=16, batch=4, num_batches=3, rank=rank, world_size=2)
                for rank in range(2)]
    starts = []
    for batches in per_rank:
        assert len(batches) == 3
        for inputs, labels in batches:
            assert inputs.shape == labels.shape == (2, 16)
            assert torch.equal(labels, inputs + 1)
            assert all(int(x) % 16 == 0 for x in inputs[:, 0])  # consecutive windows of the file
            starts += inputs[:, 0].tolist()
    assert len(starts) == len(set(starts)) == 12  # 2 ranks x 3 batches x 2 rows, no window twice
    again = eval_batches(tokens, seq_len=16, batch=4, num_batches=3, rank=1, world_size=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, per_rank[1]))


def test_eval_batches_shrink_when_the_split_is_short() -> None:
    # 5 windows of 16, batches of 4 over 2 ranks: one whole batch (2 windows each), the fifth window unused
    tokens = file_of(5 * 16 + 1)
    for rank in range(2):
        batches = eval_batches(tokens, seq_len=16, batch=4, num_batches=3, rank=rank, world_size=2)
        assert [tuple(inputs.shape) for inputs, _ in batches] == [(2, 16)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_evaluation_set_does_not_depend_on_the_world_size(world_size: int) -> None:
    """The windows all ranks evaluate together are the windows one rank evaluates alone: the first
    ``batch x num_batches`` of the file, each once."""
    tokens = file_of(40 * 16 + 1)
    alone = torch.cat([x for x, _ in eval_batches(tokens, seq_len=16, batch=8, num_batches=3, rank=0, world_size=1)])
    shared = torch.cat([x for rank in range(world_size)
                        for x, _ in eval_batches(tokens, seq_len=16, batch=8, num_batches=3, rank=rank,
                                                 world_size=world_size)])
    assert sorted(alone[:, 0].tolist()) == sorted(shared[:, 0].tolist()) == [16 * k for k in range(24)]


def test_an_evaluation_batch_must_split_over_the_ranks() -> None:
    with pytest.raises(ConfigError, match="run.eval_batch = 6: must be divisible by the world size 4"):
        eval_batches(file_of(40 * 16 + 1), seq_len=16, batch=6, num_batches=1, rank=0, world_size=4)


@pytest.mark.parametrize(("num_tokens", "world_size"), [(16, 1), (16 + 1, 2), (2 * 16, 2)])
def test_too_short_validation_data(num_tokens: int, world_size: int) -> None:
    """One 16-token window needs 17 tokens; each rank needs one."""
    with pytest.raises(ConfigError) as err:
        eval_batches(file_of(num_tokens), seq_len=16, batch=2, num_batches=1, rank=0, world_size=world_size)
    assert err.value.field == "data.dir"
    assert "validation tokens" in str(err.value)
