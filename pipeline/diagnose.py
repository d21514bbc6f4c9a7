"""``diagnose``: loss spikes, plateaus, gradient-norm trends and throughput drops in a run's ``metrics.jsonl``.

Torch-free (numpy, and matplotlib for the plot). Steps are numbered from 0, as the training loop logs them; a
finding's ``steps`` is an inclusive ``[first, last]`` range. Every statistic below is taken over *logged* train lines
of one stage (with ``run.log_every: 1``, the default, a logged line is a step): a stage switch changes the sequence
length and so the loss level, the gradient norm and the throughput, so no comparison ever crosses a stage boundary.

What is looked for, with the thresholds (module constants) chosen:

- spike: the spike guard's definition (``pipeline.spikes``, the guard's defaults: ``--spike-rule robust``), a loss
  far above its stage's recent median in units of the recent spread, or a gradient norm far above its recent
  median, or a non-finite value; replayed over the logged lines as the guard sees them, so spike lines are left
  out of later references and a run of bad steps cannot raise its own bar. Consecutive spike lines are one
  finding. ``--spike-rule ratio --spike-factor F`` is the earlier rule: a loss above F x the recent mean.
- plateau: within a stage, ``window`` or more lines over which the smoothed loss (trailing median of 10, judged from
  the stage's 10th line on) never gets 1% below the best it had reached.
- eval-plateau: the best of the last 3 evaluations not 1% below the best evaluation before them.
- grad-norm-rising: a stage whose last-window median gradient norm is over 3x its first-window median (windows of
  ``max(window, 10)`` lines, at most half the stage each; the fitted growth of log grad_norm is in the message).
- clipping: a stage where more than half of the steps had a (pre-clip) gradient norm above ``grad_clip``. When the
  run directory's ``config.json`` shows that ``grad_clip: auto`` chose that clip, it is a note, not a problem: the
  clip is the project's default (``curriculum.grad_clip_auto``), and a clip a little under the typical gradient norm
  is a stabiliser more than a brake under AdamW, which divides the update by the gradient's running scale. The
  shipped tiny-cpu run's stage 2: auto clip 1.0 at seq_len 256, median norm 1.12, clipped on 81 % of its steps;
  the same run with that stage's clip at 5.0 (never binding) ends at eval loss 5.731 against 5.733, and its
  stage 2 train loss averages 5.187 either way. Without a config.json, a binding clip equal to what the default
  rule gives the stage's length is a problem that says so.
- throughput-drop: lines whose ``tok_per_s`` is under 50% of the stage median, merged into spans; each stage's first
  line, which pays for new shapes (allocation, kernel selection), is left out of the median and of the search.
- diverged: a stage whose loss ended more than 10% above where it started (its final train loss, mean of the last 5
  lines, or its last line's loss, against its first line's: the sweep's rule, per stage and with a margin for the
  noise of a stage that has levelled off), however few lines it has; in a stage of fewer than 20 lines (just after a
  switch, where a new stage's warmup can bump the loss up) a rise of 10-25% is a note, more a problem.
- guard: the lines the training loop's spike guard writes (``kind: guard``: step, stage, seq_len, reason, action and
  the numbers it judged), consecutive ones with the same reason and action merged.

Other tools' logs are read too (``load_records``): a HF Trainer ``trainer_state.json`` and TensorBoard event files
become the same records (``pipeline.external``), as one stage without throughput or clipping figures.

Each check needs a minimum of lines (``not_judged``): a stage too short for one says so, per stage, as ``not judged
(too few lines: N < M)``, in the stage table ("-") and under it, and is not counted as clean.

A finding is a problem, or a note (the clip ``grad_clip: auto`` chose): ``run`` returns 1 when there is a problem,
0 when there is none (notes and checks not judged do not change it), and bad input (nothing readable at the path,
an unreadable line, ``--window`` < 2, ``--spike-factor`` <= 1) raises ``ConfigError``, which the CLI turns into exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np

from curriculum.config import Config, GradClipAutoConfig
from curriculum.errors import ConfigError
from curriculum.schedule import auto_grad_clip, build_schedule, describe_auto_grad_clip
from pipeline.external import READABLE, read_logs
from pipeline.rundir import RunDir, loss_rose, read_checked, read_config
from pipeline.spikes import Spike, SpikeRule, find_spike_steps

MIN_ROWS = 10
"""Fewest lines a mean or a median is taken over before anything is judged by it."""
SMOOTH_ROWS = 10
"""Width of the trailing running median that smooths the loss for plateaus and the stage table."""
LOSS_ENDS_ROWS = 2 * SMOOTH_ROWS
"""Finite losses a stage needs for its "loss first" and "loss last": the medians of its first and of its last
``SMOOTH_ROWS``, which must not be the same lines."""
PLATEAU_TOLERANCE = 0.01
"""A smoothed (or eval) loss must fall this share below the best so far to count as progress."""
EVAL_PLATEAU_COUNT = 3
"""This many last evaluations with no progress over the best earlier one make an eval plateau."""
GRAD_NORM_RISE = 3.0
"""Last-window over first-window median gradient norm above which the norm is rising."""
CLIP_SHARE = 0.5
"""Share of steps clipped above which the clip is binding most of the time."""
RISE_MARGIN = 0.1
"""A stage's final loss this share above its first is a divergence (below it, noise on a level stretch)."""
SHORT_RISE_MARGIN = 0.25
"""The same for a stage of fewer than ``LOSS_ENDS_ROWS`` lines; between the two margins it is a note."""
THROUGHPUT_DROP = 0.5
"""A line under this share of its stage's median tokens per second is a drop."""

Record = dict[str, Any]
Severity = Literal["problem", "note"]


@dataclass(frozen=True)
class Finding:
    """One finding: what, where (inclusive step range and stage), the numbers, and what to try."""

    kind: str
    """spike, plateau, eval-plateau, grad-norm-rising, clipping, throughput-drop, diverged or guard."""
    first_step: int
    last_step: int
    stage: Optional[int]
    """None only where a stage cannot be told (an evaluation logged before any train line)."""
    message: str
    suggestion: str
    severity: Severity = "problem"
    """``note``: worth knowing, not a problem (the exit status stays 0)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "steps": [self.first_step, self.last_step],
                "stage": self.stage, "message": self.message, "suggestion": self.suggestion}


# ------------------------------------------------------------------------------------------------ reading


def read_records(run_dir: Path) -> list[Record]:
    """Every line of ``run_dir/metrics.jsonl`` (blank lines skipped; kinds not known here kept as they are).

    Raises ``ConfigError`` naming the file and line number for a line that is not a JSON object or lacks a number
    its kind carries (``pipeline.rundir.read_checked``), and naming the directory when it or its ``metrics.jsonl``
    is missing.
    """
    if not run_dir.is_dir():
        raise ConfigError("run_dir", str(run_dir), "no such directory; give a run directory (holding metrics.jsonl)")
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise ConfigError("run_dir", str(run_dir), "holds no metrics.jsonl; give a run directory that has trained")
    records = read_checked(path, strict=True)
    if not any(record.get("kind") == "train" for record in records):
        raise ConfigError("run_dir", str(run_dir), "metrics.jsonl has no train lines yet; nothing to diagnose")
    return records


def load_records(path: Path) -> tuple[list[Record], str]:
    """The records at ``path``, and what they were read from (the report's first line says it): a run directory of
    this project or its ``metrics.jsonl``, else another tool's logs (``pipeline.external.read_logs``)."""
    run_dir = path.parent if path.name == RunDir(path.parent).metrics.name else path
    if RunDir(run_dir).metrics.is_file():
        return read_records(run_dir), "metrics.jsonl"
    return read_logs(path)


# ------------------------------------------------------------------------------------------------ helpers


def split_stages(train: Sequence[Record]) -> dict[int, list[Record]]:
    """Train lines grouped by stage, in step order within each."""
    stages: dict[int, list[Record]] = {}
    for record in sorted(train, key=lambda r: r["step"]):
        stages.setdefault(record["stage"], []).append(record)
    return dict(sorted(stages.items()))


def smoothed_losses(rows: Sequence[Record], width: int = SMOOTH_ROWS) -> list[float]:
    """Trailing running median of the last ``width`` finite losses at each line (nan until one is finite)."""
    smoothed = []
    for i in range(len(rows)):
        recent = [r["loss"] for r in rows[max(0, i - width + 1):i + 1] if math.isfinite(r["loss"])]
        smoothed.append(float(np.median(recent)) if recent else math.nan)
    return smoothed


def _spans(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers as inclusive (first, last) pairs: [3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
    spans: list[tuple[int, int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], index)
        else:
            spans.append((index, index))
    return spans


def _grad_norms(rows: Sequence[Record]) -> list[Record]:
    """The lines with a usable gradient norm (the engine may not report one)."""
    return [r for r in rows if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0]


def _range_text(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


# ------------------------------------------------------------------------------------------------ detectors


def find_spikes(train: Sequence[Record], rule: SpikeRule) -> list[Finding]:
    """Spikes as the spike guard sees them (``pipeline.spikes``): losses far above the stage's recent level and
    gradient norms far above their recent median, non-finite values always; consecutive spike lines merged."""
    flagged = find_spike_steps(sorted(train, key=lambda r: r["step"]), rule)
    findings = []
    for stage, rows in split_stages(train).items():
        indices = [i for i, row in enumerate(rows) if row["step"] in flagged]
        for first, last in _spans(indices):
            span = rows[first:last + 1]
            first_step, last_step = span[0]["step"], span[-1]["step"]
            where = f"{_range_text(first_step, last_step)} (stage {stage}, seq_len {rows[0]['seq_len']})"
            spikes = [flagged[r["step"]] for r in span]
            if any(spike.non_finite for spike in spikes):
                bad = [spike for spike in spikes if spike.non_finite]
                findings.append(Finding(
                    "spike", first_step, last_step, stage,
                    f"non-finite {bad[0].reason.removeprefix('non_finite_').replace('_', ' ')} ({bad[0].value}) at "
                    f"{len(bad)} of {len(span)} lines, {where}",
                    "the run diverged: lower this stage's peak LR or grad_clip, lengthen its warmup, and check for "
                    "overflow in reduced precision; resume from a checkpoint before the first bad step"))
                continue
            worst = max(zip(span, spikes), key=lambda pair: pair[1].value / (pair[1].running_average or 1.0))
            row, spike = worst
            findings.append(Finding(
                "spike", first_step, last_step, stage,
                f"{_spike_text(row, spike, rows, rule)} ({len(span)} spike line(s), {where})",
                "lower this stage's peak LR or grad_clip, or lengthen its warmup; look at the batches of these "
                "steps for bad data"))
    return findings


def _spike_text(row: Record, spike: Spike, rows: Sequence[Record], rule: SpikeRule) -> str:
    """The numbers of one spike: the loss against the mean of the steps it was judged with, and for the robust
    rule how many spreads above their median; or the gradient norm against its median."""
    if spike.reason == "grad_norm_spike":
        return (f"grad_norm {spike.value:.4g} at step {row['step']} is {spike.value / spike.running_average:.1f}x "
                f"the median {spike.running_average:.4g} of the previous steps")
    text = f"loss {spike.value:.4g} at step {row['step']}"
    before = [r["loss"] for r in rows if r["step"] < row["step"] and math.isfinite(r["loss"])][-rule.window:]
    if before:
        mean = float(np.mean(before))
        text += f" is {spike.value / mean:.2f}x the mean {mean:.4g} of the previous steps of the stage"
    if spike.spreads is not None:
        text += f" and {spike.spreads:.1f} robust spreads above their median {spike.running_average:.4g}"
    return text


def find_plateaus(train: Sequence[Record], window: int, tolerance: float = PLATEAU_TOLERANCE) -> list[Finding]:
    """Spans of ``window`` or more lines in a stage where the smoothed loss makes no progress beyond ``tolerance``."""
    findings = []
    for stage, rows in split_stages(train).items():
        smoothed = smoothed_losses(rows)
        spans: list[tuple[int, int]] = []
        # judged from the first full median on: a median of the first 1-9 lines is as noisy as the loss itself,
        # and one lucky low value there would set a best the run cannot beat
        anchor, best = SMOOTH_ROWS - 1, math.nan  # the line where the best was last beaten by the tolerance
        for i in range(SMOOTH_ROWS - 1, len(rows)):
            value = smoothed[i]
            if not math.isfinite(best) or (math.isfinite(value) and value < best * (1 - tolerance)):
                anchor, best = i, value
            elif i - anchor >= window:
                if spans and spans[-1][0] == anchor:
                    spans[-1] = (anchor, i)
                else:
                    spans.append((anchor, i))
        for first, last in spans:
            first_step, last_step = rows[first]["step"], rows[last]["step"]
            findings.append(Finding(
                "plateau", first_step, last_step, stage,
                f"smoothed loss did not get {tolerance:.0%} below {smoothed[first]:.4g} for {last - first} lines, "
                f"{_range_text(first_step, last_step)} (stage {stage}, seq_len {rows[0]['seq_len']}; "
                f"now {smoothed[last]:.4g})",
                "the LR may be too low (or already decayed) for this stage, or the stage too long for what it "
                "still teaches: try a higher peak LR, or move tokens to the next stage"))
    return findings


def find_eval_plateau(evals: Sequence[Record], train: Sequence[Record], count: int = EVAL_PLATEAU_COUNT,
                      tolerance: float = PLATEAU_TOLERANCE) -> list[Finding]:
    """The last ``count`` evaluations make no progress beyond ``tolerance`` over the best evaluation before them."""
    evals = sorted(evals, key=lambda r: r["step"])
    if len(evals) <= count:
        return []
    earlier_best = min(r["eval_loss"] for r in evals[:-count])
    last = evals[-count:]
    last_best = min(r["eval_loss"] for r in last)
    if last_best < earlier_best * (1 - tolerance):  # (a nan eval loss compares False: no progress)
        return []
    stage = _stage_at(train, last[-1]["step"])
    return [Finding(
        "eval-plateau", last[0]["step"], last[-1]["step"], stage,
        f"the last {count} evaluations (best {last_best:.4g}) are not {tolerance:.0%} below the best earlier one "
        f"({earlier_best:.4g})",
        "validation has stopped improving: check for overfitting (repeated data), or raise the LR; stopping here "
        "saves compute")]


def _stage_at(train: Sequence[Record], step: int) -> Optional[int]:
    """The stage of the last train line at or before ``step``."""
    before = [r for r in train if r["step"] <= step]
    return max(before, key=lambda r: r["step"])["stage"] if before else None


def grad_norm_trend(rows: Sequence[Record], window: int) -> Optional[dict[str, float]]:
    """First- and last-window median gradient norms of one stage, their ratio, and the fitted growth of the norm
    per 100 steps (least squares on log grad_norm); None when the stage has too few norms to compare."""
    normed = _grad_norms(rows)
    width = min(max(window, MIN_ROWS), len(normed) // 2)
    if width < MIN_ROWS:
        return None
    first = float(np.median([r["grad_norm"] for r in normed[:width]]))
    last = float(np.median([r["grad_norm"] for r in normed[-width:]]))
    steps = np.array([r["step"] for r in normed], dtype=float)
    slope = float(np.polyfit(steps, np.log([r["grad_norm"] for r in normed]), 1)[0])
    return {"first_median": first, "last_median": last, "ratio": last / first, "width": float(width),
            "growth_per_100_steps": math.exp(100 * slope)}


def find_grad_norm_trends(train: Sequence[Record], window: int, config: Optional[Config] = None) -> list[Finding]:
    """Per stage, a rising gradient norm and a clip that binds on most steps: a note rather than a problem where
    ``config`` (the run's) shows that ``grad_clip: auto`` chose the clip the stage logged. Without ``config``, a
    clip that the default ``grad_clip: auto`` rule gives the stage's length is a problem that says so."""
    auto = {s.index: s for s in build_schedule(config).stages if s.clip_source == "auto"} if config else {}
    default_rule = GradClipAutoConfig()
    findings = []
    for stage, rows in split_stages(train).items():
        first_step, last_step, seq_len = rows[0]["step"], rows[-1]["step"], rows[0]["seq_len"]
        trend = grad_norm_trend(rows, window)
        if trend is not None and trend["ratio"] > GRAD_NORM_RISE:
            findings.append(Finding(
                "grad-norm-rising", first_step, last_step, stage,
                f"median grad_norm rose {trend['ratio']:.1f}x, from {trend['first_median']:.3g} (first "
                f"{trend['width']:.0f} lines) to {trend['last_median']:.3g} (last {trend['width']:.0f}), fitted "
                f"x{trend['growth_per_100_steps']:.2f} per 100 steps, stage {stage} (seq_len {seq_len})",
                "a growing gradient norm often comes before a divergence: lower this stage's peak LR, check weight "
                "decay, and watch for spikes"))
        share = clip_share(rows)
        if share is not None and share > CLIP_SHARE:
            clips = sorted({r["grad_clip"] for r in rows if r.get("grad_clip") is not None})
            binding = (f"grad_norm was above grad_clip {'/'.join(f'{c:g}' for c in clips)} on {share:.0%} of the "
                       f"steps of stage {stage} (seq_len {seq_len}; median grad_norm "
                       f"{np.median([r['grad_norm'] for r in _grad_norms(rows)]):.3g})")
            chosen = auto.get(stage)
            if config is not None and chosen is not None and clips == [chosen.grad_clip]:
                findings.append(Finding(
                    "clipping", first_step, last_step, stage,
                    f"{binding}; grad_clip: auto chose {chosen.grad_clip:g} for seq_len {chosen.seq_len} (rule: "
                    f"{describe_auto_grad_clip(config.curriculum.grad_clip_auto)})",
                    "if a tight clip is intended (a stabiliser: under AdamW it scales the gradient, hardly the "
                    "update) ignore this; else set this stage's grad_clip or curriculum.grad_clip_auto",
                    severity="note"))
                continue
            if config is None and seq_len is not None and clips == [auto_grad_clip(default_rule, seq_len)]:
                binding += (f"; {clips[0]:g} is what the default grad_clip: auto gives seq_len {seq_len} (rule: "
                            f"{describe_auto_grad_clip(default_rule)}), and without the run's config.json it is not "
                            "known whether it chose it")
            findings.append(Finding(
                "clipping", first_step, last_step, stage, binding,
                "the clip binds most of the time: under AdamW it scales the gradient, hardly the update (tiny-cpu "
                "with stage 2's clip at 1.0 or 5.0 ends at the same eval loss, 5.733 / 5.731), so it matters only if "
                "the gradient norm is rising too; otherwise raise grad_clip to the norms seen, or lower the peak LR"))
    return findings


def clip_share(rows: Sequence[Record]) -> Optional[float]:
    """Share of lines with a gradient norm above their ``grad_clip``; None with fewer than ``MIN_ROWS`` norms."""
    clipped = [r for r in _grad_norms(rows) if r.get("grad_clip") is not None]
    if len(clipped) < MIN_ROWS:
        return None
    return sum(r["grad_norm"] > r["grad_clip"] for r in clipped) / len(clipped)


def median_tok_per_s(rows: Sequence[Record]) -> Optional[float]:
    """Median throughput of a stage without its first line (unless that is all there is)."""
    timed = [r["tok_per_s"] for r in (rows[1:] or rows) if math.isfinite(r["tok_per_s"])]
    return float(np.median(timed)) if timed else None


def find_throughput_drops(train: Sequence[Record], fraction: float = THROUGHPUT_DROP) -> list[Finding]:
    """Spans of lines in a stage under ``fraction`` of the stage's median tokens per second."""
    findings = []
    for stage, rows in split_stages(train).items():
        if len(rows) - 1 < MIN_ROWS:
            continue
        median = median_tok_per_s(rows)
        if median is None:
            continue
        slow = [i for i, r in enumerate(rows) if i > 0 and r["tok_per_s"] < fraction * median]
        for first, last in _spans(slow):
            span = rows[first:last + 1]
            first_step, last_step = span[0]["step"], span[-1]["step"]
            worst = min(r["tok_per_s"] for r in span)
            findings.append(Finding(
                "throughput-drop", first_step, last_step, stage,
                f"tok/s fell to {worst:,.0f} ({worst / median:.0%} of the stage median {median:,.0f}) for "
                f"{len(span)} line(s), {_range_text(first_step, last_step)} (stage {stage}, "
                f"seq_len {rows[0]['seq_len']})",
                "look for what else ran then: other jobs on the node, a slow filesystem or data loading, memory "
                "pressure (swapping, allocator retries), or throttling"))
    return findings


def find_divergence(train: Sequence[Record]) -> list[Finding]:
    """A stage whose finite loss ended more than ``RISE_MARGIN`` above where it started
    (``pipeline.rundir.loss_rose``): judged however short the stage, since no history is needed to see it. A stage
    of fewer than ``LOSS_ENDS_ROWS`` lines (a short stage, or the last one of a run stopped or still running just
    after a switch: all of it is the time just after a switch, when the loss can bump up while the stage's LR warms
    up) is a problem only above ``SHORT_RISE_MARGIN``, else a note."""
    findings = []
    for stage, rows in split_stages(train).items():
        if not (rose := loss_rose(rows, RISE_MARGIN)):
            continue
        short = len(rows) < LOSS_ENDS_ROWS
        if short and (steep := loss_rose(rows, SHORT_RISE_MARGIN)):
            short, rose = False, steep
        findings.append(Finding(
            "diverged", rows[0]["step"], rows[-1]["step"], stage,
            f"the loss ended above where the stage started (seq_len {rows[0]['seq_len']}): {rose}"
            + (f"; a stage of {len(rows)} lines (a problem from {SHORT_RISE_MARGIN:.0%} up)" if short else ""),
            "this stage's LR is past the edge of stability for the model and batch: lower its peak LR (an "
            "`lr-find` or a `sweep` shows where the edge is), lengthen its warmup, or tighten its grad_clip"
            + ("; or train on and run diagnose again" if short else ""),
            severity="note" if short else "problem"))
    return findings


def find_guard_events(guards: Sequence[Record]) -> list[Finding]:
    """The spike guard's lines, one finding per run of consecutive steps with the same reason and action."""
    groups: list[list[Record]] = []
    for record in sorted(guards, key=lambda r: r["step"]):
        previous = groups[-1][-1] if groups else None
        if (previous is not None and record["step"] == previous["step"] + 1
                and (record.get("reason"), record.get("action")) == (previous.get("reason"), previous.get("action"))):
            groups[-1].append(record)
        else:
            groups.append([record])
    findings = []
    for group in groups:
        first, last = group[0], group[-1]
        # the guard's line names the value it judged and its running average; older drafts said running_loss
        numbers = ", ".join(f"{name} {first[key]:.4g}" for name, key in
                            (("loss", "loss"), ("grad_norm", "grad_norm"), ("value", "value"),
                             ("running average", "running_average"), ("running loss", "running_loss"))
                            if isinstance(first.get(key), (int, float)) and not isinstance(first.get(key), bool))
        findings.append(Finding(
            "guard", first["step"], last["step"], first.get("stage"),
            f"spike guard: {first.get('reason', 'triggered')} -> {first.get('action', 'no action logged')} at "
            f"{_range_text(first['step'], last['step'])} (stage {first.get('stage')}, "
            f"seq_len {first.get('seq_len')}{'; first: ' + numbers if numbers else ''})",
            "the guard caught instability; if it fires repeatedly, lower this stage's peak LR or grad_clip"))
    return findings


# ------------------------------------------------------------------------------------------------ the report


def not_judged(rows: Sequence[Record], window: int, rule: SpikeRule) -> list[str]:
    """What one stage is too short for, each as ``check (too few lines: N < M)``, M being the lines the check needs
    before it can find anything. A stage with no gradient norm, clip or throughput at all (another tool's logs) has
    nothing for those checks rather than too little."""
    normed = _grad_norms(rows)
    needs = [
        ("loss first/last", sum(math.isfinite(r["loss"]) for r in rows), LOSS_ENDS_ROWS),
        ("loss spikes", len(rows), rule.history + 1),  # the first `history` losses of a stage are the reference
        ("plateau", len(rows), SMOOTH_ROWS + window),  # smoothed from line SMOOTH_ROWS on, then `window` more lines
    ]
    if normed:
        needs.append(("grad-norm trend", len(normed), 2 * MIN_ROWS))  # first and last windows of MIN_ROWS or more
    clipped = [r for r in normed if r.get("grad_clip") is not None]
    if clipped:
        needs.append(("clipping", len(clipped), MIN_ROWS))
    if median_tok_per_s(rows) is not None:
        needs.append(("throughput drops", len(rows) - 1, MIN_ROWS))  # the stage's first line is left out
    return [f"{check} (too few lines: {have} < {need})" for check, have, need in needs if have < need]


def stage_summaries(train: Sequence[Record], evals: Sequence[Record], findings: Sequence[Finding], window: int,
                    rule: SpikeRule) -> list[dict[str, Any]]:
    """One row per stage: lines, step range, seq_len, first/last loss, medians, clip share, spikes, and what the
    stage is too short to judge (a column it makes meaningless is None; an eval plateau that too few evaluations
    leave unjudged is listed with the stage of the last one)."""
    summaries = []
    last_eval_stage = _stage_at(train, max(r["step"] for r in evals)) if evals else None
    for stage, rows in split_stages(train).items():
        losses = [r["loss"] for r in rows if math.isfinite(r["loss"])]
        norms = [r["grad_norm"] for r in _grad_norms(rows)]
        spikes = sum(f.kind == "spike" and f.stage == stage for f in findings)
        unjudged = not_judged(rows, window, rule)
        if stage == last_eval_stage and len(evals) <= EVAL_PLATEAU_COUNT:
            unjudged.append(f"eval plateau (too few evaluations: {len(evals)} < {EVAL_PLATEAU_COUNT + 1})")
        summaries.append({
            "stage": stage,
            "seq_len": rows[0]["seq_len"],
            "steps": [rows[0]["step"], rows[-1]["step"]],
            "lines": len(rows),
            # medians of the first and of the last SMOOTH_ROWS finite losses, never the same lines
            "loss_first": float(np.median(losses[:SMOOTH_ROWS])) if len(losses) >= LOSS_ENDS_ROWS else None,
            "loss_last": float(np.median(losses[-SMOOTH_ROWS:])) if len(losses) >= LOSS_ENDS_ROWS else None,
            "median_tok_per_s": median_tok_per_s(rows),
            "median_grad_norm": float(np.median(norms)) if norms else None,
            "clip_share": clip_share(rows),
            # none found where no loss could be judged is not "0 spikes"
            "spikes": None if spikes == 0 and len(rows) <= rule.history else spikes,
            "not_judged": unjudged,
        })
    return summaries


def diagnose(records: Sequence[Record], window: int = 50, rule: SpikeRule = SpikeRule(),
             config: Optional[Config] = None) -> tuple[list[dict[str, Any]], list[Finding]]:
    """The stage table and every finding of a run's metric lines, findings in step order; ``config``, the run's
    when known, tells a clip that ``grad_clip: auto`` chose from one set by hand."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    guards = [r for r in records if r.get("kind") == "guard"]
    findings = (find_spikes(train, rule) + find_plateaus(train, window)
                + find_eval_plateau(evals, train) + find_grad_norm_trends(train, window, config)
                + find_throughput_drops(train) + find_guard_events(guards) + find_divergence(train))
    findings.sort(key=lambda f: (f.first_step, f.last_step, f.kind))
    return stage_summaries(train, evals, findings, window, rule), findings


def problems(findings: Sequence[Finding]) -> list[Finding]:
    """The findings that are problems (not notes): what the exit status and the report's count go by."""
    return [f for f in findings if f.severity == "problem"]


def report_dict(run_dir: str, source: str, stages: list[dict[str, Any]], findings: Sequence[Finding]
                ) -> dict[str, Any]:
    """The ``--json`` output and ``diagnose.json``; non-finite numbers become null (JSON has no NaN)."""
    return json_safe({"run_dir": run_dir, "source": source, "stages": stages,
                      "findings": [f.to_dict() for f in findings], "problems": len(problems(findings))})


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN), through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def format_report(run_dir: str, source: str, stages: list[dict[str, Any]], findings: Sequence[Finding]) -> str:
    """The stage table, what each stage is too short to judge, then one paragraph per problem and per note (or a
    line saying there are none)."""

    def number(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (f"{'stage':>5}  {'steps':>11}  {'seq_len':>7}  {'loss first':>10}  {'loss last':>9}  "
              f"{'tok/s':>10}  {'grad_norm':>9}  {'clipped':>7}  {'spikes':>6}")
    lines = [f"{run_dir}: {source}, {sum(s['lines'] for s in stages)} train lines in {len(stages)} stage(s)", "",
             header]
    for s in stages:
        steps = f"{s['steps'][0]}-{s['steps'][1]}"
        seq_len = number(s["seq_len"], "d")  # None in another tool's logs
        lines.append(f"{s['stage']:>5}  {steps:>11}  {seq_len:>7}  {number(s['loss_first'], '.4f'):>10}  "
                     f"{number(s['loss_last'], '.4f'):>9}  {number(s['median_tok_per_s'], ',.0f'):>10}  "
                     f"{number(s['median_grad_norm'], '.3g'):>9}  {number(s['clip_share'], '.0%'):>7}  "
                     f"{number(s['spikes'], 'd'):>6}")
    unjudged = [s for s in stages if s["not_judged"]]
    if unjudged:
        lines += ["", "not judged:"] + [f"  stage {s['stage']}: {', '.join(s['not_judged'])}" for s in unjudged]
    lines.append("")
    found = problems(findings)
    notes = [f for f in findings if f.severity == "note"]
    if not found:
        lines.append("no problems found" + (" in what could be judged" if unjudged else ""))
    for title, group in ((f"{len(found)} problem(s):", found), (f"{len(notes)} note(s), not problems:", notes)):
        if group:
            lines.append(title)
        for f in group:
            lines.append(f"  [{f.kind}] {f.message}")
            lines.append(f"      suggestion: {f.suggestion}")
    return "\n".join(lines)


def plot_diagnosis(records: Sequence[Record], findings: Sequence[Finding], out: Path) -> Path:
    """Loss with spike markers and plateau spans shaded, grad_norm with the clip, tok/s with drops shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
    evals = [r for r in records if r.get("kind") == "eval"]
    stages = split_stages(train)
    fig, (ax_loss, ax_norm, ax_speed) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    for stage, rows in stages.items():
        label = f"stage {stage} (seq {rows[0]['seq_len']})"
        ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=label)
        normed = _grad_norms(rows)
        ax_norm.plot([r["step"] for r in normed], [r["grad_norm"] for r in normed], lw=0.8, label=label)
        ax_speed.plot([r["step"] for r in rows], [r["tok_per_s"] for r in rows], lw=0.8, label=label)
    clipped = [r for r in train if r.get("grad_clip") is not None]
    if clipped:
        ax_norm.step([r["step"] for r in clipped], [r["grad_clip"] for r in clipped], "k--", where="post", lw=1,
                     label="grad_clip")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "ko", ms=4, label="eval")
    finite = [r["loss"] for r in train if math.isfinite(r["loss"])]
    top = max(finite) if finite else 1.0
    for f in findings:
        if f.kind == "spike":
            hits = [r for r in train if f.first_step <= r["step"] <= f.last_step]
            ax_loss.plot([r["step"] for r in hits], [r["loss"] if math.isfinite(r["loss"]) else top for r in hits],
                         "rx", ms=8, mew=2)
        elif f.kind in ("plateau", "eval-plateau"):
            ax_loss.axvspan(f.first_step, f.last_step, color="orange", alpha=0.2)
        elif f.kind == "throughput-drop":
            ax_speed.axvspan(f.first_step - 0.5, f.last_step + 0.5, color="red", alpha=0.2)
        elif f.kind in ("grad-norm-rising", "clipping"):
            ax_norm.axvspan(f.first_step, f.last_step, color="red", alpha=0.08)
        elif f.kind == "guard":
            ax_loss.axvline(f.first_step, color="purple", lw=1, ls=":")
    for ax in (ax_loss, ax_norm, ax_speed):
        for rows in list(stages.values())[1:]:
            ax.axvline(rows[0]["step"], color="grey", lw=0.6, ls=":")
    ax_loss.set(ylabel="loss", title="loss (x: spikes, shaded: plateaus)")
    ax_norm.set(ylabel="grad_norm", yscale="log", title="gradient norm (dashed: grad_clip)")
    ax_speed.set(xlabel="step", ylabel="tok/s", title="throughput (shaded: drops)")
    for ax in (ax_loss, ax_norm, ax_speed):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


HELP = "find spikes, plateaus and slowdowns in a run's metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import finite_float

    parser.add_argument("run_dir", help=READABLE)
    parser.add_argument("--window", type=int, default=50,
                        help="steps over which a plateau (no improvement) and trends are judged (default 50)")
    parser.add_argument("--spike-rule", choices=["robust", "ratio"], default="robust",
                        help="what a spike is, as the spike guard's guard.method (default robust: far above the "
                             "recent median in units of the recent spread)")
    parser.add_argument("--spike-factor", type=finite_float, default=2.0,
                        help="with --spike-rule ratio: a loss this many times the running mean is a spike (default 2)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    """The ``diagnose`` subcommand: print the report, write ``diagnose.json`` and ``diagnose.png`` in the directory
    given (the file's directory when a file is given); 0 when no problem was found (notes and checks not judged
    aside), 1 when one was."""
    if args.window < 2:
        raise ConfigError("--window", args.window, "must be an integer >= 2 (logged steps)")
    if args.spike_factor <= 1:
        raise ConfigError("--spike-factor", args.spike_factor, "must be a number > 1 (times the running mean loss)")
    path = Path(args.run_dir)
    records, source = load_records(path)
    run_dir = path if path.is_dir() else path.parent
    rule = SpikeRule(method=args.spike_rule, loss_factor=args.spike_factor)
    stages, findings = diagnose(records, window=args.window, rule=rule, config=run_config(run_dir))
    report = report_dict(str(args.run_dir), source, stages, findings)
    try:
        (run_dir / "diagnose.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_diagnosis(records, findings, run_dir / "diagnose.png")
    except OSError as err:
        raise ConfigError("run_dir", str(args.run_dir), f"cannot write diagnose.json and diagnose.png there "
                          f"({err.strerror or err}); run it on a copy in a directory you can write to") from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(str(args.run_dir), source, stages, findings))
        print(f"\nwrote {run_dir / 'diagnose.json'} and {run_dir / 'diagnose.png'}")
    return 1 if problems(findings) else 0


def run_config(run_dir: Path) -> Optional[Config]:
    """The config a run of this project trained with (its ``config.json``), which tells where its clips came from;
    None for another tool's logs, or for a config.json this version no longer accepts (a clip that binds is then a
    problem, whatever chose it)."""
    try:
        config = read_config(RunDir(run_dir).config)
        if config is not None:
            build_schedule(config)
        return config
    except ConfigError:
        return None
