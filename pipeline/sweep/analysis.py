"""A sweep's analysis, pure functions over the runs' metrics records: each run's status (converged, unstable,
diverged, or not judged when too short), the best LR, the first divergent LR and what they suggest. Spikes are the
guard's (``pipeline.spikes``), the final train loss is the run directory's (``pipeline.rundir.final_train_loss``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

from curriculum.config import GuardConfig
from pipeline.diagnose import json_safe
from pipeline.rundir import FINAL_LOSS_STEPS, final_train_loss, loss_rose, stop_reason, train_rows
from pipeline.spikes import Spike, SpikeRule, find_spike_steps, risen_above
from pipeline.sweep.grid import run_name

Status = Literal["converged", "unstable", "diverged", "not judged"]

MIN_JUDGED_STEPS = 2 * FINAL_LOSS_STEPS
"""Train lines a run needs to be called converged or to be the best LR: 10, so that its final train loss (the mean
of the last 5) comes from its second half. In a run of 6 lines the final window is steps 1-5, the steps where the
loss falls fastest: a loss of 8.35 falling to 6.4 and blowing up to 13.1 at the last step averages 8.04 there, below
the first step's 8.35. A shorter run can still be diverged or unstable: what was found is found."""
EVAL_RISE_MARGIN: float = GuardConfig().eval_rise  # type: ignore[assignment]
"""How far (a share) a run's last held-out loss may end above its lowest before the run is called diverged. A run
can break without a spike the guard would skip: GPT-2 124M at twice its tuned LR climbed from a held-out 4.31 to 6.22
over 7 evaluations and ended at 5.99 (39 % above its lowest) with one guard event; the curriculum at twice its own
(3.4e-3) went from 4.43 to 5.99 and ended at 5.70 (29 %). None of the study's runs at a sound LR ended above its
lowest. The default of ``guard.eval_rise``, at which the trainer stops a run (a run's own setting is not read)."""


@dataclass
class RunAnalysis:
    """One run's outcome, from its metrics records. Losses are ``None`` where there are none (or non-finite)."""

    lr: float
    name: str
    status: Status
    reasons: list[str]
    """Why the run is ``diverged``, ``unstable`` or ``not judged`` (empty when ``converged``)."""
    steps: int
    """Train lines logged."""
    first_loss: Optional[float]
    final_train_loss: Optional[float]
    """Mean of the last 5 logged train losses."""
    final_eval_loss: Optional[float]
    min_loss: Optional[float]
    """Lowest train loss."""
    spikes: list[int]
    """Steps with a spike of the loss or the gradient norm, as the spike guard and ``diagnose`` define it
    (``spike_steps``)."""
    guard_events: int
    """``kind: guard`` lines in metrics.jsonl."""
    non_finite: bool
    failed: bool
    """The trainer exited with a status other than 0."""
    complete: bool
    """The run reached its end (``summary.json`` exists)."""

    @property
    def judged(self) -> bool:
        """Long enough (``MIN_JUDGED_STEPS`` train lines) for its final loss to be compared with other runs'."""
        return self.steps >= MIN_JUDGED_STEPS

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
    """Lowest final loss among complete runs long enough to judge that did not diverge."""
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


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def spike_steps(train: Sequence[Mapping[str, Any]]) -> dict[int, Spike]:
    """Step -> finite spike (of the loss or the gradient norm), as the spike guard and ``diagnose`` find them
    (``pipeline.spikes``, the guard's default rule). Non-finite values are left out here: they make a run
    diverged."""
    return {step: spike for step, spike in find_spike_steps([dict(row) for row in train], SpikeRule()).items()
            if not spike.non_finite}


def eval_rose(evals: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """Why eval lines whose losses are all finite ended more than ``EVAL_RISE_MARGIN`` above their lowest, or None."""
    losses = [r["eval_loss"] for r in evals]
    if len(losses) < 2 or not all(finite(loss) for loss in losses):
        return None
    lowest = min(range(len(losses)), key=losses.__getitem__)
    if not risen_above(losses[-1], losses[lowest], EVAL_RISE_MARGIN):
        return None
    return (f"last held-out loss {losses[-1]:.4g} (step {evals[-1]['step']}) above its lowest "
            f"{losses[lowest]:.4g} (step {evals[lowest]['step']}) by more than {EVAL_RISE_MARGIN:.0%}")


def guard_stop(records: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """The reason when the spike guard stopped the run (``guard.max_events`` or ``guard.eval_rise``), else None: a
    diverged run, which a sweep run again does not relaunch."""
    reason = stop_reason(records)
    return reason if reason is not None and reason.startswith("guard.") else None


def classify_run(records: Sequence[Mapping[str, Any]], failed: bool = False,
                 spikes: Optional[dict[int, Spike]] = None) -> tuple[Status, list[str]]:
    """``diverged``: a non-finite loss, the guard stopped the run (its ``kind: stop`` line) or the trainer failed
    otherwise, the loss ended above where it started (the final train loss, mean of the last 5 steps, or the last step's
    loss above the first step's) or the held-out loss ended more than 10 % above its lowest (``eval_rose``).
    ``unstable``: guard events or spikes, named by what spiked (the loss or the gradient norm). ``not judged``:
    neither, in a run of fewer than ``MIN_JUDGED_STEPS`` train lines. ``converged`` otherwise. ``spikes``: the
    run's ``spike_steps`` where the caller has them already (found here otherwise)."""
    train = train_rows(records)
    eval_lines = [r for r in records if r.get("kind") == "eval"]
    evals = [r["eval_loss"] for r in eval_lines]
    diverged: list[str] = []
    if stopped_by := guard_stop(records):
        diverged.append(f"stopped by {stopped_by}")
    elif failed:
        diverged.append("the trainer failed")
    non_finite = [r["step"] for r in train if not finite(r["loss"])]
    if non_finite:
        diverged.append(f"non-finite train loss from step {non_finite[0]}")
    if any(not finite(loss) for loss in evals):
        diverged.append("non-finite eval loss")
    if rose := loss_rose(train):
        diverged.append(rose)
    if rose := eval_rose(eval_lines):
        diverged.append(rose)
    if diverged:
        return "diverged", diverged
    unstable: list[str] = []
    guards = sum(1 for r in records if r.get("kind") == "guard")
    if guards:
        unstable.append(f"{guards} guard event{'s' if guards > 1 else ''}")
    spikes = spike_steps(train) if spikes is None else spikes
    for what, reason in (("loss", "loss_spike"), ("gradient-norm", "grad_norm_spike")):
        steps = [step for step, spike in spikes.items() if spike.reason == reason]
        if steps:
            plural = "s" if len(steps) > 1 else ""
            unstable.append(f"{what} spike{plural} at step{plural} {', '.join(map(str, steps))}")
    if unstable:
        return "unstable", unstable
    if len(train) < MIN_JUDGED_STEPS:
        return "not judged", [f"too few steps: {len(train)} < {MIN_JUDGED_STEPS}"]
    return "converged", []


def analyze_run(lr: float, records: Sequence[Mapping[str, Any]], failed: bool = False,
                complete: bool = True) -> RunAnalysis:
    """One run's numbers and status from its metrics records (``metrics.jsonl`` lines)."""
    train = train_rows(records)
    losses = [r["loss"] for r in train]
    finite_losses = [loss for loss in losses if finite(loss)]
    evals = [r["eval_loss"] for r in records if r.get("kind") == "eval"]
    spikes = spike_steps(train)
    status, reasons = classify_run(records, failed, spikes)
    return RunAnalysis(
        lr=lr, name=run_name(lr), status=status, reasons=reasons, steps=len(train),
        first_loss=losses[0] if losses and finite(losses[0]) else None,
        final_train_loss=final_train_loss(train),
        final_eval_loss=evals[-1] if evals and finite(evals[-1]) else None,
        min_loss=min(finite_losses) if finite_losses else None,
        spikes=sorted(spikes), guard_events=sum(1 for r in records if r.get("kind") == "guard"),
        non_finite=len(finite_losses) < len(losses) or not all(finite(x) for x in evals),
        failed=failed, complete=complete)


def analyze_sweep(runs: Sequence[RunAnalysis]) -> SweepAnalysis:
    """The best LR (lowest final loss among complete runs long enough to judge that did not diverge), the first
    divergent LR (the smallest LR above the best that diverged), their ratio, and what they suggest."""
    runs = sorted(runs, key=lambda r: r.lr)
    candidates = [r for r in runs
                  if r.status != "diverged" and r.complete and r.judged and r.final_loss is not None]
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
    # a run too short to judge is no evidence of where the optimum or the edge of stability lies
    short = [r for r in runs if r.status == "not judged"]
    lrs = [r.lr for r in runs if r not in short]
    not_judged = [f"Not judged (too few steps: {_steps_text(short)} < {MIN_JUDGED_STEPS}) at "
                  f"{', '.join(f'{r.lr:.2e}' for r in short)}: neither the best LR nor evidence for a higher or lower "
                  f"one; train for at least {MIN_JUDGED_STEPS} logged steps."] if short else []
    if best is None:
        if short:
            return not_judged
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
    return notes + not_judged


def _steps_text(runs: Sequence[RunAnalysis]) -> str:
    """The train lines of runs: ``6``, or ``4-6`` when they differ."""
    low, high = min(r.steps for r in runs), max(r.steps for r in runs)
    return f"{low}" if low == high else f"{low}-{high}"


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
             f"gradient norm 10x its recent median). A run of fewer than {MIN_JUDGED_STEPS} logged steps is not judged "
             f"converged and is never the best LR. Runs are compared by their {analysis.compared_by}.", "",
             "| LR | final train loss | final eval loss | min loss | spikes | guard events | status |",
             "|---|---|---|---|---|---|---|"]
    for run in analysis.runs:
        status = (f"not judged ({run.reasons[0]})" if run.status == "not judged" else run.status) \
            + ("" if run.complete or run.failed else " (not finished)")
        lines.append(f"| {run.lr:.2e} | {number(run.final_train_loss)} | {number(run.final_eval_loss)} | "
                     f"{number(run.min_loss)} | {len(run.spikes)} | {run.guard_events} | {status} |")
    ratio = analysis.edge_ratio
    lines += ["", "## Best LR and the edge of stability", "",
              f"- best LR: {analysis.best_lr:.2e} ({analysis.compared_by} {analysis.best_loss:.4f})"
              if analysis.best_lr is not None
              else "- best LR: none (every run diverged, is unfinished or is too short to judge)",
              f"- first divergent LR: {analysis.first_divergent_lr:.2e}" if analysis.first_divergent_lr is not None
              else "- first divergent LR: none above the best" if analysis.best_lr is not None
              else "- first divergent LR: n/a (no best LR)",
              f"- edge-of-stability ratio (first divergent / best): {_ratio_text(ratio)}" if ratio is not None
              else "- edge-of-stability ratio (first divergent / best): n/a",
              "", "## What it suggests", ""]
    lines += [f"- {note}" for note in analysis.suggestions]
    explained = [run for run in analysis.runs if run.reasons]
    if explained:
        lines += ["", "## Why runs diverged, were unstable or were not judged", ""]
        lines += [f"- {run.lr:.2e} {run.status}: {'; '.join(run.reasons)}" for run in explained]
    return "\n".join(lines) + "\n"
