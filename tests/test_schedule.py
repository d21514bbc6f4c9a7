"""Golden tables for the resolved schedule: every expected number is worked out by hand in the comments.

Steps count from 0 and a stage covers ``[start_step, end_step)``. Each table pins step 0, step 1, both sides of every
stage edge, the last step, and ``total_steps`` (valid only for ``tokens_before``); one past it raises.

Warmup reaches the peak at the last warmup step: step ``k`` of a stage (``k < warmup``) has
``lr = start + (peak - start) * (k + 1) / warmup``. After warmup, ``progress = (k - warmup) / (steps - warmup)``;
cosine is ``min + (peak - min) * 0.5 * (1 + cos(pi * progress))``, linear is ``peak - (peak - min) * progress``.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
from conftest import make_config

from curriculum.config import ClipRule, GradClipAutoConfig, LRScalingConfig
from curriculum.errors import ConfigError
from curriculum.loading import load_config
from curriculum.schedule import Schedule, auto_grad_clip, build_schedule, cut_schedule, rule_lr

Row = tuple[int, int, float, float, int]
"""(seq_len, global_batch, lr, grad_clip, tokens_before) at one step."""


def row(schedule: Schedule, step: int) -> Row:
    return (schedule.seq_len_at(step), schedule.global_batch_at(step), schedule.lr_at(step),
            schedule.grad_clip_at(step), schedule.tokens_before(step))


def assert_table(schedule: Schedule, expected: dict[int, Row]) -> None:
    for step, (seq_len, global_batch, lr, grad_clip, tokens) in expected.items():
        got = row(schedule, step)
        assert got[0] == seq_len, f"seq_len at step {step}"
        assert got[1] == global_batch, f"global_batch at step {step}"
        assert got[2] == pytest.approx(lr, rel=1e-12, abs=0.0), f"lr at step {step}"
        assert got[3] == grad_clip, f"grad_clip at step {step}"
        assert got[4] == tokens, f"tokens_before at step {step}"


def assert_ends_at(schedule: Schedule, total_steps: int, total_tokens: int) -> None:
    assert schedule.total_steps == total_steps
    assert schedule.total_tokens == total_tokens
    assert schedule.tokens_before(total_steps) == total_tokens  # the step after the last one: valid for tokens
    for method in (schedule.stage_at, schedule.seq_len_at, schedule.global_batch_at, schedule.lr_at,
                   schedule.grad_clip_at):
        with pytest.raises(ValueError):
            method(total_steps)
        with pytest.raises(ValueError):
            method(-1)
    with pytest.raises(ValueError):
        schedule.tokens_before(total_steps + 1)


def cosine(peak: float, min_lr: float, progress: float) -> float:
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------- (a) seed003


@pytest.fixture(scope="module")
def seed003() -> Schedule:
    return build_schedule(load_config("seed003", environ={}), world_size=1)


# Peaks: base_lr 6e-4 x lr_mult; min = 0.1 x peak; all cosine.
#   stage 0: 11.3 * 6e-4 = 6.78e-3   (min 6.78e-4)  steps    0-1999, warmup 500, 256 x 64   = 16,384 tok/step
#   stage 1:  7.0 * 6e-4 = 4.2e-3    (min 4.2e-4)   steps 2000-3999, warmup 300, 128 x 128  = 16,384
#   stage 2:  3.5 * 6e-4 = 2.1e-3    (min 2.1e-4)   steps 4000-5999, warmup 200,  64 x 256  = 16,384
#   stage 3:  1.5 * 6e-4 = 9e-4      (min 9e-5)     steps 6000-7999, warmup 100,  32 x 512  = 16,384
#   stage 4:  0.7 * 6e-4 = 4.2e-4    (min 4.2e-5)   steps 8000-9999, warmup 100,  16 x 1024 = 16,384
# Each stage's warmup starts from the LR the previous stage ended at (warmup_start: previous).
# Last step of stage 0: k = 1999, progress = (1999 - 500) / (2000 - 500) = 1499/1500
SEED_END_0 = cosine(6.78e-3, 6.78e-4, 1499 / 1500)  # ~6.780067e-4
# Last of stage 1: k = 1999, progress = (1999 - 300) / (2000 - 300) = 1699/1700
SEED_END_1 = cosine(4.2e-3, 4.2e-4, 1699 / 1700)  # ~4.200032e-4
SEED_END_2 = cosine(2.1e-3, 2.1e-4, 1799 / 1800)  # (1999 - 200) / (2000 - 200)
SEED_END_3 = cosine(9e-4, 9e-5, 1899 / 1900)  # (1999 - 100) / (2000 - 100)
SEED_END_4 = cosine(4.2e-4, 4.2e-5, 1899 / 1900)

SEED003_TABLE: dict[int, Row] = {
    # step: (seq_len, batch, lr, clip, tokens_before = 16,384 x step)
    0: (64, 256, 6.78e-3 * 1 / 500, 5.0, 0),  # 1.356e-5
    1: (64, 256, 6.78e-3 * 2 / 500, 5.0, 16_384),  # 2.712e-5
    499: (64, 256, 6.78e-3, 5.0, 499 * 16_384),  # last warmup step is the peak
    500: (64, 256, 6.78e-3, 5.0, 500 * 16_384),  # decay progress 0: still the peak
    1999: (64, 256, SEED_END_0, 5.0, 1999 * 16_384),
    2000: (128, 128, SEED_END_0 + (4.2e-3 - SEED_END_0) * 1 / 300, 2.0, 32_768_000),
    2299: (128, 128, 4.2e-3, 2.0, 2299 * 16_384),
    3999: (128, 128, SEED_END_1, 2.0, 3999 * 16_384),
    4000: (256, 64, SEED_END_1 + (2.1e-3 - SEED_END_1) * 1 / 200, 1.0, 65_536_000),
    5999: (256, 64, SEED_END_2, 1.0, 5999 * 16_384),
    6000: (512, 32, SEED_END_2 + (9e-4 - SEED_END_2) * 1 / 100, 0.5, 98_304_000),
    7999: (512, 32, SEED_END_3, 0.5, 7999 * 16_384),
    8000: (1024, 16, SEED_END_3 + (4.2e-4 - SEED_END_3) * 1 / 100, 0.3, 131_072_000),
    8099: (1024, 16, 4.2e-4, 0.3, 8099 * 16_384),
    9999: (1024, 16, SEED_END_4, 0.3, 9999 * 16_384),  # 163,823,616
}


def test_seed003_golden_table(seed003: Schedule) -> None:
    """seed003 at world size 1: length, batch, LR, clip and tokens at step 0, 1, every stage edge and the end."""
    assert_table(seed003, SEED003_TABLE)


def test_seed003_ends_at_10000_steps(seed003: Schedule) -> None:
    """10,000 steps x 16,384 tokens = 163,840,000 tokens; step 10,000 is past the run."""
    assert_ends_at(seed003, 10_000, 163_840_000)


def test_seed003_stage_columns(seed003: Schedule) -> None:
    """Per-stage peak LR (base_lr x lr_mult), rule LR (seed rule), warmup, clip and step ranges."""
    stages = seed003.stages
    assert [(s.start_step, s.end_step) for s in stages] == [(0, 2000), (2000, 4000), (4000, 6000), (6000, 8000),
                                                            (8000, 10000)]
    assert [s.peak_lr for s in stages] == pytest.approx([6.78e-3, 4.2e-3, 2.1e-3, 9e-4, 4.2e-4], rel=1e-12)
    assert [s.lr_source for s in stages] == ["multiplier"] * 5
    # seed rule: 6e-4 * sqrt(b / 32) * min(2048 / L, 4)
    #   256 x 64:   6e-4 * sqrt(8)   * 4 = 6.788e-3
    #   128 x 128:  6e-4 * 2         * 4 = 4.8e-3
    #    64 x 256:  6e-4 * sqrt(2)   * 4 = 3.394e-3
    #    32 x 512:  6e-4 * 1         * 4 = 2.4e-3
    #    16 x 1024: 6e-4 * sqrt(0.5) * 2 = 8.485e-4
    assert [s.rule_lr for s in stages] == pytest.approx(
        [6e-4 * math.sqrt(8) * 4, 4.8e-3, 6e-4 * math.sqrt(2) * 4, 2.4e-3, 6e-4 * math.sqrt(0.5) * 2], rel=1e-12)
    assert [s.warmup_steps for s in stages] == [500, 300, 200, 100, 100]
    assert [s.grad_clip for s in stages] == [5.0, 2.0, 1.0, 0.5, 0.3]
    assert [s.tokens_per_step for s in stages] == [16_384] * 5
    assert [s.start_tokens for s in stages] == [0, 32_768_000, 65_536_000, 98_304_000, 131_072_000]


# --------------------------------------------------------------------------------------------------- (b) 3 stages

# Every stage is 2,048 tokens per step: 32 x 64 = 8 x 256 = 2 x 1024.
HAND_WRITTEN = {
    "base_lr": 1.0e-3,
    "lr_scaling": {"rule": "linear", "ref_batch": 32},
    "warmup_cap_steps": 5,
    "micro_batch_tokens": 1024,
    "stages": [
        # until 20,480 tokens: ceil(20480 / 2048) = 10 steps (0-9). warmup ceil(4096 / 2048) = 2 steps.
        {"until_tokens": 20_480, "seq_len": 64, "global_batch": 32, "lr": 2.0e-3, "warmup_tokens": 4096,
         "decay": "cosine", "min_lr_ratio": 0.1},
        # until 45,000 tokens: ceil((45000 - 20480) / 2048) = ceil(11.97) = 12 steps (10-21), ends at 45,056.
        # warmup ceil(100000 / 2048) = 49 steps, capped at warmup_cap_steps = 5.
        {"until_tokens": 45_000, "seq_len": 256, "global_batch": 8, "lr_mult": 1.5, "warmup_tokens": 100_000,
         "decay": "linear", "min_lr_ratio": 0.5},
        # ends with run.total_tokens 90,000: ceil((90000 - 45056) / 2048) = ceil(21.95) = 22 steps (22-43).
        {"seq_len": 1024, "global_batch": 2, "lr": "auto", "warmup_steps": 0, "decay": "constant"},
    ],
    "lr_events": [{"at_step": 15, "multiply": 0.5}],
}
HAND_RUN = {"total_tokens": 90_000}

# stage 0: peak 2e-3 (absolute), min 2e-4; last step k = 9: progress (9 - 2) / (10 - 2) = 7/8
HAND_END_0 = cosine(2e-3, 2e-4, 7 / 8)  # 2e-4 + 1.8e-3 * 0.5 * (1 + cos(7pi/8)) = ~2.68508e-4
# stage 1: peak 1.5 * 1e-3 = 1.5e-3, min 0.5 * 1.5e-3 = 7.5e-4, linear; last step k = 11: progress (11 - 5) / 7
HAND_END_1 = 1.5e-3 - 7.5e-4 * 6 / 7  # ~8.5714e-4
# stage 2: lr auto, linear rule: 1e-3 * 2 / 32 = 6.25e-5, constant
HAND_LR_2 = 6.25e-5


def hand_table(first_warmup_lr_1: float) -> dict[int, Row]:
    return {
        # step: (seq_len, batch, lr, clip (auto: 5.0 <= 128 < 1.0 <= 512 < 0.5), tokens_before)
        0: (64, 32, 2e-3 * 1 / 2, 5.0, 0),  # 1e-3
        1: (64, 32, 2e-3, 5.0, 2048),  # warmup done: the peak
        2: (64, 32, 2e-3, 5.0, 4096),  # decay progress 0
        9: (64, 32, HAND_END_0, 5.0, 18_432),  # 9 x 2048
        10: (256, 8, first_warmup_lr_1, 1.0, 20_480),  # stage 1 starts at 10 x 2048 tokens
        14: (256, 8, 1.5e-3, 1.0, 28_672),  # k = 4: (4 + 1) / 5 -> peak; 20480 + 4 x 2048
        15: (256, 8, 1.5e-3 * 0.5, 1.0, 30_720),  # decay progress 0, LR event x0.5 from step 15: 7.5e-4
        21: (256, 8, HAND_END_1 * 0.5, 1.0, 43_008),  # ~4.2857e-4; 20480 + 11 x 2048
        22: (1024, 2, HAND_LR_2 * 0.5, 0.5, 45_056),  # 3.125e-5, still under the event
        43: (1024, 2, HAND_LR_2 * 0.5, 0.5, 88_064),  # 45056 + 21 x 2048
    }


def test_hand_written_three_stages_warmup_from_previous() -> None:
    """until_tokens ends, warmup_tokens with a cap, an LR event, three decays; warmup starts at the previous LR."""
    schedule = build_schedule(make_config(HAND_WRITTEN, HAND_RUN))
    # step 10: k = 0 of 5 warmup steps from HAND_END_0: E + (1.5e-3 - E) * 1/5 = ~5.1481e-4
    assert_table(schedule, hand_table(HAND_END_0 + (1.5e-3 - HAND_END_0) * 1 / 5))
    assert_ends_at(schedule, 44, 90_112)  # 45,056 + 22 x 2,048


def test_hand_written_three_stages_warmup_from_zero() -> None:
    """The same run with warmup_start: zero: stage 1 warms up from 0, everything else is unchanged."""
    schedule = build_schedule(make_config({**HAND_WRITTEN, "warmup_start": "zero"}, HAND_RUN))
    assert_table(schedule, hand_table(1.5e-3 * 1 / 5))  # 3e-4
    assert_ends_at(schedule, 44, 90_112)


def test_hand_written_stage_columns() -> None:
    """Stage ranges, warmup (token-derived, capped), peak/rule LRs, micro-batches from micro_batch_tokens."""
    stages = build_schedule(make_config(HAND_WRITTEN, HAND_RUN)).stages
    assert [(s.start_step, s.end_step) for s in stages] == [(0, 10), (10, 22), (22, 44)]
    assert [s.end_tokens for s in stages] == [20_480, 45_056, 90_112]
    assert [s.warmup_steps for s in stages] == [2, 5, 0]
    assert [s.lr_source for s in stages] == ["absolute", "multiplier", "auto"]
    # linear rule: 1e-3 * b / 32 -> 1e-3, 2.5e-4, 6.25e-5
    assert [s.rule_lr for s in stages] == pytest.approx([1e-3, 2.5e-4, 6.25e-5], rel=1e-12)
    # micro_batch_tokens 1024: 16 x 64, 4 x 256, 1 x 1024, each with 2 accumulation steps
    assert [(s.micro_batch, s.grad_accum) for s in stages] == [(16, 2), (4, 2), (1, 2)]


def test_until_step_and_until_tokens_agree() -> None:
    """A stage ending at a token count that is a whole number of steps ends at exactly that step."""
    by_tokens = build_schedule(make_config({"stages": [
        {"until_tokens": 10 * 2048, "seq_len": 64, "global_batch": 32},
        {"until_tokens": 10 * 2048 + 3 * 4096, "seq_len": 128, "global_batch": 32}]}))
    assert [(s.start_step, s.end_step) for s in by_tokens.stages] == [(0, 10), (10, 13)]
    assert by_tokens.total_tokens == 32_768  # 10 x 2048 + 3 x 4096


# --------------------------------------------------------------------------------------------------- run.max_steps

# The hand-written run (stages 0-9, 10-21, 22-43; warmups 2, 5, 0; 2,048 tokens per step; LR event at 15) cut at N:
# N: (stage ranges, tokens, warmup steps per stage, LR events kept)
CUTS = {
    1: ([(0, 1)], 2_048, [1], ()),  # inside stage 0's warmup: the warmup ends with the run
    5: ([(0, 5)], 10_240, [2], ()),  # inside stage 0, after its warmup
    10: ([(0, 10)], 20_480, [2], ()),  # at the edge: stage 0 whole, stages 1 and 2 dropped
    11: ([(0, 10), (10, 11)], 22_528, [2, 1], ()),  # one step of stage 1: 20,480 + 2,048
    15: ([(0, 10), (10, 15)], 30_720, [2, 5], ()),  # the LR event at step 15 is past the end
    16: ([(0, 10), (10, 16)], 32_768, [2, 5], ((15, 0.5),)),
    43: ([(0, 10), (10, 22), (22, 43)], 88_064, [2, 5, 0], ((15, 0.5),)),  # the last step of the plan dropped
}


@pytest.mark.parametrize("max_steps", sorted(CUTS))
def test_max_steps_cuts_the_plan_and_keeps_every_step_before_the_cut(max_steps: int) -> None:
    """run.max_steps N: the stage holding step N - 1 ends at N, later stages and LR events go; every step before N
    has the full plan's length, batch, LR, clip and tokens (the LR windows are not rescaled)."""
    full = build_schedule(make_config(HAND_WRITTEN, HAND_RUN))
    cut = build_schedule(make_config(HAND_WRITTEN, {**HAND_RUN, "max_steps": max_steps}))
    ranges, tokens, warmups, events = CUTS[max_steps]
    assert [(s.start_step, s.end_step) for s in cut.stages] == ranges
    assert [s.warmup_steps for s in cut.stages] == warmups
    assert cut.lr_events == events
    assert cut.cut_from == 44
    assert_ends_at(cut, max_steps, tokens)
    assert_table(cut, {step: row(full, step) for step in range(max_steps)})
    assert cut.tokens_before(max_steps) == full.tokens_before(max_steps)
    assert cut.max_seq_len == full.max_seq_len == 1024  # evaluation stays at the full length


@pytest.mark.parametrize("max_steps", [44, 45, 10**12])
def test_max_steps_at_or_past_the_end_changes_nothing(max_steps: int) -> None:
    full = build_schedule(make_config(HAND_WRITTEN, HAND_RUN))
    assert build_schedule(make_config(HAND_WRITTEN, {**HAND_RUN, "max_steps": max_steps})) == full
    assert cut_schedule(full, max_steps) is full and full.cut_from is None


@pytest.mark.parametrize("max_steps", [0, -1])
def test_max_steps_must_be_positive(max_steps: int) -> None:
    """0 and negative values: refused by the config field and by ``cut_schedule`` itself."""
    with pytest.raises(ConfigError, match=rf"^run\.max_steps = {max_steps}: Input should be greater than 0$"):
        make_config(HAND_WRITTEN, {**HAND_RUN, "max_steps": max_steps})
    with pytest.raises(ConfigError, match=rf"^run\.max_steps = {max_steps}: must be a positive number of steps$"):
        cut_schedule(build_schedule(make_config(HAND_WRITTEN, HAND_RUN)), max_steps)


def test_max_steps_cuts_a_pacing_run_inside_a_plateau() -> None:
    """fixed_discrete 64 (steps 0-2), 128 (3-4), 256 (5-6) cut at 4: the 128 plateau ends there."""
    schedule = build_schedule(make_config(
        {"pacing": {"type": "fixed_discrete", "difficulty": [64, 128, 256], "max_step": [2, 4], "global_batch": 4,
                    "lr": 1e-3}}, {"total_steps": 7, "max_steps": 4}))
    assert [(s.start_step, s.end_step, s.seq_len) for s in schedule.stages] == [(0, 3, 64), (3, 4, 128)]
    assert schedule.total_tokens == 3 * 4 * 64 + 4 * 128 and schedule.max_seq_len == 256


# --------------------------------------------------------------------------------------------------- (c) reshape

RESHAPE = {
    "mode": "reshape",
    "base_lr": 1.0e-3,
    "lr_scaling": {"rule": "sqrt", "ref_batch": 16},
    "stages": [
        # no batch: keeps the last stage's 16 x 512 = 8,192 tokens/step -> 8192 / 128 = 64 rows (16 samples)
        {"until_step": 4, "seq_len": 128, "warmup_steps": 2},
        # explicit: 16 x 256 = 4,096 tokens/step (8 samples of 512), absolute LR
        {"until_step": 10, "seq_len": 256, "global_batch": 16, "lr": 5.0e-4},
        {"seq_len": 512, "global_batch": 16, "decay": "linear"},
    ],
}


def test_reshape_golden_table() -> None:
    """Reshape mode: default batches keep the full-length tokens per step; LR, clip and tokens at every edge."""
    schedule = build_schedule(make_config(RESHAPE, {"total_steps": 20}))
    # stage 0: auto sqrt rule: 1e-3 * sqrt(64 / 16) = 2e-3, min 2e-4, warmup 2, steps 0-3
    #   step 3: progress (3 - 2) / (4 - 2) = 1/2 -> 2e-4 + 1.8e-3 * 0.5 * (1 + cos(pi/2)) = 1.1e-3
    # stage 1: 5e-4 absolute, min 5e-5, no warmup, steps 4-9
    #   step 9: progress 5/6 -> 5e-5 + 4.5e-4 * 0.5 * (1 + cos(5pi/6)) = ~8.0144e-5
    # stage 2: auto 1e-3 * sqrt(16 / 16) = 1e-3, linear to 1e-4, steps 10-19
    #   step 19: progress 9/10 -> 1e-3 - 9e-4 * 0.9 = 1.9e-4
    # clip auto: 128 -> 5.0, 256 -> 1.0, 512 -> 1.0
    # tokens: stage 0 4 x 8192 = 32,768; stage 1 6 x 4096 = 24,576 (57,344); stage 2 10 x 8192 (139,264)
    assert_table(schedule, {
        0: (128, 64, 2e-3 * 1 / 2, 5.0, 0),
        1: (128, 64, 2e-3, 5.0, 8192),
        3: (128, 64, 1.1e-3, 5.0, 24_576),
        4: (256, 16, 5e-4, 1.0, 32_768),
        9: (256, 16, cosine(5e-4, 5e-5, 5 / 6), 1.0, 53_248),  # 32768 + 5 x 4096
        10: (512, 16, 1e-3, 1.0, 57_344),
        19: (512, 16, 1.9e-4, 1.0, 131_072),  # 57344 + 9 x 8192
    })
    assert_ends_at(schedule, 20, 139_264)
    assert schedule.mode == "reshape" and schedule.max_seq_len == 512
    # samples of 512 tokens per step: 64 x 128 / 512 = 16, 16 x 256 / 512 = 8, 16
    assert [s.samples_per_step for s in schedule.stages] == [16, 8, 16]


def test_truncate_samples_per_step_is_the_batch() -> None:
    """Truncate mode draws one full-length sample per row."""
    schedule = build_schedule(make_config({**RESHAPE, "mode": "truncate",
                                           "stages": [{**RESHAPE["stages"][0], "global_batch": 64},
                                                      *RESHAPE["stages"][1:]]}, {"total_steps": 20}))
    assert [s.samples_per_step for s in schedule.stages] == [64, 16, 16]


# --------------------------------------------------------------------------------------------------- pacing


def test_pacing_fixed_linear_table() -> None:
    """fixed_linear 64 -> 128 in increments of 16 over 4 steps: 64, 80, 96, 112, then 128 from step 4 on."""
    schedule = build_schedule(make_config(
        {"pacing": {"type": "fixed_linear", "min_seq_len": 64, "max_seq_len": 128, "step_size": 16,
                    "total_curriculum_steps": 4, "global_batch": 8, "lr": 1e-3, "decay": "constant"}},
        {"total_steps": 6}))
    # step s: 64 + floor(s / 4 * 64) // 16 * 16 -> 64, 80, 96, 112; then max
    assert [schedule.seq_len_at(s) for s in range(6)] == [64, 80, 96, 112, 128, 128]
    # tokens: 8 x (64 + 80 + 96 + 112) = 2816 before step 4, then 8 x 128 = 1024 per step
    assert [schedule.tokens_before(s) for s in range(7)] == [0, 512, 1152, 1920, 2816, 3840, 4864]
    assert [schedule.lr_at(s) for s in range(6)] == [1e-3] * 6  # one constant LR for the whole run


def test_pacing_fixed_discrete_single_length() -> None:
    """fixed_discrete with one length and no max_step is a constant schedule (once an IndexError)."""
    schedule = build_schedule(make_config(
        {"pacing": {"type": "fixed_discrete", "difficulty": [256], "max_step": [], "global_batch": 4, "lr": 1e-3}},
        {"total_steps": 3}))
    assert [schedule.seq_len_at(s) for s in range(3)] == [256, 256, 256]
    assert schedule.total_tokens == 3 * 4 * 256


def test_pacing_fixed_discrete_edges() -> None:
    """fixed_discrete: difficulty[i] up to and including max_step[i]."""
    schedule = build_schedule(make_config(
        {"pacing": {"type": "fixed_discrete", "difficulty": [64, 128, 256], "max_step": [2, 4], "global_batch": 4,
                    "lr": 1e-3}}, {"total_steps": 7}))
    assert [schedule.seq_len_at(s) for s in range(7)] == [64, 64, 64, 128, 128, 256, 256]
    assert [(s.start_step, s.end_step) for s in schedule.stages] == [(0, 3), (3, 5), (5, 7)]


def test_pacing_max_seq_len_when_run_ends_early() -> None:
    """A run that stops before the pacing reaches its maximum still evaluates (and reshapes) at the maximum."""
    schedule = build_schedule(make_config(
        {"pacing": {"type": "fixed_linear", "min_seq_len": 64, "max_seq_len": 1024, "total_curriculum_steps": 100,
                    "step_size": 64, "global_batch": 16, "lr": 1e-3}}, {"total_steps": 20}))
    # step 19: 64 + floor(19 / 100 * 960) // 64 * 64 = 64 + 182 // 64 * 64 = 64 + 128 = 192
    assert schedule.seq_len_at(19) == 192
    assert schedule.max_seq_len == 1024


def test_pacing_until_tokens_crosses_plateaus() -> None:
    """until_tokens on a pacing run counts each plateau's own tokens per step."""
    schedule = build_schedule(make_config(
        {"pacing": {"type": "fixed_discrete", "difficulty": [64, 128], "max_step": [1], "global_batch": 2,
                    "lr": 1e-3, "until_tokens": 700}}))
    # steps 0, 1: 2 x 64 = 128 each (256 before step 2); then 2 x 128 = 256: ceil((700 - 256) / 256) = 2 more
    assert schedule.total_steps == 4
    assert schedule.total_tokens == 768  # 256 + 2 x 256


# --------------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize(("rule", "batch", "seq_len", "expected"), [
    # seed: 6e-4 * sqrt(b / 32) * min(2048 / L, 4)
    ("seed", 128, 1024, 2.4e-3),  # 6e-4 * sqrt(4) * min(2, 4) = 6e-4 * 2 * 2
    ("seed", 8, 64, 1.2e-3),  # 6e-4 * sqrt(0.25) * min(32, 4) = 6e-4 * 0.5 * 4
    ("seed", 32, 4096, 3e-4),  # 6e-4 * 1 * min(0.5, 4)
    ("linear", 64, 64, 1.2e-3),  # 6e-4 * 64 / 32
    ("linear", 8, 1024, 1.5e-4),  # 6e-4 * 8 / 32
    ("sqrt", 128, 64, 1.2e-3),  # 6e-4 * sqrt(4)
    ("sqrt", 8, 2048, 3e-4),  # 6e-4 * sqrt(1/4)
    ("none", 1024, 64, 6e-4),
])
def test_rule_lr(rule: str, batch: int, seq_len: int, expected: float) -> None:
    """The four lr_scaling rules with ref_batch 32, ref_seq_len 2048, seq_cap 4."""
    scaling = LRScalingConfig(rule=rule, ref_batch=32, ref_seq_len=2048, seq_cap=4.0)
    assert rule_lr(scaling, 6e-4, batch, seq_len) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("seq_len", "clip"), [(8, 5.0), (128, 5.0), (136, 1.0), (512, 1.0), (520, 0.5),
                                                (4096, 0.5)])
def test_auto_grad_clip_default_thresholds(seq_len: int, clip: float) -> None:
    """grad_clip auto: 5.0 up to 128 tokens, 1.0 up to 512, 0.5 above."""
    assert auto_grad_clip(GradClipAutoConfig(), seq_len) == clip


def test_auto_grad_clip_custom_rules() -> None:
    """The first rule whose max_seq_len covers the length wins; otherwise beyond all rules."""
    rule = GradClipAutoConfig(rules=[ClipRule(max_seq_len=256, clip=2.0)], otherwise=0.25)
    assert [auto_grad_clip(rule, n) for n in (64, 256, 264)] == [2.0, 2.0, 0.25]


# --------------------------------------------------------------------------------------------------- batch layout


def _one_stage(seq_len: int, global_batch: int, micro_batch_tokens: int = 16384,
               micro_batch: Optional[int] = None) -> dict:
    stage = {"until_step": 10, "seq_len": seq_len, "global_batch": global_batch}
    if micro_batch is not None:
        stage["micro_batch"] = micro_batch
    return {"micro_batch_tokens": micro_batch_tokens, "stages": [stage]}


@pytest.mark.parametrize(("seq_len", "global_batch", "micro_batch_tokens", "world_size", "micro", "accum"), [
    (1024, 48, 4096, 1, 4, 12),  # per rank 48; largest divisor d with d x 1024 <= 4096 is 4; 48 / 4 = 12
    (1024, 48, 4096, 2, 4, 6),  # per rank 24 -> 4 x 6
    (1024, 48, 4096, 4, 4, 3),  # per rank 12 -> 4 x 3
    (1024, 24, 5120, 1, 4, 6),  # d x 1024 <= 5120 -> d <= 5; 5 does not divide 24 -> 4
    (1024, 6, 4096, 1, 3, 2),  # d <= 4 and divides 6 -> 3
    (2048, 8, 1024, 1, 1, 8),  # one sequence is over the budget: micro-batch 1
    (64, 256, 16384, 1, 256, 1),  # 256 x 64 = 16,384 fits exactly
])
def test_micro_batch_from_micro_batch_tokens(seq_len: int, global_batch: int, micro_batch_tokens: int,
                                             world_size: int, micro: int, accum: int) -> None:
    """Default micro-batch: the largest divisor of the per-rank batch within micro_batch_tokens."""
    stage = build_schedule(make_config(_one_stage(seq_len, global_batch, micro_batch_tokens)), world_size).stages[0]
    assert (stage.micro_batch, stage.grad_accum, stage.world_size) == (micro, accum, world_size)
    assert micro * accum * world_size == global_batch


def test_explicit_micro_batch_is_kept() -> None:
    """A stage's micro_batch is used as given: 64 / 2 ranks = 32 per rank = 8 x 4."""
    stage = build_schedule(make_config(_one_stage(64, 64, micro_batch=8)), 2).stages[0]
    assert (stage.micro_batch, stage.grad_accum) == (8, 4)


@pytest.mark.parametrize(("world_size", "layouts"), [
    # per rank: 256/w x 64, 128/w x 128, 64/w x 256, 32/w x 512, 16/w x 1024, all within 16,384 tokens
    (2, [(128, 1), (64, 1), (32, 1), (16, 1), (8, 1)]),
    (4, [(64, 1), (32, 1), (16, 1), (8, 1), (4, 1)]),
])
def test_seed003_world_size_splits(world_size: int, layouts: list[tuple[int, int]]) -> None:
    """seed003 on 2 and 4 ranks: same global batches and LRs, per-rank micro-batches split."""
    schedule = build_schedule(load_config("seed003", environ={}), world_size)
    assert [(s.micro_batch, s.grad_accum) for s in schedule.stages] == layouts
    assert [s.global_batch for s in schedule.stages] == [256, 128, 64, 32, 16]
    assert all(s.world_size == world_size for s in schedule.stages)
    assert schedule.lr_at(0) == pytest.approx(6.78e-3 / 500, rel=1e-12)
    assert schedule.total_tokens == 163_840_000


def test_world_size_not_dividing_batch_is_an_error() -> None:
    """3 ranks cannot split seed003's 256 sequences."""
    with pytest.raises(ConfigError, match=r"curriculum\.stages\.0\.global_batch = 256: must be divisible by the "
                                          r"world size 3"):
        build_schedule(load_config("seed003", environ={}), 3)


@pytest.mark.parametrize("world_size", [0, -1])
def test_world_size_must_be_positive(world_size: int) -> None:
    """build_schedule rejects world sizes below 1."""
    with pytest.raises(ConfigError, match="--world-size"):
        build_schedule(load_config("seed003", environ={}), world_size)


def test_distinct_shapes_in_order() -> None:
    """The (micro_batch, seq_len) shapes of a run, first use first."""
    schedule = build_schedule(load_config("tiny-cpu", environ={}))
    assert schedule.distinct_shapes() == [(32, 64), (16, 128), (8, 256)]


@pytest.mark.parametrize("stages, dims, static, dynamic", [
    ([(4, 32), (4, 64), (4, 128)], (1,), 4, 2),  # Li et al.: fixed sequences per step, one graph for every length
    ([(8, 32), (4, 64), (2, 128)], (0, 1), 4, 2),  # fixed tokens per step: both sizes symbolic
    ([(2, 32), (2, 64), (1, 128)], (0, 1), 4, 3),  # a micro-batch of 1 stays static in a graph of its own
    ([(4, 32), (4, 32)], (), 2, 2),  # one shape: nothing varies
])
def test_compiled_graphs_with_and_without_dynamic_shapes(stages: list, dims: tuple, static: int,
                                                         dynamic: int) -> None:
    """The dimensions that vary between stages, and the graphs a compiled run builds, evaluation included."""
    schedule = build_schedule(make_config({"stages": [
        {"until_step": 2 * (i + 1), "seq_len": seq_len, "global_batch": micro, "micro_batch": micro}
        for i, (micro, seq_len) in enumerate(stages)]}))
    assert schedule.varying_dims() == dims
    assert (schedule.compiled_graphs(dynamic=False), schedule.compiled_graphs(dynamic=True)) == (static, dynamic)


# --------------------------------------------------------------------------------------------------- pacing buckets

LI_PACING = {"type": "fixed_linear", "min_seq_len": 64, "max_seq_len": 1024, "step_size": 8,
             "total_curriculum_steps": 150, "global_batch": 64, "lr": 6e-4, "until_step": 450}


def test_bucketed_pacing_trains_16_lengths_instead_of_121() -> None:
    """Li et al.'s pacing (64 -> 1024, step 8, over 150 steps) has 121 lengths; ``bucket: 64`` rounds each down
    to a multiple of 64: 64 for steps 0-9, 128 from step 10 (the unbucketed length reaches 128 at step 10), ...,
    1024 from step 150 on."""
    plain = build_schedule(make_config({"pacing": LI_PACING}))
    bucketed = build_schedule(make_config({"pacing": {**LI_PACING, "bucket": 64}}))
    assert len(plain.distinct_shapes()) == 121
    assert [seq_len for _, seq_len in bucketed.distinct_shapes()] == list(range(64, 1025, 64))
    assert [(s.start_step, s.seq_len) for s in bucketed.stages[:3]] == [(0, 64), (10, 128), (20, 192)]
    assert bucketed.stage_at(149).seq_len == 960 and bucketed.stage_at(150).seq_len == 1024
    for step in range(450):  # never longer than the unbucketed length, and on the bucket grid
        assert bucketed.seq_len_at(step) <= plain.seq_len_at(step) and bucketed.seq_len_at(step) % 64 == 0


def test_a_bucket_must_divide_the_full_length() -> None:
    with pytest.raises(ConfigError, match=r"curriculum\.pacing\.bucket = 96: must divide the longest length 1024"):
        build_schedule(make_config({"pacing": {**LI_PACING, "bucket": 96}}))


def test_a_curriculum_of_10_to_the_11_steps_resolves_at_once() -> None:
    """Plateaus are found per length by bisection, not by walking the steps: 10**11 curriculum steps resolve in
    well under a second of this process's CPU time (not wall time: the tests share the cores), with each length's
    first step where the formula puts it."""
    import time

    start = time.process_time()
    schedule = build_schedule(make_config({"pacing": {**LI_PACING, "total_curriculum_steps": 10**11,
                                                      "until_step": 2 * 10**11}}))
    assert time.process_time() - start < 1.0
    assert len(schedule.stages) == 121
    # 64 + floor(s / 10**11 * 960) // 8 * 8 reaches 72 at s = ceil(8 / 960 * 10**11)
    assert schedule.stages[1].start_step == math.ceil(8 * 10**11 / 960) and schedule.stages[1].seq_len == 72
