"""The curriculum, resolved: pure functions of the optimizer step.

Steps count from 0: step ``s`` is the ``(s + 1)``-th optimizer update, and a stage covers the half-open range
``[start_step, end_step)``. ``tokens_before(s)`` is the number of tokens trained by steps ``0 .. s - 1``, so
``tokens_before(0) == 0`` and ``tokens_before(total_steps) == total_tokens``.

``build_schedule(config, world_size)`` checks everything that needs more than one field and returns an immutable
``Schedule``; its methods (``stage_at``, ``seq_len_at``, ``global_batch_at``, ``lr_at``, ``grad_clip_at``,
``tokens_before``) compute from the step alone. Nothing here counts its own calls, so a resumed run only needs the
step. ``run.max_steps`` (``--max-steps``) cuts the resolved plan short (``cut_schedule``) without changing any
step before the cut. No torch.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

from curriculum.config import (
    MAX_BATCH,
    MAX_STEPS,
    SEQ_LEN_MULTIPLE,
    Config,
    CurriculumConfig,
    GradClipAutoConfig,
    LRScalingConfig,
    PacingConfig,
    SegmentSettings,
)
from curriculum.errors import ConfigError

LRSource = Literal["absolute", "multiplier", "auto"]
ClipSource = Literal["absolute", "auto"]
_FOREVER = MAX_STEPS + 1
"""A step past the end of any pacing function (no step count exceeds ``MAX_STEPS``):
``pacing_seq_len(pacing, _FOREVER)`` is its full length."""


# --------------------------------------------------------------------------------------------------- pure rules


def rule_lr(scaling: LRScalingConfig, base_lr: float, global_batch: int, seq_len: int) -> float:
    """The LR the scaling rule gives a stage of ``global_batch`` sequences of ``seq_len`` tokens."""
    batch_ratio = global_batch / scaling.ref_batch
    if scaling.rule == "seed":
        return base_lr * math.sqrt(batch_ratio) * min(scaling.ref_seq_len / seq_len, scaling.seq_cap)
    if scaling.rule == "linear":
        return base_lr * batch_ratio
    if scaling.rule == "sqrt":
        return base_lr * math.sqrt(batch_ratio)
    return base_lr


def auto_grad_clip(rule: GradClipAutoConfig, seq_len: int) -> float:
    """``grad_clip: auto``: 5.0 up to 128 tokens, 1.0 up to 512, 0.5 above (with the default rules)."""
    for clip_rule in rule.rules:
        if seq_len <= clip_rule.max_seq_len:
            return clip_rule.clip
    return rule.otherwise


def describe_auto_grad_clip(rule: GradClipAutoConfig) -> str:
    """The ``grad_clip: auto`` rule in words: ``5 up to seq_len 128, 1 up to 512, 0.5 above``."""
    steps = [f"{r.clip:g} up to {'seq_len ' if i == 0 else ''}{r.max_seq_len}" for i, r in enumerate(rule.rules)]
    return ", ".join([*steps, f"{rule.otherwise:g} {'above' if steps else 'at every seq_len'}"])


def pacing_seq_len(pacing: PacingConfig, step: int) -> int:
    """Sequence length of a continuous pacing function at ``step`` (DeepSpeed's formulas, corrected), rounded
    down to a multiple of ``pacing.bucket`` when it has one (never below ``min_seq_len``).

    DeepSpeed rounds to an absolute multiple of ``step_size`` (min 100, step 8 gives 96) and clamps to max only
    from above (max 1020, step 8 never reaches 1020). Here increments are counted from ``min_seq_len`` and the
    length is ``max_seq_len`` from ``total_curriculum_steps`` on.
    """
    return _bucketed(pacing, _unbucketed_seq_len(pacing, step))


def _unbucketed_seq_len(pacing: PacingConfig, step: int) -> int:
    if pacing.type == "fixed_discrete":
        for length, last_step in zip(pacing.difficulty, pacing.max_step):
            if step <= last_step:
                return length
        return pacing.difficulty[-1]
    assert pacing.min_seq_len and pacing.max_seq_len and pacing.total_curriculum_steps  # checked in _check_pacing
    if step >= pacing.total_curriculum_steps:
        return pacing.max_seq_len
    degree = 1 if pacing.type == "fixed_linear" else pacing.root_degree
    progress = (step / pacing.total_curriculum_steps) ** (1.0 / degree)
    span = pacing.max_seq_len - pacing.min_seq_len
    increments = math.floor(progress * span) // pacing.step_size
    return min(pacing.min_seq_len + increments * pacing.step_size, pacing.max_seq_len)


def pacing_plateaus(pacing: PacingConfig, curriculum_end: int) -> list[tuple[int, int]]:
    """``(first step, length)`` of each change of the pacing function over steps ``0 .. curriculum_end``, found
    per length by bisection (the function never decreases): the work grows with the number of lengths, not of
    steps, so a curriculum of 10**9 steps resolves as fast as one of 1,000."""
    candidates = sorted({pacing_seq_len(pacing, 0), pacing_seq_len(pacing, curriculum_end)}
                        | ({pacing_seq_len(pacing, s) for s in [0, *(m + 1 for m in pacing.max_step)]}
                           if pacing.type == "fixed_discrete" else
                           {_bucketed(pacing, pacing.min_seq_len + k * pacing.step_size)  # type: ignore[operator]
                            for k in range((pacing.max_seq_len - pacing.min_seq_len) // pacing.step_size + 1)}))
    plateaus: list[tuple[int, int]] = []
    for length in candidates:
        first = bisect.bisect_left(range(curriculum_end + 1), length, key=lambda step: pacing_seq_len(pacing, step))
        if first > curriculum_end:
            continue
        actual = pacing_seq_len(pacing, first)
        if plateaus and plateaus[-1][0] == first:
            plateaus[-1] = (first, actual)
        elif not plateaus or plateaus[-1][1] != actual:
            plateaus.append((first, actual))
    return plateaus


def _bucketed(pacing: PacingConfig, length: int) -> int:
    """``length`` rounded down to a multiple of ``pacing.bucket``, never below the shortest length."""
    if pacing.bucket is None:
        return length
    return max(length // pacing.bucket * pacing.bucket, pacing.min_seq_len or pacing.difficulty[0])


# --------------------------------------------------------------------------------------------------- resolved plan


@dataclass(frozen=True)
class LRWindow:
    """One warmup-then-decay LR shape over ``[start_step, end_step)``; a stage, or the whole pacing run."""

    start_step: int
    end_step: int
    warmup_steps: int
    start_lr: float
    """LR the warmup starts from (it reaches ``peak_lr`` at step ``start_step + warmup_steps - 1``)."""
    peak_lr: float
    min_lr: float
    decay: Literal["cosine", "linear", "constant"]

    def lr_at(self, step: int) -> float:
        k = step - self.start_step
        if k < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * (k + 1) / self.warmup_steps
        progress = (k - self.warmup_steps) / (self.end_step - self.start_step - self.warmup_steps)
        if self.decay == "constant":
            return self.peak_lr
        if self.decay == "linear":
            return self.peak_lr - (self.peak_lr - self.min_lr) * progress
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Stage:
    """A step range of constant sequence length and batch, with everything the engine needs for it."""

    index: int
    start_step: int
    end_step: int
    start_tokens: int
    end_tokens: int
    seq_len: int
    global_batch: int
    """Sequences per optimizer step over all ranks = micro_batch x grad_accum x world_size."""
    micro_batch: int
    grad_accum: int
    world_size: int
    tokens_per_step: int
    samples_per_step: int
    """Full-length samples drawn from the data per step: ``global_batch`` when truncating,
    ``global_batch * seq_len / max_seq_len`` when reshaping."""
    peak_lr: float
    rule_lr: float
    """What the ``lr_scaling`` rule would give this stage (equal to ``peak_lr`` when ``lr: auto``)."""
    lr_source: LRSource
    lr_max: Optional[float]
    """The stage's cap on its peak LR, if any (``peak_lr == lr_max`` when it applied)."""
    warmup_steps: int
    """Warmup steps that fall inside this stage."""
    grad_clip: float
    clip_source: ClipSource
    """``auto``: ``grad_clip`` is what the ``grad_clip: auto`` rule (``curriculum.grad_clip_auto``) gave the stage."""
    decay: str
    window: LRWindow

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


@dataclass(frozen=True)
class Schedule:
    """The resolved curriculum. Every method is a pure function of the step."""

    stages: tuple[Stage, ...]
    lr_events: tuple[tuple[int, float], ...]
    mode: Literal["truncate", "reshape"]
    max_seq_len: int
    """The configured full length: evaluation runs at it, also in a run that ends before reaching it."""
    world_size: int
    cut_from: Optional[int] = None
    """The full plan's ``total_steps`` when ``run.max_steps`` cut it short (``cut_schedule``), else None."""

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    @property
    def total_tokens(self) -> int:
        return self.stages[-1].end_tokens

    @functools.cached_property
    def _start_steps(self) -> list[int]:
        return [stage.start_step for stage in self.stages]

    def stage_at(self, step: int) -> Stage:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the run (steps 0 .. {self.total_steps - 1})")
        return self.stages[bisect.bisect_right(self._start_steps, step) - 1]

    def seq_len_at(self, step: int) -> int:
        return self.stage_at(step).seq_len

    def global_batch_at(self, step: int) -> int:
        return self.stage_at(step).global_batch

    def grad_clip_at(self, step: int) -> float:
        return self.stage_at(step).grad_clip

    def base_lr_at(self, step: int) -> float:
        """The LR before ``lr_events``."""
        return self.stage_at(step).window.lr_at(step)

    def lr_at(self, step: int) -> float:
        factor = math.prod(multiply for at_step, multiply in self.lr_events if step >= at_step)
        return self.base_lr_at(step) * factor

    def tokens_before(self, step: int) -> int:
        """Tokens trained by steps ``0 .. step - 1``."""
        if step == self.total_steps:
            return self.total_tokens
        stage = self.stage_at(step)
        return stage.start_tokens + (step - stage.start_step) * stage.tokens_per_step

    def distinct_shapes(self) -> list[tuple[int, int]]:
        """The (micro_batch, seq_len) shapes the run trains with, in order of first use."""
        return list(dict.fromkeys((stage.micro_batch, stage.seq_len) for stage in self.stages))

    def varying_dims(self) -> tuple[int, ...]:
        """The dimensions of a training batch (0: micro-batch, 1: seq_len) whose size changes between stages."""
        shapes = self.distinct_shapes()
        return tuple(dim for dim in (0, 1) if len({shape[dim] for shape in shapes}) > 1)

    def compiled_graphs(self, dynamic: bool) -> int:
        """Graphs ``kernels.compile`` builds: one per distinct training shape, or with ``dynamic`` one for all of
        them (plus one for the micro-batches of 1 where the micro-batch varies: dynamo keeps a size of 1 static),
        and one for evaluation."""
        if not dynamic:
            return len(self.distinct_shapes()) + 1
        ones_apart = 0 in self.varying_dims() and any(micro == 1 for micro, _ in self.distinct_shapes())
        return 1 + ones_apart + 1


# --------------------------------------------------------------------------------------------------- building


def build_schedule(config: Config, world_size: int = 1) -> Schedule:
    """Resolve the curriculum for ``world_size`` data-parallel ranks; raise ``ConfigError`` on any bad value."""
    if world_size < 1:
        raise ConfigError("--world-size", world_size, "must be a positive integer")
    cur = config.curriculum
    if cur.stages is not None:
        stages = _resolve_stages(config, world_size)
    else:
        stages = _resolve_pacing(config, world_size)
    # The configured full length, also when the run ends before a pacing function reaches it: evaluation runs at
    # it and reshape mode cuts samples of this length into rows (samples_per_step is computed against it).
    max_seq_len = stages[-1].seq_len if cur.pacing is None else pacing_seq_len(cur.pacing, _FOREVER)
    schedule = Schedule(
        stages=tuple(stages),
        lr_events=tuple((event.at_step, event.multiply) for event in cur.lr_events),
        mode=cur.mode,
        max_seq_len=max_seq_len,
        world_size=world_size,
    )
    for i, event in enumerate(cur.lr_events):
        if event.at_step >= schedule.total_steps:
            raise ConfigError(f"curriculum.lr_events.{i}.at_step", event.at_step,
                              f"must be inside the run (steps 0 .. {schedule.total_steps - 1})")
    return schedule if config.run.max_steps is None else cut_schedule(schedule, config.run.max_steps)


def cut_schedule(schedule: Schedule, max_steps: int) -> Schedule:
    """The plan ended at step ``max_steps`` (a smoke test of a long run): the stage containing that step ends there,
    later stages and LR events are dropped. Every step before the cut keeps the full plan's length, batch, LR and
    tokens: the LR windows are not rescaled, so a stage cut in its warmup ends there. ``max_steps`` at or past the
    end changes nothing.

    With tiny-cpu's stages at steps 0-59, 60-119 and 120-199, ``max_steps`` 90 keeps stage 0 whole and runs stage 1
    over steps 60-89; 60 keeps stage 0 alone; 200 or more is the full plan."""
    if max_steps < 1:
        raise ConfigError("run.max_steps", max_steps, "must be a positive number of steps")
    if max_steps >= schedule.total_steps:
        return schedule
    stages = []
    for stage in schedule.stages:
        if stage.start_step >= max_steps:
            break
        if stage.end_step > max_steps:
            stage = replace(stage, end_step=max_steps,
                            end_tokens=stage.start_tokens + (max_steps - stage.start_step) * stage.tokens_per_step,
                            warmup_steps=_warmup_within(stage.window, stage.start_step, max_steps))
        stages.append(stage)
    return replace(schedule, stages=tuple(stages), cut_from=schedule.total_steps,
                   lr_events=tuple(event for event in schedule.lr_events if event[0] < max_steps))


@dataclass(frozen=True)
class _Shape:
    """Batch layout of one constant-length step range."""

    seq_len: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    samples_per_step: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def _resolve_stages(config: Config, world_size: int) -> list[Stage]:
    cur = config.curriculum
    specs = cur.stages or []
    max_seq_len = max(spec.seq_len for spec in specs)
    last_path = f"curriculum.stages.{len(specs) - 1}"
    reshape_tokens = (_reshape_tokens_per_step(specs[-1], specs[-1].seq_len, last_path)
                      if cur.mode == "reshape" else None)

    stages: list[Stage] = []
    start_step, start_tokens, previous_window = 0, 0, None
    for i, spec in enumerate(specs):
        path = f"curriculum.stages.{i}"
        _check_seq_len(f"{path}.seq_len", spec.seq_len)
        if stages and spec.seq_len < stages[-1].seq_len:
            raise ConfigError(f"{path}.seq_len", spec.seq_len,
                              f"must be >= the previous stage's seq_len {stages[-1].seq_len} (lengths only grow)")
        shape = _shape(cur, spec, path, spec.seq_len, max_seq_len, world_size, reshape_tokens)
        end_step = _end_step(config, spec, path, i == len(specs) - 1, start_step, start_tokens,
                             [(shape, None)])
        window = _window(cur, spec, path, start_step, end_step, shape, previous_window)
        peak_lr, lr_source = _peak_lr(cur, spec, path, shape)
        stages.append(_stage(i, start_step, end_step, start_tokens, shape, world_size, peak_lr, lr_source,
                             spec.lr_max, *_grad_clip(cur, spec, shape.seq_len), spec.decay,
                             rule_lr(cur.lr_scaling, cur.base_lr, shape.global_batch, shape.seq_len),
                             window))
        start_step, start_tokens, previous_window = end_step, stages[-1].end_tokens, window
    return stages


def _resolve_pacing(config: Config, world_size: int) -> list[Stage]:
    cur = config.curriculum
    pacing = cur.pacing
    assert pacing is not None
    path = "curriculum.pacing"
    _check_pacing(pacing, path)
    if pacing.lr_mult is None and (pacing.lr is None or pacing.lr == "auto"):
        raise ConfigError(f"{path}.lr", pacing.lr,
                          "pacing has one LR for the whole run: give lr (a number) or lr_mult")
    max_seq_len = pacing_seq_len(pacing, _FOREVER)
    reshape_tokens = _reshape_tokens_per_step(pacing, max_seq_len, path) if cur.mode == "reshape" else None

    # Plateaus of the length function: (first step, length) for each change, then max length forever.
    if pacing.type == "fixed_discrete":
        # one length and no max_step is a valid (constant) schedule
        curriculum_end = pacing.max_step[-1] + 1 if pacing.max_step else 0
    else:
        assert pacing.total_curriculum_steps is not None  # checked in _check_pacing
        curriculum_end = pacing.total_curriculum_steps
    plateaus = [(step, _shape(cur, pacing, path, seq_len, max_seq_len, world_size, reshape_tokens))
                for step, seq_len in pacing_plateaus(pacing, curriculum_end)]
    end_step = _end_step(config, pacing, path, True, 0, 0,
                         [(shape, plateaus[j + 1][0] if j + 1 < len(plateaus) else None)
                          for j, (_, shape) in enumerate(plateaus)])
    first_shape = plateaus[0][1]
    window = _window(cur, pacing, path, 0, end_step, first_shape, None)
    peak_lr, lr_source = _peak_lr(cur, pacing, path, first_shape)

    stages: list[Stage] = []
    start_tokens = 0
    for j, (start, shape) in enumerate(plateaus):
        if start >= end_step:
            break
        end = min(plateaus[j + 1][0], end_step) if j + 1 < len(plateaus) else end_step
        stages.append(_stage(j, start, end, start_tokens, shape, world_size, peak_lr, lr_source,
                             pacing.lr_max, *_grad_clip(cur, pacing, shape.seq_len), pacing.decay,
                             rule_lr(cur.lr_scaling, cur.base_lr, shape.global_batch, shape.seq_len), window))
        start_tokens = stages[-1].end_tokens
    return stages


def _stage(index: int, start: int, end: int, start_tokens: int, shape: _Shape, world_size: int, peak_lr: float,
           lr_source: LRSource, lr_max: Optional[float], grad_clip: float, clip_source: ClipSource, decay: str,
           rule: float, window: LRWindow) -> Stage:
    return Stage(
        index=index, start_step=start, end_step=end, start_tokens=start_tokens,
        end_tokens=start_tokens + (end - start) * shape.tokens_per_step, seq_len=shape.seq_len,
        global_batch=shape.global_batch, micro_batch=shape.micro_batch, grad_accum=shape.grad_accum,
        world_size=world_size, tokens_per_step=shape.tokens_per_step, samples_per_step=shape.samples_per_step,
        peak_lr=peak_lr, rule_lr=rule, lr_source=lr_source, lr_max=lr_max,
        warmup_steps=_warmup_within(window, start, end), grad_clip=grad_clip, clip_source=clip_source, decay=decay,
        window=window,
    )


def _warmup_within(window: LRWindow, start: int, end: int) -> int:
    """The warmup steps of ``window`` that fall in ``[start, end)``."""
    return max(0, min(end, window.start_step + window.warmup_steps) - start)


def _check_seq_len(field: str, seq_len: int) -> None:
    if seq_len % SEQ_LEN_MULTIPLE:
        raise ConfigError(field, seq_len, f"must be a multiple of {SEQ_LEN_MULTIPLE}")


def _check_pacing(pacing: PacingConfig, path: str) -> None:
    if pacing.bucket is not None:
        _check_seq_len(f"{path}.bucket", pacing.bucket)
        top = pacing.max_seq_len if pacing.type != "fixed_discrete" else (pacing.difficulty or [0])[-1]
        if top and top % pacing.bucket:
            raise ConfigError(f"{path}.bucket", pacing.bucket,
                              f"must divide the longest length {top}, so that the curriculum reaches it")
    if pacing.type == "fixed_discrete":
        for name in ("min_seq_len", "max_seq_len", "total_curriculum_steps"):
            if getattr(pacing, name) is not None:
                raise ConfigError(f"{path}.{name}", getattr(pacing, name),
                                  "not used by fixed_discrete (give difficulty and max_step)")
        if not pacing.difficulty:
            raise ConfigError(f"{path}.difficulty", pacing.difficulty, "fixed_discrete needs at least one length")
        if len(pacing.max_step) != len(pacing.difficulty) - 1:
            raise ConfigError(f"{path}.max_step", pacing.max_step,
                              f"needs {len(pacing.difficulty) - 1} entries, one fewer than difficulty")
        for k, length in enumerate(pacing.difficulty):
            _check_seq_len(f"{path}.difficulty.{k}", length)
            if k and length < pacing.difficulty[k - 1]:
                raise ConfigError(f"{path}.difficulty.{k}", length,
                                  f"must be >= the previous length {pacing.difficulty[k - 1]} (lengths only grow)")
        for k in range(1, len(pacing.max_step)):
            if pacing.max_step[k] <= pacing.max_step[k - 1]:
                raise ConfigError(f"{path}.max_step.{k}", pacing.max_step[k],
                                  f"must be greater than max_step.{k - 1} = {pacing.max_step[k - 1]}")
        return
    if pacing.difficulty or pacing.max_step:
        raise ConfigError(f"{path}.difficulty", pacing.difficulty, f"only used by fixed_discrete, not {pacing.type}")
    for name in ("min_seq_len", "max_seq_len", "total_curriculum_steps"):
        if getattr(pacing, name) is None:
            raise ConfigError(f"{path}.{name}", None, f"required for {pacing.type}")
    assert pacing.min_seq_len is not None and pacing.max_seq_len is not None
    _check_seq_len(f"{path}.min_seq_len", pacing.min_seq_len)
    _check_seq_len(f"{path}.max_seq_len", pacing.max_seq_len)
    _check_seq_len(f"{path}.step_size", pacing.step_size)
    if pacing.max_seq_len < pacing.min_seq_len:
        raise ConfigError(f"{path}.max_seq_len", pacing.max_seq_len,
                          f"must be >= min_seq_len {pacing.min_seq_len}")


def _reshape_tokens_per_step(last: SegmentSettings, last_seq_len: int, path: str) -> int:
    """In reshape mode a stage's default batch keeps the last stage's tokens per step."""
    if last.global_batch_tokens is not None:
        return last.global_batch_tokens
    if last.global_batch is None:
        raise ConfigError(f"{path}.global_batch", None,
                          "the last stage needs global_batch or global_batch_tokens (reshape mode keeps its "
                          "tokens per step in every stage that sets no batch)")
    return last.global_batch * last_seq_len


def _shape(cur: CurriculumConfig, spec: SegmentSettings, path: str, seq_len: int, max_seq_len: int,
           world_size: int, reshape_tokens: Optional[int]) -> _Shape:
    # Checked first: no batch setting can fix a length that does not divide the full length.
    if cur.mode == "reshape" and max_seq_len % seq_len:
        raise ConfigError(f"{path}.seq_len", seq_len,
                          f"reshape mode cuts full-length samples into rows: must divide max seq_len "
                          f"{max_seq_len}")
    if spec.global_batch is not None:
        global_batch = spec.global_batch
    elif spec.global_batch_tokens is not None:
        if spec.global_batch_tokens % seq_len:
            raise ConfigError(f"{path}.global_batch_tokens", spec.global_batch_tokens,
                              f"must be a multiple of seq_len {seq_len}")
        global_batch = spec.global_batch_tokens // seq_len
    elif reshape_tokens is not None:
        if reshape_tokens % seq_len:
            raise ConfigError(f"{path}.global_batch", None,
                              f"reshape mode keeps {reshape_tokens} tokens per step, not a multiple of seq_len "
                              f"{seq_len}: set global_batch")
        global_batch = reshape_tokens // seq_len
    else:
        raise ConfigError(f"{path}.global_batch", None, "required: give global_batch or global_batch_tokens")
    if global_batch > MAX_BATCH:
        field = f"{path}.global_batch_tokens" if spec.global_batch_tokens is not None else f"{path}.global_batch"
        raise ConfigError(field, spec.global_batch_tokens or global_batch,
                          f"gives {global_batch:,} sequences of {seq_len} tokens per step; at most {MAX_BATCH:,}")

    if cur.mode == "reshape":
        if (global_batch * seq_len) % max_seq_len:
            raise ConfigError(f"{path}.global_batch", global_batch,
                              f"reshape mode: tokens per step ({global_batch} x {seq_len}) must be a multiple of "
                              f"the max seq_len {max_seq_len}")
        samples_per_step = global_batch * seq_len // max_seq_len
    else:
        samples_per_step = global_batch

    if global_batch % world_size:
        raise ConfigError(f"{path}.global_batch", global_batch, f"must be divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    if spec.micro_batch is not None:
        if per_rank % spec.micro_batch:
            raise ConfigError(f"{path}.micro_batch", spec.micro_batch,
                              f"must divide the per-rank batch {per_rank} (global batch {global_batch} / world "
                              f"size {world_size}) so that micro-batch x grad-accum x world = global batch")
        micro_batch = spec.micro_batch
    else:
        fitting = [d for d in _divisors(per_rank) if d * seq_len <= cur.micro_batch_tokens]
        micro_batch = max(fitting, default=1)
    return _Shape(seq_len, global_batch, micro_batch, per_rank // micro_batch, samples_per_step)


@functools.lru_cache(maxsize=64)
def _divisors(n: int) -> tuple[int, ...]:
    """The divisors of ``n``, found up to its square root (a pacing function asks once per length)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted({*small, *(n // d for d in small)}))


def _end_step(config: Config, spec: SegmentSettings, path: str, is_last: bool, start_step: int, start_tokens: int,
              shapes: Sequence[tuple[_Shape, Optional[int]]]) -> int:
    """First step after the segment. ``shapes``: (shape, step where the next shape starts or None)."""
    run = config.run
    if spec.until_step is None and spec.until_tokens is None:
        if not is_last:
            raise ConfigError(f"{path}.until_step", None, "every stage but the last needs until_step or until_tokens")
        if run.total_steps is None and run.total_tokens is None:
            raise ConfigError(f"{path}.until_step", None,
                              "the last stage needs until_step or until_tokens, or set run.total_steps / "
                              "run.total_tokens")
        until_step, until_tokens = run.total_steps, run.total_tokens
        step_field, token_field = "run.total_steps", "run.total_tokens"
    else:
        if is_last and (run.total_steps is not None or run.total_tokens is not None):
            field = "run.total_steps" if run.total_steps is not None else "run.total_tokens"
            raise ConfigError(field, run.total_steps or run.total_tokens,
                              f"conflicts with {path}'s until_step/until_tokens: give the end once")
        until_step, until_tokens = spec.until_step, spec.until_tokens
        step_field, token_field = f"{path}.until_step", f"{path}.until_tokens"

    if until_step is not None:
        if until_step <= start_step:
            raise ConfigError(step_field, until_step,
                              f"must be greater than the step this stage starts at ({start_step}); "
                              "stages must be in order")
        return until_step
    assert until_tokens is not None
    if until_tokens <= start_tokens:
        raise ConfigError(token_field, until_tokens,
                          f"must be greater than the tokens trained when this stage starts ({start_tokens}); "
                          "stages must be in order")
    step, tokens = start_step, start_tokens
    for shape, next_start in shapes:
        span = None if next_start is None else next_start - step
        needed = math.ceil((until_tokens - tokens) / shape.tokens_per_step)
        if span is None or needed <= span:
            if step + needed > MAX_STEPS:
                raise ConfigError(token_field, until_tokens,
                                  f"takes {step + needed:,} steps at {shape.tokens_per_step:,} tokens per step; at "
                                  f"most {MAX_STEPS:,}")
            return step + needed
        step, tokens = step + span, tokens + span * shape.tokens_per_step
    raise AssertionError("the last shape has no end")


def _window(cur: CurriculumConfig, spec: SegmentSettings, path: str, start: int, end: int, first_shape: _Shape,
            previous: Optional[LRWindow]) -> LRWindow:
    steps = end - start
    if spec.warmup_tokens is not None:
        warmup = math.ceil(spec.warmup_tokens / first_shape.tokens_per_step)
        if cur.warmup_cap_steps is not None:
            warmup = min(warmup, cur.warmup_cap_steps)
        field, value = f"{path}.warmup_tokens", spec.warmup_tokens
    else:
        warmup = spec.warmup_steps or 0
        field, value = f"{path}.warmup_steps", warmup
    if warmup > steps:
        raise ConfigError(field, value, f"warmup of {warmup} steps is longer than its stage ({steps} steps)")
    peak, _ = _peak_lr(cur, spec, path, first_shape)
    start_lr = 0.0
    if previous is not None and cur.warmup_start == "previous":
        start_lr = previous.lr_at(previous.end_step - 1)
    return LRWindow(start_step=start, end_step=end, warmup_steps=warmup, start_lr=start_lr, peak_lr=peak,
                    min_lr=peak * spec.min_lr_ratio, decay=spec.decay)


def _peak_lr(cur: CurriculumConfig, spec: SegmentSettings, path: str, shape: _Shape) -> tuple[float, LRSource]:
    """The stage's peak LR and how it was set, at most ``lr_max``."""
    if spec.lr_mult is not None:
        peak, source = cur.base_lr * spec.lr_mult, "multiplier"
    elif spec.lr is None or spec.lr == "auto":
        peak, source = rule_lr(cur.lr_scaling, cur.base_lr, shape.global_batch, shape.seq_len), "auto"
    else:
        peak, source = float(spec.lr), "absolute"
    if not math.isfinite(peak):  # base_lr: 1e308 times a batch ratio
        field = f"{path}.lr_mult" if source == "multiplier" else "curriculum.base_lr"
        raise ConfigError(field, spec.lr_mult if source == "multiplier" else cur.base_lr,
                          f"gives {path} a peak LR of {peak}; it must be finite")
    return (peak if spec.lr_max is None else min(peak, spec.lr_max)), source  # type: ignore[return-value]


def _grad_clip(cur: CurriculumConfig, spec: SegmentSettings, seq_len: int) -> tuple[float, ClipSource]:
    if spec.grad_clip == "auto":
        return auto_grad_clip(cur.grad_clip_auto, seq_len), "auto"
    return float(spec.grad_clip), "absolute"
