"""Property tests of the resolved schedule over random valid configs (hypothesis).

The strategies build stage lists and pacing sections that are valid by construction, and remember what the run must
look like (stage step ranges, warmup lengths, LR events) so the properties can check it without asking the code under
test. Steps count from 0.

LR continuity: inside one LR window (a stage, or the whole pacing run) the LR before events moves by at most
    warmup:  |peak - start| / warmup <= P / warmup          (start is the previous window's end LR, <= its peak)
    decay:   (peak - min) * pi / (2 * decay_steps) <= P * pi / (2 * decay_steps)   (the cosine's steepest slope;
             linear decay moves (peak - min) / decay_steps, less)
per step, where P is the largest peak LR of the run and decay_steps = window steps - warmup. The step from the last
warmup step (the peak) to the first decay step (progress 0, the peak) is 0. LR events multiply on top, so the check
is on ``lr / (product of events so far)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from conftest import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curriculum.config import Config, PacingConfig
from curriculum.schedule import Schedule, build_schedule, pacing_seq_len

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LR_VALUES = st.floats(min_value=1e-5, max_value=1e-1, allow_nan=False, allow_infinity=False)
LR_MULTS = st.floats(min_value=0.05, max_value=20.0, allow_nan=False, allow_infinity=False)


@dataclass(frozen=True)
class Case:
    """A valid config and what its run must look like."""

    config: Config
    world_size: int
    windows: tuple[tuple[int, int, int], ...]
    """(start_step, end_step, warmup_steps) of each LR window."""
    events: tuple[tuple[int, float], ...]
    total_steps: int


def _lr_choice(draw: st.DrawFn, allow_auto: bool) -> dict[str, Any]:
    kinds = ["absolute", "multiplier"] + (["auto", "default"] if allow_auto else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "absolute":
        return {"lr": draw(LR_VALUES)}
    if kind == "multiplier":
        return {"lr_mult": draw(LR_MULTS)}
    return {"lr": "auto"} if kind == "auto" else {}


def _shape_of_lr(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "decay": draw(st.sampled_from(["cosine", "linear", "constant"])),
        "min_lr_ratio": draw(st.floats(min_value=0.0, max_value=1.0)),
        "grad_clip": draw(st.one_of(st.just("auto"), st.floats(min_value=0.1, max_value=10.0))),
    }


def _warmup(draw: st.DrawFn, steps: int, tokens_per_step: int, cap: Optional[int]) -> tuple[dict[str, int], int]:
    """A warmup of ``w <= steps`` steps, given in steps or in tokens (``ceil(tokens / tokens_per_step) == w``)."""
    warmup = draw(st.integers(0, steps))
    if draw(st.booleans()):
        return {"warmup_steps": warmup}, warmup
    slack = draw(st.integers(0, tokens_per_step - 1)) if warmup else 0
    effective = warmup if cap is None else min(warmup, cap)
    return {"warmup_tokens": warmup * tokens_per_step - slack}, effective


def _events(draw: st.DrawFn, total_steps: int) -> list[dict[str, Any]]:
    return draw(st.lists(st.builds(lambda at, m: {"at_step": at, "multiply": m},
                                   st.integers(0, total_steps - 1), st.floats(min_value=0.1, max_value=3.0)),
                         max_size=2))


@st.composite
def stage_cases(draw: st.DrawFn) -> Case:
    """1-4 stages of non-decreasing length, ending by step, by tokens or by the run budget."""
    world_size = draw(st.sampled_from([1, 2, 4]))
    mode = draw(st.sampled_from(["truncate", "reshape"]))
    count = draw(st.integers(1, 4))
    if mode == "reshape":
        # lengths must divide the longest: powers of two times 8; batches default to the last stage's tokens/step
        seq_lens = sorted(8 * 2 ** draw(st.integers(0, 6)) for _ in range(count))
        last_batch = world_size * draw(st.integers(1, 4))
        batches = [last_batch * seq_lens[-1] // length for length in seq_lens]
    else:
        seq_lens = sorted(8 * draw(st.integers(1, 64)) for _ in range(count))
        batches = [world_size * draw(st.integers(1, 16)) for _ in range(count)]
    cap = draw(st.one_of(st.none(), st.integers(1, 10)))
    curriculum: dict[str, Any] = {
        "mode": mode,
        "base_lr": draw(LR_VALUES),
        "lr_scaling": {"rule": draw(st.sampled_from(["seed", "linear", "sqrt", "none"]))},
        "warmup_start": draw(st.sampled_from(["previous", "zero"])),
        "micro_batch_tokens": draw(st.sampled_from([64, 512, 4096, 16384])),
        "stages": [],
    }
    if cap is not None:
        curriculum["warmup_cap_steps"] = cap
    run: dict[str, Any] = {}
    windows = []
    start_step = start_tokens = 0
    for i, (seq_len, batch) in enumerate(zip(seq_lens, batches)):
        is_last = i == count - 1
        tokens_per_step = seq_len * batch
        steps = draw(st.integers(1, 25))
        stage: dict[str, Any] = {"seq_len": seq_len, **_lr_choice(draw, allow_auto=True), **_shape_of_lr(draw)}
        if mode == "truncate" or is_last:
            stage["global_batch"] = batch
        if draw(st.booleans()):
            per_rank = batch // world_size
            stage["micro_batch"] = draw(st.sampled_from([d for d in range(1, per_rank + 1) if per_rank % d == 0]))
        end_by = draw(st.sampled_from(["step", "tokens", "run"] if is_last else ["step", "tokens"]))
        end_step, end_tokens = start_step + steps, start_tokens + steps * tokens_per_step
        short_by = draw(st.integers(0, tokens_per_step - 1))  # until_tokens inside the last step still ends there
        if end_by == "step":
            stage["until_step"] = end_step
        elif end_by == "tokens":
            stage["until_tokens"] = end_tokens - short_by
        elif draw(st.booleans()):
            run["total_steps"] = end_step
        else:
            run["total_tokens"] = end_tokens - short_by
        warmup_field, warmup = _warmup(draw, steps, tokens_per_step, cap)
        stage.update(warmup_field)
        curriculum["stages"].append(stage)
        windows.append((start_step, end_step, warmup))
        start_step, start_tokens = end_step, end_tokens
    events = _events(draw, start_step)
    curriculum["lr_events"] = events
    return Case(make_config(curriculum, run), world_size, tuple(windows),
                tuple((e["at_step"], e["multiply"]) for e in events), start_step)


@st.composite
def pacing_sections(draw: st.DrawFn) -> dict[str, Any]:
    """A valid pacing section's length fields (fixed_linear, fixed_root or fixed_discrete)."""
    kind = draw(st.sampled_from(["fixed_linear", "fixed_root", "fixed_discrete"]))
    if kind == "fixed_discrete":
        count = draw(st.integers(1, 4))
        difficulty = sorted(8 * draw(st.integers(1, 128)) for _ in range(count))
        max_step = sorted(draw(st.sets(st.integers(0, 60), min_size=count - 1, max_size=count - 1)))
        return {"type": kind, "difficulty": difficulty, "max_step": max_step}
    min_seq_len = 8 * draw(st.integers(1, 64))
    section = {
        "type": kind,
        "min_seq_len": min_seq_len,
        "max_seq_len": min_seq_len + 8 * draw(st.integers(0, 128)),
        "step_size": 8 * draw(st.integers(1, 8)),
        "total_curriculum_steps": draw(st.integers(1, 60)),
    }
    if kind == "fixed_root":
        section["root_degree"] = draw(st.integers(1, 4))
    return section


@st.composite
def pacing_cases(draw: st.DrawFn) -> Case:
    """A pacing run: one LR window over the whole run."""
    world_size = draw(st.sampled_from([1, 2, 4]))
    section = draw(pacing_sections())
    total_steps = draw(st.integers(1, 80))
    section.update(_lr_choice(draw, allow_auto=False), **_shape_of_lr(draw))
    section["global_batch"] = world_size * draw(st.integers(1, 8))
    first_tokens = section["global_batch"] * pacing_seq_len(PacingConfig(**section), 0)
    warmup_field, warmup = _warmup(draw, total_steps, first_tokens, None)
    section.update(warmup_field)
    run = {}
    if draw(st.booleans()):
        section["until_step"] = total_steps
    else:
        run["total_steps"] = total_steps
    events = _events(draw, total_steps)
    config = make_config({"pacing": section, "lr_events": events}, run)
    return Case(config, world_size, ((0, total_steps, warmup),), tuple((e["at_step"], e["multiply"]) for e in events),
                total_steps)


# --------------------------------------------------------------------------------------------------- checks


def _event_factor(case: Case, step: int) -> float:
    return math.prod(multiply for at_step, multiply in case.events if step >= at_step)


def check_common(case: Case) -> Schedule:
    """Properties every schedule has; returns the schedule for more."""
    schedule = build_schedule(case.config, case.world_size)
    assert schedule.total_steps == case.total_steps
    lengths = [schedule.seq_len_at(s) for s in range(case.total_steps)]
    # lengths: multiples of 8, never decreasing
    assert all(length % 8 == 0 for length in lengths)
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    # LR never negative
    lrs = [schedule.lr_at(s) for s in range(case.total_steps)]
    assert all(lr >= 0.0 for lr in lrs)
    # LR continuous inside each window, up to what warmup/decay can move it in one step (module docstring)
    top_peak = max(stage.peak_lr for stage in schedule.stages)
    for start, end, warmup in case.windows:
        decay_steps = end - start - warmup
        bound = max(top_peak / warmup if warmup else 0.0,
                    top_peak * math.pi / (2 * decay_steps) if decay_steps else 0.0)
        for s in range(start, end - 1):
            before = lrs[s] / _event_factor(case, s)
            after = lrs[s + 1] / _event_factor(case, s + 1)
            assert abs(after - before) <= bound * (1 + 1e-9) + 1e-15, (s, before, after, bound)
    # tokens: strictly increasing, each step adds its own batch x length, ends at total_tokens
    tokens = [schedule.tokens_before(s) for s in range(case.total_steps + 1)]
    assert tokens[0] == 0 and tokens[-1] == schedule.total_tokens
    for s in range(case.total_steps):
        assert tokens[s + 1] - tokens[s] == lengths[s] * schedule.global_batch_at(s) > 0
    # batch layout: micro x accum x world = global
    for stage in schedule.stages:
        assert stage.micro_batch * stage.grad_accum * stage.world_size == stage.global_batch
        assert stage.world_size == case.world_size
        assert stage.tokens_per_step == stage.global_batch * stage.seq_len
    return schedule


@PROPERTY_SETTINGS
@given(stage_cases())
def test_stage_schedules(case: Case) -> None:
    """Random stage lists: ranges as configured, lengths grow to the max, LR >= 0 and continuous, tokens add up."""
    schedule = check_common(case)
    assert [(s.start_step, s.end_step) for s in schedule.stages] == [w[:2] for w in case.windows]
    stage_lengths = [spec.seq_len for spec in case.config.curriculum.stages or []]
    lengths = [schedule.seq_len_at(s) for s in range(case.total_steps)]
    assert min(stage_lengths) <= min(lengths) and max(lengths) <= max(stage_lengths)
    assert lengths[-1] == max(stage_lengths) == schedule.max_seq_len  # reaches the max
    if case.config.curriculum.mode == "reshape":  # tokens per step kept at the last stage's
        assert len({s.tokens_per_step for s in schedule.stages}) == 1


@PROPERTY_SETTINGS
@given(pacing_cases())
def test_pacing_schedules(case: Case) -> None:
    """Random pacing runs: lengths in [min, max] on the step grid from min, the max once the curriculum is over."""
    schedule = check_common(case)
    pacing = case.config.curriculum.pacing
    assert pacing is not None
    lengths = [schedule.seq_len_at(s) for s in range(case.total_steps)]
    if pacing.type == "fixed_discrete":
        assert set(lengths) <= set(pacing.difficulty)
        curriculum_end = pacing.max_step[-1] + 1 if pacing.max_step else 0
        top = pacing.difficulty[-1]
    else:
        assert pacing.min_seq_len is not None and pacing.max_seq_len is not None
        assert all(pacing.min_seq_len <= n <= pacing.max_seq_len for n in lengths)
        assert all((n - pacing.min_seq_len) % pacing.step_size == 0 or n == pacing.max_seq_len for n in lengths)
        assert lengths[0] == pacing.min_seq_len
        curriculum_end = pacing.total_curriculum_steps
        top = pacing.max_seq_len
    assert schedule.max_seq_len == top
    if case.total_steps > curriculum_end:
        assert lengths[-1] == top  # reaches the max


@settings(max_examples=300, deadline=None)
@given(pacing_sections())
def test_pacing_function_reaches_max_and_stays(section: dict[str, Any]) -> None:
    """pacing_seq_len alone: non-decreasing, within [min, max], on the grid, and the max from the curriculum end on."""
    pacing = PacingConfig(**section)
    if pacing.type == "fixed_discrete":
        end = pacing.max_step[-1] + 1 if pacing.max_step else 0
        low, high, grid = pacing.difficulty[0], pacing.difficulty[-1], None
    else:
        assert pacing.total_curriculum_steps and pacing.min_seq_len and pacing.max_seq_len
        end, low, high, grid = pacing.total_curriculum_steps, pacing.min_seq_len, pacing.max_seq_len, pacing.step_size
    lengths = [pacing_seq_len(pacing, s) for s in range(end + 6)]
    assert lengths[0] == low
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    assert all(low <= n <= high and n % 8 == 0 for n in lengths)
    if grid is not None:
        assert all((n - low) % grid == 0 or n == high for n in lengths)
    assert lengths[end:] == [high] * 6
