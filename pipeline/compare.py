"""``curriculum-pretrain compare RUN_DIR [RUN_DIR ...]``: who reaches a held-out loss first, in tokens and in time.

For each run directory (finished or still running: a torn last metrics line is skipped), from its ``kind: eval``
lines: the final held-out loss, and the tokens, training seconds (``train_s``: steps only) and wall-clock seconds
(``elapsed_s``: start-up, compilation, evaluations and checkpoints included) at which the held-out loss first
reached the target, interpolated linearly between the two evaluations around the crossing. The target is
``--target-loss`` or the first run's final held-out loss, so with a tuned baseline first the question is "how much
sooner does each run reach the baseline's loss". Speedups are the first run's figure over each run's. Also per run:
the token speedup to the first run's held-out loss at 25, 50, 75 and 100 % of the tokens it has been evaluated at
(``milestones``; a curriculum's lead mid-run can be several times its lead at the end of the baseline's LR decay, so
a second table shows both; only the end point compares like with like);
spike-guard events, spikes as the guard defines them (``pipeline.spikes``), and the run's status as ``sweep``
classifies it (converged, unstable, diverged).

Writes ``compare.json`` (with the milestones' losses), ``compare.md`` (the two tables) and ``compare.png`` (held-out
loss against tokens and against wall-clock seconds, the target dashed; the training loss against tokens) into
``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from curriculum.errors import ConfigError
from pipeline.rundir import RunDir, eval_rows, read_checked, stop_reason, train_rows

HELP = "compare runs: held-out loss, and tokens and seconds to a target loss, against the first run"
AXES = ("tokens", "train_s", "elapsed_s")
"""The axes time-to-target is measured on: tokens trained, seconds in training steps, wall-clock seconds."""
PROGRESS = (0.25, 0.5, 0.75, 1.0)
"""Points along the first run (fractions of its last evaluation's tokens) at whose held-out loss every run's token
speedup is given too (``milestones``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import finite_float

    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories; the first is the reference (a tuned baseline, say)")
    parser.add_argument("--target-loss", type=finite_float, default=None,
                        help="held-out loss to reach (default: the first run's final held-out loss)")
    parser.add_argument("--output-dir", default="runs/compare",
                        help="where compare.json, compare.md and compare.png go (default runs/compare)")


@dataclass
class RunComparison:
    """One run against the target."""

    run_dir: str
    name: str
    """The run config's ``name``; the directory's name when several runs share one."""
    status: str
    """``finished`` (summary.json written), ``stopped (<reason>)`` (its ``kind: stop`` line: ``guard.max_events``,
    ``guard.eval_rise`` or ``requested``) or ``running or stopped`` (neither: running, or killed); then ``sweep``'s
    verdict on its losses."""
    steps: int
    tokens: int
    final_eval_loss: float
    evaluations: int
    at_target: dict[str, Optional[float]]
    """tokens, train_s and elapsed_s when the held-out loss first reached the target; None: not reached."""
    speedup: dict[str, Optional[float]]
    """The first run's ``at_target`` over this run's, per axis."""
    token_speedup_along: dict[str, Optional[float]]
    """Per ``milestones`` label ("25%" ...): the tokens at which the first run first reached that milestone's loss
    over this run's (as ``speedup``); None: not reached, or a non-finite milestone."""
    guard_events: int
    spikes: int


def reach(evals: Sequence[dict[str, Any]], target: float, axis: str) -> Optional[float]:
    """Where (on ``axis``) the held-out loss first reaches ``target``: linear between the evaluation above it and the
    one at or below it; the first evaluation's own value when that one already is; None when none is (or the lines
    lack the axis)."""
    previous = None
    for row in evals:
        value = row.get(axis)
        if value is None or not math.isfinite(row["eval_loss"]):
            return None
        if row["eval_loss"] <= target:
            if previous is None:
                return float(value)
            x0, y0 = previous
            return x0 + (value - x0) * (y0 - target) / (y0 - row["eval_loss"])
        previous = (float(value), row["eval_loss"])
    return None


def compare_runs(run_dirs: Sequence[Path], target_loss: Optional[float]
                 ) -> tuple[float, dict[str, Optional[float]], list[RunComparison], list[list[dict[str, Any]]]]:
    """The target loss, the first run's ``milestones``, each run's comparison and the metrics records it was read
    from (read once: a running run gives the tables and the figure the same lines)."""
    from pipeline.sweep.analysis import classify_run, spike_steps

    loaded = []
    for run_dir in run_dirs:
        paths = RunDir(run_dir)
        if not paths.metrics.is_file():
            raise ConfigError("RUN_DIR", str(run_dir), "holds no metrics.jsonl; give a run directory of `train`")
        records = read_checked(paths.metrics)
        evals = eval_rows(records)
        if not evals:
            raise ConfigError("RUN_DIR", str(run_dir), "has no evaluation yet (kind: eval lines); compare needs "
                                                       "held-out losses (run.eval_every or run.eval_every_tokens)")
        loaded.append((run_dir, paths, records, evals))
    reference = loaded[0][3]
    target = target_loss if target_loss is not None else reference[-1]["eval_loss"]
    marks = milestones(reference)
    reference_at = {mark: reach(reference, loss, "tokens") for mark, loss in marks.items() if loss is not None}
    runs = []
    for run_dir, paths, records, evals in loaded:
        train = train_rows(records)
        spikes = spike_steps(train)
        verdict, _ = classify_run(records, spikes=spikes)
        along = {mark: None if loss is None else _ratio(reference_at[mark], reach(evals, loss, "tokens"))
                 for mark, loss in marks.items()}
        runs.append(RunComparison(
            run_dir=str(run_dir), name=_name(paths), steps=len(train),
            status=f"{_progress(paths, records)}, {verdict}",
            tokens=train[-1]["tokens"] if train else 0, final_eval_loss=evals[-1]["eval_loss"],
            evaluations=len(evals), at_target={axis: reach(evals, target, axis) for axis in AXES}, speedup={},
            token_speedup_along=along,
            guard_events=sum(1 for r in records if r.get("kind") == "guard"), spikes=len(spikes)))
    if len({run.name for run in runs}) < len(runs):  # runs of one recipe: told apart by their directories
        for run in runs:
            run.name = Path(run.run_dir).name
    for run in runs:
        run.speedup = {axis: _ratio(runs[0].at_target[axis], run.at_target[axis]) for axis in AXES}
    return target, marks, runs, [records for _, _, records, _ in loaded]


def milestones(evals: Sequence[dict[str, Any]]) -> dict[str, Optional[float]]:
    """``PROGRESS`` as labels ("25%") -> the held-out loss of the first evaluation at or past that fraction of the
    last evaluation's tokens (not interpolated: with sparse evaluations a point lies later than its label says;
    None where that loss is not finite)."""
    last = evals[-1]["tokens"]
    losses = {f"{fraction:.0%}": next(r["eval_loss"] for r in evals if r["tokens"] >= fraction * last)
              for fraction in PROGRESS}
    return {mark: loss if math.isfinite(loss) else None for mark, loss in losses.items()}


def _progress(paths: RunDir, records: Sequence[dict[str, Any]]) -> str:
    if paths.summary.exists():
        return "finished"
    reason = stop_reason(records)
    return f"stopped ({reason})" if reason is not None else "running or stopped"


def _name(paths: RunDir) -> str:
    try:
        return json.loads(paths.config.read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return paths.path.name


def _ratio(reference: Optional[float], value: Optional[float]) -> Optional[float]:
    return reference / value if reference is not None and value else None


def format_table(target: float, runs: Sequence[RunComparison], marks: dict[str, Optional[float]]) -> str:
    """The comparison at the target, then the token speedups along the first run (``marks``: ``milestones``)."""
    def number(value: Optional[float], spec: str) -> str:
        return "not reached" if value is None else format(value, spec)

    def times(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [f"Target held-out loss {target:.4f}; speedups against {runs[0].name} ({runs[0].run_dir}).", "",
             "| run | status | final held-out loss | tokens to target | train s to target | wall s to target | "
             "speedup (tokens / train s / wall s) | guard events | spikes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        at, up = run.at_target, run.speedup
        lines.append(f"| {run.name} | {run.status} | {run.final_eval_loss:.4f} | {number(at['tokens'], ',.0f')} | "
                     f"{number(at['train_s'], '.1f')} | {number(at['elapsed_s'], '.1f')} | "
                     f"{times(up['tokens'])} / {times(up['train_s'])} / {times(up['elapsed_s'])} | "
                     f"{run.guard_events} | {run.spikes} |")
    lines += ["", f"Token speedup to {runs[0].name}'s held-out loss at {' / '.join(marks)} of its tokens "
                  f"({' / '.join('-' if loss is None else f'{loss:.4f}' for loss in marks.values())}):", "",
              f"| run | {' | '.join(marks)} |", "|---|" + "---|" * len(marks)]
    lines += [f"| {run.name} | {' | '.join(times(up) for up in run.token_speedup_along.values())} |" for run in runs]
    return "\n".join(lines) + "\n"


def plot(target: float, runs: Sequence[RunComparison], run_records: Sequence[list[dict[str, Any]]],
         out: Path) -> Path:
    """Held-out loss against tokens and against wall-clock seconds, and the training loss against tokens (a run's
    losses at a shorter length are lower than at full length: compare those stage by stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, (by_tokens, by_time, training) = plt.subplots(1, 3, figsize=(19, 5))
    for index, (run, records) in enumerate(zip(runs, run_records)):
        evals, train = eval_rows(records), train_rows(records)
        # the colour cycle has 10 colours: the runs after the 10th are told apart by their line style
        style = {"color": f"C{index % 10}", "ls": ("-", "--", ":")[index // 10 % 3], "label": run.name}
        by_tokens.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], marker="o", ms=3, **style)
        by_time.plot([r.get("elapsed_s") for r in evals], [r["eval_loss"] for r in evals], marker="o", ms=3, **style)
        training.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1, **style)
    for ax, label in ((by_tokens, "tokens"), (by_time, "wall-clock seconds (compile and evaluation included)")):
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.4f}")
        ax.set(xlabel=label, ylabel="held-out loss (full length)")
        ax.legend(fontsize=8)
    training.set(xlabel="tokens", ylabel="training loss (at each step's length)")
    later = [r["loss"] for records in run_records for r in train_rows(records)[10:] if math.isfinite(r["loss"])]
    if later:  # the first steps fall from about ln(vocab size) and would flatten the rest
        training.set_ylim(top=max(later) + 0.05 * (max(later) - min(later)))
    training.legend(fontsize=8)
    for ax in (by_tokens, training):
        ax.xaxis.set_major_formatter(EngFormatter())
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    from pipeline.commands import output_directory

    if args.target_loss is not None and args.target_loss <= 0:
        raise ConfigError("--target-loss", args.target_loss, "must be a positive loss")  # a cross-entropy is > 0
    out_dir = output_directory("--output-dir", args.output_dir)
    run_dirs = [Path(d) for d in args.run_dirs]
    target, marks, runs, records = compare_runs(run_dirs, args.target_loss)
    table = format_table(target, runs, marks)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(table)
    (out_dir / "compare.json").write_text(json.dumps({"target_loss": target, "milestones": marks,
                                                      "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    plot(target, runs, records, out_dir / "compare.png")
    print(table)
    print(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.json'} and {out_dir / 'compare.png'}")
    return 0
