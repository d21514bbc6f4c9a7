"""``curriculum-pretrain sweep``: one real training run per base LR, then the comparison.

    curriculum-pretrain sweep --config tiny-cpu                          # 7 LRs, base_lr/10 .. base_lr*10
    curriculum-pretrain sweep --config X --lrs 1e-4,3e-4,1e-3,3e-3       # these LRs, one after another
    curriculum-pretrain sweep --config X --gpus 0,1,2,3                  # at most one run per GPU at a time

The swept value is ``curriculum.base_lr``. Stages whose peak is set absolutely (``lr: 6e-4``) are scaled by
``new_base / old_base`` so the whole schedule moves together; ``lr_mult`` and ``lr: auto`` stages follow
``base_lr`` by themselves, and ``lr_max`` caps stay where they are. Each run's changes are ``--set`` overrides
given to the trainer and recorded in the sweep manifest.

Sweep directory (default ``runs/<name>-sweep``)::

    sweep_manifest.json         the LRs, each run's overrides, peak LRs, status and trainer launches
    lr_3.00e-04/                a run directory of the trainer (config.json, metrics.jsonl/.csv, summary.json,
                                checkpoints/, train.log) plus loss_curves.png and lr_schedule.png drawn here
    lr_sweep_comparison.png     every run's train loss vs tokens, one colour per LR (linear and log tokens)
    lr_vs_final_loss.png        final loss vs LR (log x), diverged runs marked
    lr_sweep_analysis.md/.json  per-LR table, best LR, first divergent LR and their ratio

Resumable: a run whose ``summary.json`` exists is done and skipped; any other run is started (or resumed from its
latest checkpoint) with ``--resume auto``. A trainer exit status other than 0 marks the run ``failed`` and the
sweep goes on with the others, except status 2 (bad input) on the first run, which aborts the sweep with the
trainer's error. The sweep exits 0 when every run is done, 1 when some failed or stopped (the analysis is written
either way), 2 on bad input.

The analysis is pure functions over the runs' metrics records (``loss_spikes``, ``classify_run``,
``analyze_run``, ``analyze_sweep``); the process handling (``run_jobs``) is separate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

from curriculum.config import Config, CurriculumConfig
from curriculum.errors import ConfigError
from pipeline.diagnose import json_safe
from pipeline.environment import LAUNCHER_VARIABLES, free_port

DEFAULT_GRID_POINTS = 7
DEFAULT_GRID_SPAN = 10.0  # the default grid runs from base_lr / 10 to base_lr * 10
FINAL_LOSS_STEPS = 5  # "final train loss" is the mean of the last 5 logged steps
BAD_INPUT_EXIT = 2  # the trainer's (and every subcommand's) exit status for bad input
MANIFEST = "sweep_manifest.json"
# variables a launcher sets for its workers: a run started by the sweep is one process of its own
Status = Literal["converged", "unstable", "diverged"]


# --------------------------------------------------------------------------------------------- the LR grid


def parse_lrs(text: str) -> list[float]:
    """``--lrs 1e-4,3e-4,1e-3``: positive finite numbers, each once, in increasing order."""
    lrs: list[float] = []
    for item in text.split(","):
        try:
            lr = float(item)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError("--lrs", item.strip(),
                              "must be comma-separated positive numbers, e.g. --lrs 1e-4,3e-4,1e-3")
        if lr in lrs:
            raise ConfigError("--lrs", item.strip(), "given twice")
        lrs.append(lr)
    return check_run_names(sorted(lrs))


def default_lrs(base_lr: float, points: int = DEFAULT_GRID_POINTS, span: float = DEFAULT_GRID_SPAN) -> list[float]:
    """``points`` log-spaced LRs from ``base_lr / span`` to ``base_lr * span``, with 3 significant digits (the base
    itself exactly): for 3e-3, 3e-4, 6.46e-4, 1.39e-3, 3e-3, 6.46e-3, 1.39e-2, 3e-2."""
    if points == 1:
        return [base_lr]
    middle = (points - 1) / 2
    return [base_lr if k == middle else float(f"{base_lr * span ** ((k - middle) / middle):.3g}")
            for k in range(points)]


def run_name(lr: float) -> str:
    """The run directory of one LR: ``lr_3.00e-04``."""
    return f"lr_{lr:.2e}"


def check_run_names(lrs: Sequence[float]) -> list[float]:
    names: dict[str, float] = {}
    for lr in lrs:
        if run_name(lr) in names:
            raise ConfigError("--lrs", f"{names[run_name(lr)]!r},{lr!r}",
                              f"both would train in {run_name(lr)}: LRs must differ in their first 3 "
                              "significant digits")
        names[run_name(lr)] = lr
    return list(lrs)


def lr_overrides(curriculum: CurriculumConfig, base_lr: float) -> list[str]:
    """The ``--set`` overrides that move the whole LR schedule to ``base_lr``.

    ``curriculum.base_lr`` itself, and every absolute peak (``lr: <number>``, in a stage or the pacing segment)
    times ``base_lr / curriculum.base_lr``. ``lr_mult`` and ``lr: auto`` peaks are computed from ``base_lr`` by the
    schedule, so they need nothing; ``lr_max`` caps stay. Values are written with ``repr`` (YAML reads them back
    as the same float)."""
    scale = base_lr / curriculum.base_lr
    overrides = [f"curriculum.base_lr={base_lr!r}"]
    segments = ([(f"curriculum.stages.{i}", stage) for i, stage in enumerate(curriculum.stages)]
                if curriculum.stages is not None else [("curriculum.pacing", curriculum.pacing)])
    for path, segment in segments:
        if segment is not None and isinstance(segment.lr, float):  # absolute; None and "auto" follow base_lr
            overrides.append(f"{path}.lr={segment.lr * scale!r}")
    return overrides


def parse_gpus(text: str, cuda_devices: int) -> list[int]:
    """``--gpus 0,1,2,3``: distinct ids of CUDA devices this process can see (``cuda_devices`` of them)."""
    if cuda_devices == 0:
        raise ConfigError("--gpus", text, "this machine has no CUDA device; leave --gpus out to train the runs "
                                          "one after another")
    gpus: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ConfigError("--gpus", item, "must be comma-separated GPU ids (0, 1, ...), e.g. --gpus 0,1,2,3")
        if int(item) >= cuda_devices:
            raise ConfigError("--gpus", item, f"this machine has {cuda_devices} CUDA device(s): ids 0 .. "
                                              f"{cuda_devices - 1}")
        if int(item) in gpus:
            raise ConfigError("--gpus", item, "given twice")
        gpus.append(int(item))
    return gpus


# --------------------------------------------------------------------------------------------- analysis (pure)


@dataclass
class RunAnalysis:
    """One run's outcome, from its metrics records. Losses are ``None`` where there are none (or non-finite)."""

    lr: float
    name: str
    status: Status
    reasons: list[str]
    """Why the run is ``diverged`` or ``unstable`` (empty when ``converged``)."""
    steps: int
    """Train lines logged."""
    first_loss: Optional[float]
    final_train_loss: Optional[float]
    """Mean of the last 5 logged train losses."""
    final_eval_loss: Optional[float]
    min_loss: Optional[float]
    """Lowest train loss."""
    spikes: list[int]
    """Steps with a spike, as the spike guard and ``diagnose`` define it (``loss_spikes``)."""
    guard_events: int
    """``kind: guard`` lines in metrics.jsonl."""
    non_finite: bool
    failed: bool
    """The trainer exited with a status other than 0."""
    complete: bool
    """The run reached its end (``summary.json`` exists)."""

    @property
    def final_loss(self) -> Optional[float]:
        """What runs are compared by: the final eval loss, or the final train loss when there is no eval."""
        return self.final_eval_loss if self.final_eval_loss is not None else self.final_train_loss


@dataclass
class SweepAnalysis:
    runs: list[RunAnalysis]
    """In increasing LR."""
    compared_by: Literal["final eval loss", "final train loss"]
    best_lr: Optional[float]
    """Lowest final loss among complete runs that did not diverge."""
    best_loss: Optional[float]
    first_divergent_lr: Optional[float]
    """The smallest LR above the best one that diverged."""
    edge_ratio: Optional[float]
    """``first_divergent_lr / best_lr``: how far the best LR is from the edge of stability."""
    suggestions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Strict JSON (non-finite numbers become ``null``), with each run's ``final_loss``."""
        data = asdict(self)
        for run, record in zip(self.runs, data["runs"]):
            record["final_loss"] = run.final_loss
        return json_safe(data)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``run_dir/metrics.jsonl``; a line that does not parse (torn by a kill mid-write) is skipped."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def train_rows(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The train lines, one per step (the last one logged wins), in step order."""
    by_step = {r["step"]: r for r in records if r.get("kind") == "train"}
    return [by_step[step] for step in sorted(by_step)]


def loss_spikes(train: Sequence[Mapping[str, Any]]) -> list[int]:
    """Steps with a finite spike, as the spike guard and ``diagnose`` find them (``pipeline.spikes``, the guard's
    default rule). Non-finite losses are left out here: they make a run diverged."""
    from pipeline.spikes import SpikeRule, find_spike_steps

    return [step for step, spike in find_spike_steps([dict(row) for row in train], SpikeRule()).items()
            if not spike.non_finite]


def classify_run(records: Sequence[Mapping[str, Any]], failed: bool = False) -> tuple[Status, list[str]]:
    """``diverged``: a non-finite loss, the trainer failed, or the final train loss (mean of the last 5 steps)
    above the first step's loss. ``unstable``: guard events or loss spikes. ``converged`` otherwise."""
    train = train_rows(records)
    losses = [r["loss"] for r in train]
    evals = [r["eval_loss"] for r in records if r.get("kind") == "eval"]
    diverged: list[str] = []
    if failed:
        diverged.append("the trainer failed")
    non_finite = [r["step"] for r in train if not _finite(r["loss"])]
    if non_finite:
        diverged.append(f"non-finite train loss from step {non_finite[0]}")
    if any(not _finite(loss) for loss in evals):
        diverged.append("non-finite eval loss")
    if losses and not non_finite:
        final = sum(losses[-FINAL_LOSS_STEPS:]) / len(losses[-FINAL_LOSS_STEPS:])
        if final > losses[0]:
            diverged.append(f"final train loss {final:.4g} (mean of the last {FINAL_LOSS_STEPS} steps) above the "
                            f"first step's {losses[0]:.4g}")
    if diverged:
        return "diverged", diverged
    unstable: list[str] = []
    guards = sum(1 for r in records if r.get("kind") == "guard")
    if guards:
        unstable.append(f"{guards} guard event{'s' if guards > 1 else ''}")
    spikes = loss_spikes(train)
    if spikes:
        unstable.append(f"loss spike{'s' if len(spikes) > 1 else ''} at step{'s' if len(spikes) > 1 else ''} "
                        f"{', '.join(map(str, spikes))}")
    return ("unstable", unstable) if unstable else ("converged", [])


def analyze_run(lr: float, records: Sequence[Mapping[str, Any]], failed: bool = False,
                complete: bool = True) -> RunAnalysis:
    """One run's numbers and status from its metrics records (``metrics.jsonl`` lines)."""
    train = train_rows(records)
    losses = [r["loss"] for r in train]
    finite = [loss for loss in losses if _finite(loss)]
    evals = [r["eval_loss"] for r in records if r.get("kind") == "eval"]
    last = losses[-FINAL_LOSS_STEPS:]
    status, reasons = classify_run(records, failed)
    return RunAnalysis(
        lr=lr, name=run_name(lr), status=status, reasons=reasons, steps=len(train),
        first_loss=losses[0] if losses and _finite(losses[0]) else None,
        final_train_loss=sum(last) / len(last) if last and all(_finite(x) for x in last) else None,
        final_eval_loss=evals[-1] if evals and _finite(evals[-1]) else None,
        min_loss=min(finite) if finite else None,
        spikes=loss_spikes(train), guard_events=sum(1 for r in records if r.get("kind") == "guard"),
        non_finite=len(finite) < len(losses) or not all(_finite(x) for x in evals),
        failed=failed, complete=complete)


def analyze_sweep(runs: Sequence[RunAnalysis]) -> SweepAnalysis:
    """The best LR (lowest final loss among complete runs that did not diverge), the first divergent LR (the
    smallest LR above the best that diverged), their ratio, and what they suggest."""
    runs = sorted(runs, key=lambda r: r.lr)
    candidates = [r for r in runs if r.status != "diverged" and r.complete and r.final_loss is not None]
    by_eval = bool(candidates) and all(r.final_eval_loss is not None for r in candidates)
    compared_by: Literal["final eval loss", "final train loss"] = "final eval loss" if by_eval or not candidates \
        else "final train loss"

    def loss_of(run: RunAnalysis) -> float:
        value = run.final_eval_loss if by_eval else run.final_train_loss
        return value if value is not None else math.inf

    best = min(candidates, key=loss_of) if candidates else None
    first_divergent = None
    if best is not None:
        first_divergent = next((r for r in runs if r.lr > best.lr and r.status == "diverged"), None)
    ratio = first_divergent.lr / best.lr if best is not None and first_divergent is not None else None
    analysis = SweepAnalysis(runs=list(runs), compared_by=compared_by,
                             best_lr=best.lr if best else None, best_loss=loss_of(best) if best else None,
                             first_divergent_lr=first_divergent.lr if first_divergent else None, edge_ratio=ratio)
    analysis.suggestions = suggestions(analysis)
    return analysis


def suggestions(analysis: SweepAnalysis) -> list[str]:
    """What the best LR and the edge of stability suggest, as sentences."""
    runs, best, edge, ratio = analysis.runs, analysis.best_lr, analysis.first_divergent_lr, analysis.edge_ratio
    if not runs:
        return ["No run has metrics yet."]
    lrs = [r.lr for r in runs]
    if best is None:
        return [f"No run finished without diverging: extend the grid downward (below {min(lrs):.2e})."]
    notes: list[str] = []
    if ratio is None:
        notes.append(f"No LR above the best ({best:.2e}) diverged: the grid may not reach the edge of stability; "
                     f"extend it upward (above {max(lrs):.2e}).")
    elif ratio < 3:
        below = [lr for lr in lrs if lr < best]
        lower = f"e.g. {max(below):.2e}" if below else f"e.g. {best / 3:.2e}"
        notes.append(f"Divergence starts {_ratio_text(ratio)}x above the best LR: the best LR sits near the edge of "
                     f"stability. For longer runs pick a lower one ({lower}).")
    elif ratio <= 10:
        notes.append(f"The best LR has a {_ratio_text(ratio)}x margin to divergence: a reasonable choice for longer "
                     "runs.")
    else:
        notes.append(f"Divergence starts {_ratio_text(ratio)}x above the best LR: the grid is too coarse there to "
                     f"locate the edge; add LRs between {best:.2e} and {edge:.2e} (a higher one may also do better).")
    if best == min(lrs) and len(lrs) > 1:
        notes.append("The best LR is the smallest tried: extend the grid downward too.")
    elif best == max(lrs) and len(lrs) > 1 and ratio is None:
        notes.append("The best LR is the largest tried: the optimum may lie above the grid.")
    below_best = [r.lr for r in runs if r.lr < best and r.status == "diverged"]
    if below_best:
        notes.append(f"LRs below the best diverged too ({', '.join(f'{lr:.2e}' for lr in below_best)}): "
                     "check their train.log for failures that are not about the LR.")
    unstable = [r.lr for r in runs if r.status == "unstable"]
    if unstable:
        notes.append(f"Unstable (spikes or guard events) at {', '.join(f'{lr:.2e}' for lr in unstable)}.")
    incomplete = [r.lr for r in runs if not r.complete and not r.failed]
    if incomplete:
        notes.append(f"Not finished, left out of the best LR: {', '.join(f'{lr:.2e}' for lr in incomplete)} "
                     "(run the sweep again to resume them).")
    return notes


def _ratio_text(ratio: float) -> str:
    """3.33, 33.3, 1,000: three significant digits without an exponent."""
    return f"{ratio:.3g}" if ratio < 100 else f"{ratio:,.0f}"


def format_analysis(analysis: SweepAnalysis, title: str) -> str:
    """lr_sweep_analysis.md: the per-LR table, the best LR, the first divergent LR, the ratio, suggestions."""

    def number(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"# LR sweep: {title}", "",
             f"Final train loss: mean of the last {FINAL_LOSS_STEPS} logged steps. Spike: as the spike guard and "
             f"`diagnose` define it (a loss far above its stage's recent median in units of the recent spread, or a "
             f"gradient norm 10x its recent median). Runs are compared by their {analysis.compared_by}.", "",
             "| LR | final train loss | final eval loss | min loss | spikes | guard events | status |",
             "|---|---|---|---|---|---|---|"]
    for run in analysis.runs:
        status = run.status + ("" if run.complete or run.failed else " (not finished)")
        lines.append(f"| {run.lr:.2e} | {number(run.final_train_loss)} | {number(run.final_eval_loss)} | "
                     f"{number(run.min_loss)} | {len(run.spikes)} | {run.guard_events} | {status} |")
    ratio = analysis.edge_ratio
    lines += ["", "## Best LR and the edge of stability", "",
              f"- best LR: {analysis.best_lr:.2e} ({analysis.compared_by} {analysis.best_loss:.4f})"
              if analysis.best_lr is not None else "- best LR: none (every run diverged or is unfinished)",
              f"- first divergent LR: {analysis.first_divergent_lr:.2e}" if analysis.first_divergent_lr is not None
              else "- first divergent LR: none above the best",
              f"- edge-of-stability ratio (first divergent / best): {_ratio_text(ratio)}" if ratio is not None
              else "- edge-of-stability ratio (first divergent / best): n/a",
              "", "## What it suggests", ""]
    lines += [f"- {note}" for note in analysis.suggestions]
    explained = [run for run in analysis.runs if run.reasons]
    if explained:
        lines += ["", "## Why runs diverged or were unstable", ""]
        lines += [f"- {run.lr:.2e} {run.status}: {'; '.join(run.reasons)}" for run in explained]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- plots


def plot_run_curves(run_dir: Path, records: Sequence[Mapping[str, Any]], lr: float) -> list[Path]:
    """``loss_curves.png`` (train loss vs tokens, eval loss as dots) and ``lr_schedule.png`` (LR vs step)."""
    plt = _pyplot()
    train = train_rows(records)
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for stage in sorted({r["stage"] for r in train}):
        rows = [r for r in train if r["stage"] == stage]
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1,
                label=f"train, stage {stage} (seq {rows[0]['seq_len']})")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "ko", ms=5, label="eval (full length)")
    ax.set(xlabel="tokens", ylabel="loss", title=f"{run_name(lr)}: loss vs tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    loss_png = run_dir / "loss_curves.png"
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title=f"{run_name(lr)}: LR schedule")
    fig.tight_layout()
    lr_png = run_dir / "lr_schedule.png"
    fig.savefig(lr_png, dpi=100)
    plt.close(fig)
    return [loss_png, lr_png]


def plot_sweep(sweep_dir: Path, analysis: SweepAnalysis, records: Mapping[str, Sequence[Mapping[str, Any]]]
               ) -> list[Path]:
    """``lr_sweep_comparison.png`` (train loss vs tokens per LR, linear and log tokens) and ``lr_vs_final_loss.png``.

    Diverged runs would stretch the loss axis far above the others (a loss of 1,000 next to 6), so the axis ends
    at 1.2x the highest first-step loss; what is above it is off the chart and says so in the legend."""
    plt = _pyplot()
    colours = plt.get_cmap("viridis")
    runs = analysis.runs
    first_losses = [r.first_loss for r in runs if r.first_loss is not None]
    top = 1.2 * max(first_losses) if first_losses else None
    min_losses = [r.min_loss for r in runs if r.min_loss is not None]
    bottom = 0.95 * min(min_losses) if min_losses and top is not None and min(min_losses) < top else None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for i, run in enumerate(runs):
        rows = [r for r in train_rows(records.get(run.name, [])) if _finite(r["loss"])]
        colour = colours(i / max(1, len(runs) - 1))
        off_chart = top is not None and any(r["loss"] > top for r in rows)
        label = f"{run.lr:.2e} ({run.status}{', off chart' if off_chart else ''})"
        for ax in axes:
            ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], color=colour, lw=1, label=label)
    for ax, scale in zip(axes, ("linear", "log")):
        ax.set_xscale(scale)
        ax.set(xlabel=f"tokens ({scale})", ylabel="train loss", title=f"train loss vs tokens, by LR ({scale} x)")
        if top is not None:
            ax.set_ylim(bottom=bottom, top=top)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    comparison = sweep_dir / "lr_sweep_comparison.png"
    fig.savefig(comparison, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = [r for r in runs if r.final_loss is not None]
    kept = [r for r in plotted if r.status != "diverged"]
    ax.plot([r.lr for r in kept], [r.final_loss for r in kept], "o-", color="tab:blue", label="converged / unstable")
    unstable = [r for r in kept if r.status == "unstable"]
    if unstable:
        ax.plot([r.lr for r in unstable], [r.final_loss for r in unstable], "o", color="tab:orange", ms=9,
                mfc="none", label="unstable")
    diverged = [r for r in runs if r.status == "diverged"]
    if diverged:
        # a diverged run with no finite final loss, or one far above the rest, is drawn at the top of the axis
        finite_top = max([r.final_loss for r in kept], default=None)
        ceiling = max(top or 0.0, finite_top or 0.0) or 1.0
        ys = [min(r.final_loss, ceiling) if r.final_loss is not None else ceiling for r in diverged]
        ax.plot([r.lr for r in diverged], ys, "x", color="tab:red", ms=10, mew=2,
                label="diverged (drawn at the top when off the chart)")
        ax.set_ylim(top=ceiling * 1.02)
    if analysis.best_lr is not None:
        ax.plot([analysis.best_lr], [analysis.best_loss], "*", color="gold", mec="black", ms=16,
                label=f"best {analysis.best_lr:.2e}")
    if analysis.first_divergent_lr is not None:
        ax.axvline(analysis.first_divergent_lr, color="tab:red", ls="--", lw=1,
                   label=f"first divergent {analysis.first_divergent_lr:.2e}")
    ax.set_xscale("log")
    ax.set(xlabel="base LR", ylabel=analysis.compared_by, title="final loss vs LR")
    ax.legend(fontsize=8)
    fig.tight_layout()
    versus = sweep_dir / "lr_vs_final_loss.png"
    fig.savefig(versus, dpi=100)
    plt.close(fig)
    return [comparison, versus]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------- the manifest


class Manifest:
    """``sweep_manifest.json``: the LRs, and per run its overrides, peak LRs, status and trainer launches.

    Run status: ``pending`` (not started), ``running``, ``done`` (summary.json written), ``failed`` (the trainer
    exited with a status other than 0), ``stopped`` (exited 0 before the end, e.g. on SIGTERM; resumable).
    Written atomically after every change, so a sweep killed at any moment leaves a readable manifest."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, sweep_dir: Path, config: Config, config_arg: str, overlays: Sequence[str],
             sets: Sequence[str]) -> "Manifest":
        """The sweep directory's manifest, or a new one. The config a sweep directory was started with is
        recorded (its hash); continuing it with a different config would mix incomparable runs, unless no run has
        trained a step yet (e.g. the first one was refused its data directory)."""
        path = sweep_dir / MANIFEST
        config_sha256 = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
                                       ).hexdigest()
        if path.exists():
            data = json.loads(path.read_text())
            trained = any(_has_lines(sweep_dir / name / "metrics.jsonl") for name in data.get("runs", {}))
            if data.get("config_sha256") != config_sha256 and trained:
                raise ConfigError("--output-dir", str(sweep_dir),
                                  f"holds a sweep of a different config ({MANIFEST}: --config {data.get('config')}, "
                                  f"sets {data.get('sets')}); give another --output-dir")
            if data.get("config_sha256") == config_sha256:
                return cls(path, data)
        return cls(path, {"name": config.name, "config": config_arg, "overlays": list(overlays), "sets": list(sets),
                          "config_sha256": config_sha256, "base_lr": config.curriculum.base_lr,
                          "swept": "curriculum.base_lr", "lrs": [], "runs": {}})

    def add_run(self, lr: float, overrides: list[str], peak_lrs: list[float]) -> None:
        run = self.data["runs"].setdefault(run_name(lr), {"lr": lr, "status": "pending", "launches": 0})
        run.update({"overrides": overrides, "peak_lrs": peak_lrs})
        self.data["lrs"] = sorted(set(self.data["lrs"]) | {lr})

    def run(self, name: str) -> dict[str, Any]:
        return self.data["runs"][name]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def _has_lines(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


# --------------------------------------------------------------------------------------------- processes


@dataclass
class Job:
    """One trainer process to run: its name (the run directory's), directory and command."""

    name: str
    run_dir: Path
    command: list[str]


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen[bytes]
    log: Any
    gpu: Optional[int]
    port: Optional[int]
    started: float


class SweepAborted(Exception):
    """The first run exited with the trainer's bad-input status: the other runs would fail the same way."""

    def __init__(self, job: Job, message: str) -> None:
        self.job = job
        super().__init__(message)


def child_environment(environ: Mapping[str, str], gpu: Optional[int], port: Optional[int]) -> dict[str, str]:
    """A run's environment: no launcher variables (each run is one process of its own); with a GPU, that device
    alone (``CUDA_VISIBLE_DEVICES``, mapped through the sweep's own when it has one) and its own ``MASTER_PORT``."""
    env = {key: value for key, value in environ.items() if key not in LAUNCHER_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if gpu < len(visible) else str(gpu)
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return env


def _free_port(taken: set[int]) -> int:
    """A free port not given to another run still starting."""
    while True:
        port = free_port()
        if port not in taken:
            return port


def run_jobs(jobs: Sequence[Job], gpus: Optional[Sequence[int]], environ: Mapping[str, str],
             on_start: Callable[[Job, Optional[int]], None], on_finish: Callable[[Job, int, float], None],
             poll_s: float = 0.2) -> None:
    """Run the jobs, one at a time (``gpus`` None) or at most one per GPU at a time, each with its output appended
    to ``<run dir>/train.log``. ``on_start(job, gpu)`` and ``on_finish(job, exit_status, seconds)`` are called as
    they go. If the first job exits with the bad-input status, the others are stopped (SIGTERM: the trainer
    checkpoints and exits) and ``SweepAborted`` is raised; any other failure is left to ``on_finish``."""
    slots: list[Optional[int]] = list(gpus) if gpus else [None]
    pending = list(jobs)
    running: list[_Running] = []
    first = jobs[0] if jobs else None
    try:
        while pending or running:
            busy = {r.gpu for r in running}
            for gpu in [slot for slot in slots if slot not in busy]:
                if not pending:
                    break
                job = pending.pop(0)
                port = _free_port({r.port for r in running if r.port}) if gpu is not None else None
                job.run_dir.mkdir(parents=True, exist_ok=True)
                log = open(job.run_dir / "train.log", "ab")
                log.write(f"\n=== sweep: {' '.join(job.command)}"
                          f"{'' if gpu is None else f' (GPU {gpu}, MASTER_PORT {port})'}\n".encode())
                log.flush()
                on_start(job, gpu)
                try:
                    process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                               env=child_environment(environ, gpu, port))
                except OSError:
                    log.close()
                    raise
                running.append(_Running(job, process, log, gpu, port, time.monotonic()))
            time.sleep(poll_s)
            for entry in [r for r in running if r.process.poll() is not None]:
                running.remove(entry)
                entry.log.close()
                status = entry.process.returncode
                if entry.job is first and status == BAD_INPUT_EXIT:
                    raise SweepAborted(entry.job, _error_line(entry.job.run_dir / "train.log"))
                on_finish(entry.job, status, time.monotonic() - entry.started)
    finally:
        for entry in running:  # an abort or an interrupt: let the others checkpoint and exit
            if entry.process.poll() is None:
                entry.process.send_signal(signal.SIGTERM)
        for entry in running:
            try:
                entry.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                entry.process.kill()
                entry.process.wait()
            entry.log.close()
            on_finish(entry.job, entry.process.returncode, time.monotonic() - entry.started)


def _error_line(log: Path) -> str:
    """The trainer's ``error: ...`` line (its last one), without the prefix."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "the trainer exited with status 2")


def trainer_command(config_arg: str, overlays: Sequence[str], sets: Sequence[str], run_dir: Path) -> list[str]:
    """The real trainer in a process of its own, resuming the run directory's latest checkpoint if any."""
    command = [sys.executable, "-m", "pipeline.train", "--config", config_arg]
    for overlay in overlays:
        command += ["--overlay", overlay]
    for assignment in sets:
        command += ["--set", assignment]
    return command + ["--output-dir", str(run_dir), "--resume", "auto"]


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------------------------- the command


HELP = "train once per LR and compare the runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--lrs", default=None,
                        help="comma-separated base LRs (default: 7 log-spaced values from base_lr/10 to base_lr*10)")
    parser.add_argument("--output-dir", default=None, help="sweep directory (default runs/<name>-sweep)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids to spread runs over, one run per GPU at a time "
                             "(default: runs one after another)")


def run(args: argparse.Namespace) -> int:
    from curriculum.loading import load_config
    from curriculum.schedule import build_schedule
    from pipeline.commands import load_config_from_args

    config = load_config_from_args(args)
    build_schedule(config)  # a bad config is one error line before any run starts
    lrs = parse_lrs(args.lrs) if args.lrs is not None else check_run_names(default_lrs(config.curriculum.base_lr))
    gpus = parse_gpus(args.gpus, _cuda_device_count()) if args.gpus is not None else None
    sweep_dir = Path(args.output_dir or Path("runs") / f"{config.name}-sweep")

    manifest = Manifest.open(sweep_dir, config, args.config, args.overlays, args.sets)
    for lr in lrs:
        overrides = lr_overrides(config.curriculum, lr)
        # each run's config is validated here too: an override the trainer would refuse fails before any run
        run_config = load_config(args.config, [*args.sets, *overrides], overlays=args.overlays)
        manifest.add_run(lr, overrides, [stage.peak_lr for stage in build_schedule(run_config).stages])
    manifest.save()

    jobs = []
    for lr in lrs:
        name, run_dir = run_name(lr), sweep_dir / run_name(lr)
        if (run_dir / "summary.json").exists():
            manifest.run(name)["status"] = "done"
            print(f"{name}: done (summary.json exists), skipped")
            continue
        jobs.append(Job(name, run_dir, trainer_command(args.config, args.overlays,
                                                       [*args.sets, *manifest.run(name)["overrides"]], run_dir)))
    manifest.save()

    def on_start(job: Job, gpu: Optional[int]) -> None:
        entry = manifest.run(job.name)
        entry.update({"status": "running", "launches": entry["launches"] + 1, "gpu": gpu})
        manifest.save()
        where = "" if gpu is None else f" on GPU {gpu}"
        print(f"{job.name}: training{where} (log: {job.run_dir / 'train.log'})", flush=True)

    def on_finish(job: Job, status: int, seconds: float) -> None:
        entry = manifest.run(job.name)
        entry["exit_status"] = status
        if status != 0:
            entry["status"] = "failed"
            print(f"{job.name}: FAILED (trainer exit status {status}) after {seconds:.0f} s; counted as diverged, "
                  f"going on with the other runs (log: {job.run_dir / 'train.log'})", flush=True)
        elif (job.run_dir / "summary.json").exists():
            entry["status"] = "done"
            print(f"{job.name}: done in {seconds:.0f} s", flush=True)
        else:
            entry["status"] = "stopped"
            print(f"{job.name}: stopped before the end after {seconds:.0f} s; run the sweep again to resume it",
                  flush=True)
        manifest.save()

    try:
        run_jobs(jobs, gpus, os.environ, on_start, on_finish)
    except SweepAborted as err:
        manifest.run(err.job.name).update({"status": "failed", "exit_status": BAD_INPUT_EXIT})
        manifest.save()
        # the trainer's own one-line error, so it reads as if the config had been trained directly
        print(f"error: {err} (first run of the sweep, {err.job.name}; sweep aborted; log: "
              f"{err.job.run_dir / 'train.log'})", file=sys.stderr)
        return BAD_INPUT_EXIT

    # ------------------------------------------------------------------------------------ comparison
    analyses, records = [], {}
    for name, entry in sorted(manifest.data["runs"].items(), key=lambda item: item[1]["lr"]):
        run_dir = sweep_dir / name
        run_records = read_records(run_dir)
        failed = entry["status"] == "failed"
        if not run_records and not failed:
            continue  # never started
        records[name] = run_records
        if run_records:
            plot_run_curves(run_dir, run_records, entry["lr"])
        analyses.append(analyze_run(entry["lr"], run_records, failed=failed,
                                    complete=(run_dir / "summary.json").exists()))
    analysis = analyze_sweep(analyses)
    plot_sweep(sweep_dir, analysis, records)
    report = format_analysis(analysis, f"{config.name} (base_lr {config.curriculum.base_lr:.2e} in the config)")
    (sweep_dir / "lr_sweep_analysis.md").write_text(report)
    (sweep_dir / "lr_sweep_analysis.json").write_text(json.dumps(analysis.to_json(), indent=2, allow_nan=False)
                                                      + "\n")
    print(report)
    print(f"sweep: {sweep_dir} ({MANIFEST}, lr_sweep_analysis.md/.json, lr_sweep_comparison.png, "
          "lr_vs_final_loss.png)")
    unfinished = [name for name, entry in manifest.data["runs"].items() if entry["status"] != "done"]
    if unfinished:
        print(f"not done: {', '.join(sorted(unfinished))} (see their train.log; running the sweep again retries "
              "them, resuming from their latest checkpoint)")
    return 1 if unfinished else 0
