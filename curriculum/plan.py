"""What ``curriculum-pretrain plan`` prints: the resolved schedule as a table or as JSON; and the one-line summaries
``curriculum-pretrain recipes`` prints."""

from __future__ import annotations

from typing import Any, Sequence

from curriculum.config import Config
from curriculum.schedule import Schedule


def plan_dict(schedule: Schedule, per_step: bool = False) -> dict[str, Any]:
    """The schedule as JSON-ready data; scripts read these keys."""
    out: dict[str, Any] = {
        "mode": schedule.mode,
        "world_size": schedule.world_size,
        "max_seq_len": schedule.max_seq_len,
        "stages": [
            {
                "index": s.index,
                "start_step": s.start_step,
                "end_step": s.end_step,
                "start_tokens": s.start_tokens,
                "end_tokens": s.end_tokens,
                "seq_len": s.seq_len,
                "micro_batch": s.micro_batch,
                "grad_accum": s.grad_accum,
                "world_size": s.world_size,
                "global_batch": s.global_batch,
                "tokens_per_step": s.tokens_per_step,
                "peak_lr": s.peak_lr,
                "rule_lr": s.rule_lr,
                "lr_source": s.lr_source,
                "lr_max": s.lr_max,
                "warmup_steps": s.warmup_steps,
                "grad_clip": s.grad_clip,
                "decay": s.decay,
            }
            for s in schedule.stages
        ],
        "lr_events": [{"at_step": at, "multiply": m} for at, m in schedule.lr_events],
        "shapes": [{"micro_batch": micro, "seq_len": seq_len} for micro, seq_len in schedule.distinct_shapes()],
        "total_steps": schedule.total_steps,
        "total_tokens": schedule.total_tokens,
        "cut_from": schedule.cut_from,
    }
    if per_step:
        out["steps"] = [
            {
                "step": step,
                "seq_len": schedule.seq_len_at(step),
                "global_batch": schedule.global_batch_at(step),
                "lr": schedule.lr_at(step),
                "grad_clip": schedule.grad_clip_at(step),
            }
            for step in range(schedule.total_steps)
        ]
    return out


def human_count(n: float, spec: str = ".2f") -> str:
    """1234 -> '1.23K', 5_000_000 -> '5.00M'; with ``spec`` '.4g' (axis labels): '1.234K', '5M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:{spec}}{unit}"
    return f"{n:g}"


def format_plan_table(schedule: Schedule, title: str = "", dynamic_shapes: bool = False) -> str:
    """One row per stage, then totals. ``rule LR`` is what the scaling rule gives; ``*`` marks a hand-set LR
    that differs from it by more than 2x. ``dynamic_shapes``: the run compiles one graph for all its training
    shapes (``kernels.dynamic_shapes``), which the graph count follows."""
    header = ["stage", "steps", "tokens", "seq_len", "micro x accum x world = batch", "tokens/step",
              "peak LR", "rule LR", "warmup", "clip"]
    rows = []
    for s in schedule.stages:
        off = s.lr_source != "auto" and not (0.5 <= s.peak_lr / s.rule_lr <= 2.0)
        rows.append([
            str(s.index),
            f"{s.start_step}-{s.end_step - 1}",
            f"{human_count(s.start_tokens)}-{human_count(s.end_tokens)}",
            str(s.seq_len),
            f"{s.micro_batch} x {s.grad_accum} x {s.world_size} = {s.global_batch}",
            f"{s.tokens_per_step:,}",
            f"{s.peak_lr:.2e}" + (" (x)" if s.lr_source == "multiplier" else "")
            + (" (cap)" if s.lr_max is not None and s.peak_lr == s.lr_max else ""),
            f"{s.rule_lr:.2e}" + (" *" if off else ""),
            str(s.warmup_steps),
            f"{s.grad_clip:g}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append(f"total: {schedule.total_steps:,} steps, {schedule.total_tokens:,} tokens "
                 f"({human_count(schedule.total_tokens)}), mode {schedule.mode}, world size {schedule.world_size}, "
                 f"eval at seq_len {schedule.max_seq_len}")
    if schedule.cut_from is not None:
        lines.append(f"cut at step {schedule.total_steps:,} of {schedule.cut_from:,} by run.max_steps: later stages "
                     "dropped, LRs and tokens before the cut as in the full plan")
    for at, multiply in schedule.lr_events:
        lines.append(f"LR event: x{multiply:g} from step {at}")
    shapes = schedule.distinct_shapes()
    listed = ", ".join(f"{micro}x{seq_len}" for micro, seq_len in shapes[:8]) + (", ..." if len(shapes) > 8 else "")
    other = "false" if dynamic_shapes else "auto"
    lines.append(f"shapes: {len(shapes)} training (micro-batch x seq_len: {listed}); kernels.compile builds "
                 f"{schedule.compiled_graphs(dynamic_shapes)} graphs with evaluation "
                 f"({schedule.compiled_graphs(not dynamic_shapes)} with kernels.dynamic_shapes: {other})")
    lines.append("steps count from 0; a stage runs steps start-end inclusive. (x): peak LR = base_lr x lr_mult. "
                 "(cap): limited by the stage's lr_max. rule LR: the lr_scaling rule; * = hand-set LR off from it "
                 "by more than 2x.")
    return "\n".join(lines)


def format_recipe_list(recipes: Sequence[tuple[str, Config, Schedule]]) -> str:
    """One aligned line per ``(name, config, schedule)``: the name, the model, the number of stages, the seq_len
    range, and the steps and tokens of the whole plan."""
    rows = []
    for name, config, schedule in recipes:
        lengths = sorted({stage.seq_len for stage in schedule.stages})
        stages = len(schedule.stages)
        rows.append([
            name,
            f"{config.model.arch} {config.model.preset}",
            f"{stages} stage{'s' if stages > 1 else ''}",
            f"seq_len {lengths[0]}" + (f"-{lengths[-1]}" if len(lengths) > 1 else ""),
            f"{schedule.total_steps:,} steps",
            f"{human_count(schedule.total_tokens)} tokens",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    right_aligned = {4, 5}  # steps and tokens
    return "\n".join("  ".join(cell.rjust(w) if i in right_aligned else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)
