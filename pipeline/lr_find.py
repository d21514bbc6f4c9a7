"""``curriculum-pretrain lr-find``: an LR range test at each stage's sequence length.

For every distinct sequence length of the curriculum (with the batch of the first stage that trains at it), a fresh
copy of the model (the run's initial weights, from its seed) trains for ``--steps`` steps while the LR grows
exponentially from ``--min-lr`` to ``--max-lr`` (Smith 2017; fastai's ``lr_find``). The real run's directory and
checkpoints are never touched. Per length it reports:

- the LR of steepest descent: where the smoothed loss falls fastest per unit of ``log(lr)``;
- the divergence LR: the first LR where the smoothed loss is not finite or 1.3x its best so far (a 30% rise of a
  language-model loss is far outside step-to-step noise); the ramp stops there.

It writes ``lr_find.json``, ``lr_find.png`` and ``lr_caps.yaml``, an overlay that caps each stage's peak LR at a
third of the divergence LR of its length (``train --overlay lr_caps.yaml``; ``plan`` marks the caps that apply).
Lengths whose ramp never diverged get no cap.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.schedule import Schedule, Stage, build_schedule
from pipeline.commands import load_config_from_args, output_directory

SMOOTHING = 0.9  # exponential moving average of the loss, bias-corrected (as fastai does)
DIVERGENCE_FACTOR = 1.3
CAP_FRACTION = 1.0 / 3.0


HELP = "LR range test at each stage's sequence length"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import add_config_arguments, finite_float

    add_config_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="where results go (default runs/<name>-lr-find)")
    parser.add_argument("--steps", type=int, default=200, help="ramp steps per sequence length (default 200)")
    parser.add_argument("--min-lr", type=finite_float, default=1e-6, help="first LR of the ramp (default 1e-6)")
    parser.add_argument("--max-lr", type=finite_float, default=1.0, help="last LR of the ramp (default 1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.steps < 10:
        raise ConfigError("--steps", args.steps, "must be at least 10")
    if not 0 < args.min_lr < args.max_lr:
        raise ConfigError("--min-lr", args.min_lr, f"must be positive and below --max-lr {args.max_lr}")
    config = load_config_from_args(args)
    output_dir = output_directory("--output-dir", args.output_dir or Path("runs") / f"{config.name}-lr-find")
    return lr_find(config, output_dir, args.steps, args.min_lr, args.max_lr)


def ramp_lr(step: int, steps: int, min_lr: float, max_lr: float) -> float:
    """Exponential ramp: ``min_lr`` at step 0, ``max_lr`` at step ``steps - 1``."""
    return min_lr * (max_lr / min_lr) ** (step / (steps - 1))


def smooth(losses: list[float]) -> list[float]:
    """Bias-corrected exponential moving average; non-finite values stay non-finite."""
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING ** (i + 1)))
    return out


def analyse(lrs: list[float], losses: list[float]) -> dict[str, Optional[float]]:
    """Steepest-descent LR, divergence LR (None if the ramp stayed stable) and the minimum smoothed loss."""
    smoothed = smooth(losses)
    diverge_at, best = None, math.inf
    for i, value in enumerate(smoothed):
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * best:  # the best so far, not of the whole ramp
            diverge_at = i
            break
        best = min(best, value)
    end = diverge_at if diverge_at is not None else len(smoothed)
    slopes = [(smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(end - 1)]
    steepest = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else None
    return {"steepest_lr": steepest, "divergence_lr": lrs[diverge_at] if diverge_at is not None else None,
            "min_smoothed_loss": best if math.isfinite(best) else None}


def lengths_to_test(schedule: Schedule) -> list[Stage]:
    """The first stage of each distinct sequence length."""
    return list({stage.seq_len: stage for stage in reversed(schedule.stages)}.values())[::-1]


def lr_find(config: Config, output_dir: Path, steps: int, min_lr: float, max_lr: float) -> int:
    from pipeline.batches import Prefetcher, load_run_data
    from pipeline.ds_config import derive_ds_config
    from pipeline.engine import build_engine, close_processes, device_precision, init_processes

    processes = init_processes(config)
    log = processes.log
    schedule = build_schedule(config, processes.world_size)
    data = load_run_data(config, schedule, processes.rank, processes.world_size, processes.device)
    ds_config = derive_ds_config(config, schedule, device_precision(config, processes.device))
    results = []
    for stage in lengths_to_test(schedule):
        engine = build_engine(config, schedule, ds_config, data.manifest, processes)
        prefetcher = Prefetcher(data.sampler, schedule, processes.rank, processes.device)
        engine.enter_stage(stage)
        engine.ds.train()
        lrs: list[float] = []
        losses: list[float] = []
        for step in range(steps):
            lr = ramp_lr(step, steps, min_lr, max_lr)
            engine.set_lr(lr)
            values, _ = engine.train_step(prefetcher.load(stage, step, step * stage.samples_per_step))
            lrs.append(lr)
            losses.append(values.loss)
            if analyse(lrs, losses)["divergence_lr"] is not None:
                break
        prefetcher.close()
        found = analyse(lrs, losses)
        results.append({"seq_len": stage.seq_len, "stage": stage.index, "global_batch": stage.global_batch,
                        "peak_lr": stage.peak_lr, "lrs": lrs, "losses": losses, **found})
        log(f"seq_len {stage.seq_len}: steepest descent at LR {_fmt(found['steepest_lr'])}, diverges at "
            f"{_fmt(found['divergence_lr'])} (stage {stage.index} peak LR {stage.peak_lr:.2e}; {len(lrs)} steps)")
        del engine
    if processes.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        report = {"config": config.name, "steps": steps, "min_lr": min_lr, "max_lr": max_lr, "lengths": results}
        (output_dir / "lr_find.json").write_text(json.dumps(report, indent=2) + "\n")
        caps = write_caps(config, schedule, results, output_dir / "lr_caps.yaml")
        plot(results, output_dir / "lr_find.png")
        log(f"wrote {output_dir / 'lr_find.json'}, {output_dir / 'lr_find.png'} and {output_dir / 'lr_caps.yaml'}"
            f" ({caps} stage caps); train with --overlay {output_dir / 'lr_caps.yaml'}")
    close_processes()
    return 0


def write_caps(config: Config, schedule: Schedule, results: list[dict[str, Any]], path: Path) -> int:
    """The overlay: ``curriculum.stages[i].lr_max`` = a third of the divergence LR at that stage's length."""
    import yaml

    divergence = {r["seq_len"]: r["divergence_lr"] for r in results}
    lines = [f"# lr-find caps for {config.name}: lr_max = divergence LR / 3 at each stage's sequence length",
             "# use with: curriculum-pretrain train --config ... --overlay this-file"]
    if config.curriculum.stages is None:
        cap = min((d for d in divergence.values() if d is not None), default=None)
        overlay: dict[str, Any] = {"curriculum": {"pacing": {"lr_max": float(f"{cap * CAP_FRACTION:.3g}")}}} \
            if cap is not None else {}
        count = int(cap is not None)
    else:
        stages = [{"lr_max": float(f"{divergence[s.seq_len] * CAP_FRACTION:.3g}")}
                  if divergence.get(s.seq_len) is not None else {} for s in schedule.stages]
        overlay = {"curriculum": {"stages": stages}}
        count = sum(1 for s in stages if s)
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(overlay, sort_keys=False))
    return count


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        smoothed = smooth(r["losses"])
        (line,) = ax.plot(r["lrs"], smoothed, label=f"seq_len {r['seq_len']} (batch {r['global_batch']})")
        for key, marker in (("steepest_lr", "o"), ("divergence_lr", "x")):
            if r[key] is not None:
                i = r["lrs"].index(r[key])
                value = smoothed[i] if math.isfinite(smoothed[i]) else max(s for s in smoothed if math.isfinite(s))
                ax.plot([r[key]], [value], marker, color=line.get_color(), ms=8)
    finite = [s for r in results for s in smooth(r["losses"]) if math.isfinite(s)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * min(finite)) * 1.05)
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss",
           title="LR range test per sequence length (o steepest descent, x divergence)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.2e}"
