"""``curriculum.schedule.pacing_seq_len`` against DeepSpeed's own ``CurriculumScheduler`` (pure Python, no engine).

Where DeepSpeed is right (min and max lengths are multiples of the difficulty step) the two agree at every step
``0 .. total_curriculum_steps + 5``. Where it is not, the tests pin both DeepSpeed's defect and our value, so a
DeepSpeed upgrade that changes either shows up here.

Both are compared at the same argument. The DeepSpeed engine calls ``get_difficulty(global_steps + 1)``; our
training step ``s`` (counted from 0) uses ``pacing_seq_len(pacing, s)``.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

from curriculum.config import PacingConfig
from curriculum.schedule import pacing_seq_len

curriculum_scheduler = pytest.importorskip("deepspeed.runtime.data_pipeline.curriculum_scheduler")


def deepspeed_scheduler(schedule_type: str, min_len: int, max_len: int, schedule_config: dict[str, Any]) -> Any:
    """DeepSpeed's scheduler built from the config dict its constructor reads."""
    return curriculum_scheduler.CurriculumScheduler({
        "curriculum_type": "seqlen",
        "min_difficulty": min_len,
        "max_difficulty": max_len,
        "schedule_type": schedule_type,
        "schedule_config": schedule_config,
    })


def both(schedule_type: str, min_len: int, max_len: int, step: int, total: int,
         root_degree: Optional[int] = None) -> tuple[Any, PacingConfig]:
    config: dict[str, Any] = {"total_curriculum_step": total, "difficulty_step": step}
    ours = PacingConfig(type=schedule_type, min_seq_len=min_len, max_seq_len=max_len, step_size=step,
                        total_curriculum_steps=total)
    if root_degree is not None:
        config["root_degree"] = root_degree
        ours = ours.model_copy(update={"root_degree": root_degree})
    return deepspeed_scheduler(schedule_type, min_len, max_len, config), ours


# (min, max, step, total curriculum steps): min and max are multiples of the step
AGREEING = [
    (64, 1024, 8, 1000),  # the 1.5B recipe's range (Li et al.), shorter
    (80, 2048, 8, 1100),  # DeepSpeed Data Efficiency's GPT-3 range, shorter
    (8, 1024, 8, 300),  # Composer's defaults
    (128, 512, 64, 97),
    (64, 64, 8, 10),  # no growth at all
    (64, 1024, 16, 1),  # a one-step curriculum
]


@pytest.mark.parametrize(("min_len", "max_len", "step", "total"), AGREEING)
def test_fixed_linear_matches_deepspeed(min_len: int, max_len: int, step: int, total: int) -> None:
    """fixed_linear: equal to DeepSpeed at every step 0 .. total + 5."""
    ds, ours = both("fixed_linear", min_len, max_len, step, total)
    for s in range(total + 6):
        assert pacing_seq_len(ours, s) == ds.get_difficulty(s), s


@pytest.mark.parametrize("root_degree", [2, 3])
@pytest.mark.parametrize(("min_len", "max_len", "step", "total"), AGREEING)
def test_fixed_root_matches_deepspeed(min_len: int, max_len: int, step: int, total: int, root_degree: int) -> None:
    """fixed_root with square and cube roots: equal to DeepSpeed at every step 0 .. total + 5."""
    ds, ours = both("fixed_root", min_len, max_len, step, total, root_degree)
    for s in range(total + 6):
        assert pacing_seq_len(ours, s) == ds.get_difficulty(s), s


@pytest.mark.parametrize(("difficulty", "max_step"), [
    ([64, 128, 256, 1024], [10, 20, 35]),
    ([128, 1024], [0]),  # the first length only at step 0
    ([64, 64, 512], [3, 4]),
])
def test_fixed_discrete_matches_deepspeed(difficulty: list[int], max_step: list[int]) -> None:
    """fixed_discrete: difficulty[i] up to and including max_step[i], as DeepSpeed, at every step to the end + 5."""
    ds = deepspeed_scheduler("fixed_discrete", difficulty[0], difficulty[-1],
                             {"difficulty": difficulty, "max_step": max_step})
    ours = PacingConfig(type="fixed_discrete", difficulty=difficulty, max_step=max_step)
    for s in range(max_step[-1] + 6):
        assert pacing_seq_len(ours, s) == ds.get_difficulty(s), s


def test_fixed_linear_known_values() -> None:
    """Both give the hand-computed 64 -> 1024 linear ramp over 1000 steps in increments of 8."""
    ds, ours = both("fixed_linear", 64, 1024, 8, 1000)
    # step s: 64 + floor(s / 1000 * 960) rounded down to 8
    #   1: 0.96 -> 64;  9: 8.64 -> 72;  500: 480 -> 544;  999: 959.04 -> 952 -> 1016;  1000: 1024
    expected = {0: 64, 1: 64, 9: 72, 500: 544, 999: 1016, 1000: 1024, 1005: 1024}
    assert {s: pacing_seq_len(ours, s) for s in expected} == expected
    assert {s: ds.get_difficulty(s) for s in expected} == expected


# --------------------------------------------------------------------------------------------------- DeepSpeed wrong


def test_min_not_multiple_of_step_deepspeed_leaves_the_minimum() -> None:
    """min 72, step 16: DeepSpeed rounds to absolute multiples of 16, so it never trains at 72; we start at 72.

    DeepSpeed 0.19.8 raises the floor to the next multiple (80); older releases floored below the minimum (64).
    Either way the first length is not the configured minimum, and later lengths are off the grid from 72.
    """
    ds, ours = both("fixed_linear", 72, 1024, 16, 100)
    assert ds.get_difficulty(0) != 72
    assert ds.get_difficulty(0) in (64, 80)
    assert all(ds.get_difficulty(s) % 16 == 0 for s in range(106))  # absolute multiples of 16: 72 is never used
    # ours: 72 + floor(s / 100 * 952) // 16 * 16; step 2: 19.04 -> 72 + 16 = 88; step 4: 38.08 -> 72 + 32 = 104
    assert [pacing_seq_len(ours, s) for s in range(6)] == [72, 72, 88, 88, 104, 104]
    assert all((pacing_seq_len(ours, s) - 72) % 16 == 0 or pacing_seq_len(ours, s) == 1024 for s in range(106))
    assert pacing_seq_len(ours, 100) == 1024


def test_max_not_multiple_of_step_deepspeed_misses_the_maximum() -> None:
    """max 1016, step 16: DeepSpeed rounds 1016 down to 1008 at the end of the curriculum; we give 1016.

    At total_curriculum_step 1000: floor(1.0 * 952 + 64) = 1016, minus 1016 % 16 = 8 -> 1008. DeepSpeed reaches
    1016 only once the formula overshoots to 1024 and is clamped: s / 1000 * 952 >= 960, i.e. step 1009.
    """
    ds, ours = both("fixed_linear", 64, 1016, 16, 1000)
    assert [ds.get_difficulty(s) for s in range(1000, 1006)] == [1008] * 6
    assert ds.get_difficulty(1008) == 1008 and ds.get_difficulty(1009) == 1016
    assert [pacing_seq_len(ours, s) for s in range(1000, 1006)] == [1016] * 6
    assert pacing_seq_len(ours, 999) == 1008  # 64 + floor(0.999 * 952) // 16 * 16 = 64 + 951 // 16 * 16 = 64 + 944


def test_fixed_root_max_not_multiple_of_step() -> None:
    """The same defect with fixed_root (degree 2): DeepSpeed ends the curriculum at 1008, not the max 1016."""
    ds, ours = both("fixed_root", 64, 1016, 16, 1000, root_degree=2)
    assert ds.get_difficulty(1000) == 1008
    assert pacing_seq_len(ours, 1000) == 1016
