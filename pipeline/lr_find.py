"""``curriculum-pretrain lr-find``: an LR range test at each stage's sequence length.

For every distinct sequence length of the curriculum (with the batch of the first stage that trains at it), a fresh
copy of the model (the run's initial weights, from its seed) trains for ``--steps`` steps while the LR grows
exponentially from ``--min-lr`` to ``--max-lr`` (Smith 2017; fastai's ``lr_find``). The real run's directory and
checkpoints are never touched. Per length it reports:

- the divergence LR: the first LR where the raw loss is not finite or 1.3x the best raw loss so far (a 30% rise of
  a language-model loss is far outside step-to-step noise); the ramp stops there. The raw loss, not the smoothed
  one: the moving average lags ~10 steps, so on a short ramp it reaches 1.3x long after the loss did, or never
  (a 20-step ramp from 1e-6 to 1 on tiny-cpu: at seq_len 64 the raw loss doubled at LR 0.11 and the smoothed one
  crossed 1.3x only at the last step, LR 1; at seq_len 128 the raw loss went 6.95 -> 16.9 and the smoothed one
  never crossed);
- the LR of steepest descent: where the smoothed loss falls fastest per unit of ``log(lr)``, over the steps before
  divergence; not judged on fewer than ``SMOOTHED_STEPS``.

It writes ``lr_find.json``, ``lr_find.png`` and ``lr_caps.yaml``, an overlay that caps each stage's peak LR at a
third of the divergence LR of its length (``train --overlay lr_caps.yaml``; ``plan`` marks the caps that apply).
Lengths whose ramp never diverged get no cap, nor do those that diverged within their first ``MIN_STABLE_STEPS``
steps (the ramp started above every stable LR: a third of where it ended says nothing). What a length was too short
for is in its ``not_judged``; a ``--steps`` below ``SMOOTHED_STEPS`` is a warning in the output and in
``lr_find.json``.
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
from pipeline.spikes import MIN_HISTORY

SMOOTHING = 0.9
"""Exponential moving average of the loss, bias-corrected (as fastai does)."""
SMOOTHED_STEPS = 22
"""Steps the smoothed loss needs to follow the loss rather than the start of the ramp: the average puts
1 - 0.9^22 = 90 % of its weight on its last 22 values (on fewer it is close to the mean of everything so far). The
steepest descent is not judged on fewer steps before divergence."""
DIVERGENCE_FACTOR = 1.3
"""A raw loss this many times the best raw loss so far (or a non-finite one) is divergence."""
MIN_STABLE_STEPS = MIN_HISTORY
"""Steps a ramp must survive before its divergence LR makes a cap: a rise is judged against at least 10 earlier
losses, as the spike rule judges one (``pipeline.spikes.MIN_HISTORY``)."""
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


def steps_warnings(steps: int) -> list[str]:
    """What ``--steps`` is too few for, as sentences (none from ``SMOOTHED_STEPS`` on)."""
    if steps >= SMOOTHED_STEPS:
        return []
    return [f"--steps {steps} is too few for the smoothing: the moving average of the loss (factor {SMOOTHING}) needs "
            f"{SMOOTHED_STEPS} steps to follow it, so no steepest descent is judged; give --steps {SMOOTHED_STEPS} or "
            "more (default 200)"]


def divergence_step(losses: list[float]) -> Optional[int]:
    """The first step whose raw loss is not finite or ``DIVERGENCE_FACTOR`` x the best raw loss before it (the
    best so far, not of the whole ramp); None when there is none."""
    best = math.inf
    for i, loss in enumerate(losses):
        if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * best:
            return i
        best = min(best, loss)
    return None


def analyse(lrs: list[float], losses: list[float]) -> dict[str, Any]:
    """Divergence LR and its step (None if the ramp stayed stable), the steepest-descent LR of the smoothed loss
    before it, the minimum smoothed loss there, and what the ramp was too short for (``not_judged``)."""
    diverge_at = divergence_step(losses)
    end = diverge_at if diverge_at is not None else len(losses)
    smoothed = smooth(losses[:end])
    not_judged: list[str] = []
    steepest: Optional[float] = None
    if end < SMOOTHED_STEPS:
        not_judged.append(f"steepest descent (too few steps: {end} < {SMOOTHED_STEPS})")
    else:
        slopes = [(smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(end - 1)]
        steepest = lrs[min(range(len(slopes)), key=slopes.__getitem__)]
    if diverge_at is not None and diverge_at < MIN_STABLE_STEPS:
        not_judged.append(f"LR cap (too few steps: diverged at step {diverge_at} < {MIN_STABLE_STEPS}; the ramp "
                          f"started too high, start it lower with --min-lr)")
    return {"steepest_lr": steepest, "divergence_lr": lrs[diverge_at] if diverge_at is not None else None,
            "divergence_step": diverge_at, "min_smoothed_loss": min(smoothed) if smoothed else None,
            "not_judged": not_judged}


def cap_divergence_lr(result: dict[str, Any]) -> Optional[float]:
    """The divergence LR a length's cap is a third of; None when the ramp never diverged or diverged within its
    first ``MIN_STABLE_STEPS`` steps."""
    step = result.get("divergence_step")
    return None if step is not None and step < MIN_STABLE_STEPS else result["divergence_lr"]


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
    warnings = steps_warnings(steps)
    for warning in warnings:
        log(f"warning: {warning}")
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
            if divergence_step(losses) is not None:
                break
        prefetcher.close()
        found = analyse(lrs, losses)
        results.append({"seq_len": stage.seq_len, "stage": stage.index, "global_batch": stage.global_batch,
                        "peak_lr": stage.peak_lr, "lrs": lrs, "losses": losses, **found})
        steepest = "" if found["steepest_lr"] is None else f"steepest descent at LR {_fmt(found['steepest_lr'])}, "
        log(f"seq_len {stage.seq_len}: {steepest}diverges at {_fmt(found['divergence_lr'])} (stage {stage.index} "
            f"peak LR {stage.peak_lr:.2e}; {len(lrs)} steps)" + "".join(f"; not judged: {what}"
                                                                         for what in found["not_judged"]))
        del engine
    if processes.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        report = {"config": config.name, "steps": steps, "min_lr": min_lr, "max_lr": max_lr, "warnings": warnings,
                  "lengths": results}
        (output_dir / "lr_find.json").write_text(json.dumps(report, indent=2) + "\n")
        caps = write_caps(config, schedule, results, output_dir / "lr_caps.yaml")
        plot(results, output_dir / "lr_find.png")
        log(f"wrote {output_dir / 'lr_find.json'}, {output_dir / 'lr_find.png'} and {output_dir / 'lr_caps.yaml'}"
            f" ({caps} stage caps); train with --overlay {output_dir / 'lr_caps.yaml'}")
    close_processes()
    return 0


def write_caps(config: Config, schedule: Schedule, results: list[dict[str, Any]], path: Path) -> int:
    """The overlay: ``curriculum.stages[i].lr_max`` = a third of the divergence LR at that stage's length (none where
    ``cap_divergence_lr`` gives none)."""
    import yaml

    divergence = {r["seq_len"]: cap_divergence_lr(r) for r in results}
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
