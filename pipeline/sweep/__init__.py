"""``curriculum-pretrain sweep``: one real training run per base LR, then the comparison.

    curriculum-pretrain sweep --config tiny-cpu                          # 7 LRs, base_lr/10 .. base_lr*10
    curriculum-pretrain sweep --config X --lrs 1e-4,3e-4,1e-3,3e-3       # these LRs, one after another
    curriculum-pretrain sweep --config X --gpus 0,1,2,3                  # at most one run per GPU at a time

The swept value is ``curriculum.base_lr``. Stages whose peak is set absolutely (``lr: 6e-4``) are scaled by
``new_base / old_base`` so the whole schedule moves together; ``lr_mult`` and ``lr: auto`` stages follow
``base_lr`` by themselves, and ``lr_max`` caps stay where they are. Each run's changes are ``--set`` overrides
given to the trainer and recorded in the sweep manifest; with them ``run.wandb.group`` (the sweep directory's name)
and ``run.wandb.name`` (``<name>-lr_3.00e-04``), so that with ``run.wandb.enabled`` the runs of a sweep are one
wandb group, each named after its LR.

Sweep directory (default ``runs/<name>-sweep``)::

    sweep_manifest.json         the LRs, each run's overrides, peak LRs, status and trainer launches
    lr_3.00e-04/                a run directory of the trainer (config.json, metrics.jsonl/.csv, summary.json,
                                checkpoints/, train.log) plus loss_curves.png and lr_schedule.png drawn here
    lr_sweep_comparison.png     every run's train loss vs tokens, one colour per LR (linear and log tokens)
    lr_vs_final_loss.png        final loss vs LR (log x), diverged runs marked
    lr_sweep_analysis.md/.json  per-LR table, best LR, first divergent LR and their ratio

Resumable: a run whose ``summary.json`` exists is done and skipped, and so is a run the spike guard stopped
(``guard.max_events`` or ``guard.eval_rise``: ``diverged``, a result of the sweep; its ``train.log`` names the
checkpoints to resume from by hand); any other run is started (or resumed from its latest checkpoint) with
``--resume auto``. Any other trainer exit status than 0 marks the run ``failed`` and the sweep goes on with the
others, except status 2 (bad input) on the first run, which aborts the sweep with the trainer's error. The sweep
exits 0 when every run is done or diverged, 1 when some failed or stopped (the analysis is written either way), 2 on
bad input.

The analysis is pure functions over the runs' metrics records (``spike_steps``, ``classify_run``,
``analyze_run``, ``analyze_sweep``); the process handling (``run_jobs``) is separate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from pipeline.rundir import RunDir, read_records
from pipeline.sweep.analysis import (RunAnalysis, SweepAnalysis, analyze_run, analyze_sweep, classify_run,
                                     format_analysis, guard_stop, spike_steps, suggestions)
from pipeline.sweep.grid import (check_run_names, default_lrs, lr_overrides, parse_gpus, parse_lrs, run_name,
                                 wandb_overrides)
from pipeline.sweep.jobs import (Job, SweepAborted, child_environment, cuda_device_count, run_jobs,
                                 trainer_command)
from pipeline.sweep.manifest import MANIFEST, Manifest
from pipeline.sweep.plots import plot_run_curves, plot_sweep

__all__ = ["Job", "RunAnalysis", "SweepAborted", "SweepAnalysis", "analyze_run", "analyze_sweep", "child_environment",
           "classify_run", "default_lrs", "format_analysis", "lr_overrides", "parse_gpus", "parse_lrs",
           "run_jobs", "run_name", "spike_steps", "suggestions"]


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
    from pipeline.commands import config_sets, load_config_from_args, output_directory

    config = load_config_from_args(args)
    sets = config_sets(args)
    build_schedule(config)  # a bad config is one error line before any run starts
    lrs = parse_lrs(args.lrs) if args.lrs is not None else check_run_names(default_lrs(config.curriculum.base_lr))
    gpus = parse_gpus(args.gpus, cuda_device_count()) if args.gpus is not None else None
    sweep_dir = output_directory("--output-dir", args.output_dir or Path("runs") / f"{config.name}-sweep")

    manifest = Manifest.open(sweep_dir, config, args.config, args.overlays, sets)
    for lr in lrs:
        # one wandb group per sweep, each run named after its LR: tiny-cpu-sweep / tiny-cpu-lr_3.00e-04
        overrides = [*lr_overrides(config.curriculum, lr),
                     *wandb_overrides(sweep_dir.resolve().name, f"{config.name}-{run_name(lr)}")]
        # each run's config is validated here too: an override the trainer would refuse fails before any run
        run_config = load_config(args.config, [*sets, *overrides], overlays=args.overlays)
        manifest.add_run(lr, overrides, [stage.peak_lr for stage in build_schedule(run_config).stages])
    manifest.save()

    jobs = []
    for lr in lrs:
        name, run_dir = run_name(lr), sweep_dir / run_name(lr)
        if RunDir(run_dir).summary.exists():
            manifest.run(name)["status"] = "done"
            print(f"{name}: done (summary.json exists), skipped")
            continue
        if stopped_by := guard_stop(read_records(RunDir(run_dir).metrics)):
            manifest.run(name)["status"] = "diverged"
            print(f"{name}: stopped by {stopped_by} (diverged), not relaunched; its train.log names the "
                  "checkpoints to resume from by hand (train --resume <checkpoint>, at a lower LR)")
            continue
        jobs.append(Job(name, run_dir, trainer_command(args.config, args.overlays,
                                                       [*sets, *manifest.run(name)["overrides"]], run_dir)))
    manifest.save()

    def on_start(job: Job, gpu: Optional[int]) -> None:
        entry = manifest.run(job.name)
        entry.update({"status": "running", "launches": entry["launches"] + 1, "gpu": gpu})
        manifest.save()
        where = "" if gpu is None else f" on GPU {gpu}"
        print(f"{job.name}: training{where} (log: {RunDir(job.run_dir).train_log})", flush=True)

    def on_finish(job: Job, status: int, seconds: float) -> None:
        entry = manifest.run(job.name)
        entry["exit_status"] = status
        stopped_by = guard_stop(read_records(RunDir(job.run_dir).metrics)) if status != 0 else None
        if stopped_by:
            entry["status"] = "diverged"
            print(f"{job.name}: stopped by {stopped_by} after {seconds:.0f} s: diverged, a result "
                  "(a later sweep does not relaunch it)", flush=True)
        elif status != 0:
            entry["status"] = "failed"
            print(f"{job.name}: FAILED (trainer exit status {status}) after {seconds:.0f} s; counted as diverged, "
                  f"going on with the other runs (log: {RunDir(job.run_dir).train_log})", flush=True)
        elif RunDir(job.run_dir).summary.exists():
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
        manifest.run(err.job.name).update({"status": "failed", "exit_status": err.status})
        manifest.save()
        # the trainer's own one-line error, so it reads as if the config had been trained directly
        print(f"error: {err} (first run of the sweep, {err.job.name}; sweep aborted; log: "
              f"{RunDir(err.job.run_dir).train_log})", file=sys.stderr)
        return err.status

    # ------------------------------------------------------------------------------------ comparison
    analyses, records = [], {}
    for name, entry in sorted(manifest.data["runs"].items(), key=lambda item: item[1]["lr"]):
        run_dir = sweep_dir / name
        run_records = read_records(RunDir(run_dir).metrics)
        failed = entry["status"] == "failed"
        if not run_records and not failed:
            continue  # never started
        records[name] = run_records
        if run_records:
            plot_run_curves(run_dir, run_records, entry["lr"])
        analyses.append(analyze_run(entry["lr"], run_records, failed=failed,
                                    complete=RunDir(run_dir).summary.exists()))
    analysis = analyze_sweep(analyses)
    plot_sweep(sweep_dir, analysis, records)
    report = format_analysis(analysis, f"{config.name} (base_lr {config.curriculum.base_lr:.2e} in the config)")
    (sweep_dir / "lr_sweep_analysis.md").write_text(report)
    (sweep_dir / "lr_sweep_analysis.json").write_text(json.dumps(analysis.to_json(), indent=2, allow_nan=False)
                                                      + "\n")
    print(report)
    print(f"sweep: {sweep_dir} ({MANIFEST}, lr_sweep_analysis.md/.json, lr_sweep_comparison.png, "
          "lr_vs_final_loss.png)")
    unfinished = [name for name, entry in manifest.data["runs"].items() if entry["status"] not in ("done", "diverged")]
    if unfinished:
        print(f"not done: {', '.join(sorted(unfinished))} (see their train.log; running the sweep again retries "
              "them, resuming from their latest checkpoint)")
    return 1 if unfinished else 0
