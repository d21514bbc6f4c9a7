"""A sweep's figures: each run's loss curves and LR schedule, the runs side by side, final loss against LR."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.rundir import train_rows
from pipeline.sweep.analysis import SweepAnalysis, finite
from pipeline.sweep.grid import run_name


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
        rows = [r for r in train_rows(records.get(run.name, [])) if finite(r["loss"])]
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
    kept = [r for r in plotted if r.status in ("converged", "unstable")]
    ax.plot([r.lr for r in kept], [r.final_loss for r in kept], "o-", color="tab:blue", label="converged / unstable")
    unstable = [r for r in kept if r.status == "unstable"]
    if unstable:
        ax.plot([r.lr for r in unstable], [r.final_loss for r in unstable], "o", color="tab:orange", ms=9,
                mfc="none", label="unstable")
    short = [r for r in plotted if r.status == "not judged"]
    if short:
        ax.plot([r.lr for r in short], [r.final_loss for r in short], "o", color="tab:gray", mfc="none",
                label="not judged (too few steps)")
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
