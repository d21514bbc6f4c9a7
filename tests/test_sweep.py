"""``sweep``: the LR grid, the per-run overrides, the status of a run and the analysis of a sweep (pure functions
on synthetic metrics, each well under a second); the process handling with a stand-in trainer (a few short
``python -c`` processes); one real sweep of three tiny runs on the DeepSpeed engine, resumed after one run's
``summary.json`` is deleted; and one of two runs cut to two steps, logging to wandb offline.

Synthetic metrics follow ``metrics.jsonl``: train lines ``{kind, step, tokens, stage, seq_len, lr, loss, ...}``
with steps counted from 0, eval lines ``{kind: eval, step, eval_loss}``, guard lines ``{kind: guard, step}``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest
from conftest import REPO_ROOT, TINY_LLAMA_YAML, make_config, process_env, read_wandb_run

from curriculum.errors import ConfigError
from curriculum.loading import apply_set_overrides, validate_config
from curriculum.schedule import build_schedule
from pipeline.rundir import train_rows
from pipeline.sweep import (Job, RunAnalysis, SweepAborted, analyze_run, analyze_sweep, classify_run, default_lrs,
                            format_analysis, lr_overrides, parse_gpus, parse_lrs, run_jobs, run_name, spike_steps)
from pipeline.sweep.analysis import guard_stop
from pipeline.sweep.grid import wandb_overrides

# --------------------------------------------------------------------------------------------------- the LR grid


def test_default_grid_is_seven_log_spaced_lrs_from_a_tenth_to_ten_times_base_lr() -> None:
    """7 LRs, base_lr/10 .. base_lr*10, a factor 10^(1/3) = 2.154 apart, 3 significant digits, base_lr exact."""
    grid = default_lrs(3e-3)
    assert grid == [3e-4, 6.46e-4, 1.39e-3, 3e-3, 6.46e-3, 1.39e-2, 3e-2]
    for low, high in zip(grid, grid[1:]):
        assert high / low == pytest.approx(10 ** (1 / 3), rel=5e-3)
    assert [run_name(lr) for lr in grid[:2]] == ["lr_3.00e-04", "lr_6.46e-04"]


def test_lrs_are_parsed_sorted() -> None:
    """``--lrs`` takes any float notation, with or without spaces, and sorts."""
    assert parse_lrs("1e-2, 3e-4,0.001,10") == [3e-4, 1e-3, 1e-2, 10.0]


@pytest.mark.parametrize(("text", "bad"), [
    ("1e-3,abc", "abc"), ("1e-3,-1e-3", "-1e-3"), ("0", "0"), ("1e-3,,3e-3", ""), ("nan", "nan"), ("inf", "inf"),
    ("1e-3,0.001", "0.001"), ("1e-3,1.001e-3", "0.001,0.001001"),
], ids=["not-a-number", "negative", "zero", "empty", "nan", "inf", "twice", "same-run-directory"])
def test_bad_lrs_are_one_error_naming_the_flag_and_value(text: str, bad: str) -> None:
    """Anything but distinct positive finite numbers is a ConfigError naming ``--lrs`` and the bad item (two LRs
    that would share a run directory name both)."""
    with pytest.raises(ConfigError) as error:
        parse_lrs(text)
    assert error.value.field == "--lrs" and error.value.value == bad, str(error.value)


def test_gpus_need_cuda_and_valid_distinct_ids() -> None:
    """``--gpus`` on a machine without CUDA, an id that is not a number, one past the devices, or one given twice:
    a ConfigError naming ``--gpus``."""
    assert parse_gpus("0,1,3", cuda_devices=4) == [0, 1, 3]
    for text, devices, message in [("0", 0, "no CUDA device"), ("0,x", 4, "comma-separated GPU ids"),
                                   ("0,4", 4, "ids 0 .. 3"), ("1,1", 4, "given twice")]:
        with pytest.raises(ConfigError, match=message) as error:
            parse_gpus(text, cuda_devices=devices)
        assert error.value.field == "--gpus"


# --------------------------------------------------------------------------------------------------- overrides

STAGES = [
    {"until_step": 10, "seq_len": 64, "global_batch": 32, "lr": 1.0e-3},  # absolute: scaled
    {"until_step": 20, "seq_len": 128, "global_batch": 16, "lr_mult": 2.0},  # follows base_lr
    {"until_step": 30, "seq_len": 256, "global_batch": 8, "lr": "auto", "lr_max": 5.0e-4},  # capped
]


def with_overrides(curriculum: dict[str, Any], overrides: Sequence[str]) -> list[float]:
    """Each stage's peak LR once ``overrides`` are applied as ``--set`` would."""
    return [stage.peak_lr for stage in build_schedule(validate_config(
        apply_set_overrides({"curriculum": curriculum}, overrides))).stages]


def test_overrides_move_base_lr_and_scale_absolute_stage_lrs_only() -> None:
    """Sweeping base_lr 2e-3 -> 6e-3 (x3): ``curriculum.base_lr`` and the absolute stage 0 ``lr`` (1e-3 -> 3e-3)
    are overridden; the ``lr_mult`` stage follows base_lr by itself (2 x 6e-3), and the ``lr: auto`` stage's
    ``lr_max`` cap stays (5e-4)."""
    curriculum = {"base_lr": 2.0e-3, "lr_scaling": {"rule": "none"}, "stages": STAGES}
    overrides = lr_overrides(make_config(curriculum).curriculum, 6.0e-3)
    assert [o.split("=")[0] for o in overrides] == ["curriculum.base_lr", "curriculum.stages.0.lr"]
    assert float(overrides[0].split("=")[1]) == 6.0e-3
    assert float(overrides[1].split("=")[1]) == pytest.approx(3.0e-3, rel=1e-12)
    assert with_overrides(curriculum, overrides) == pytest.approx([3.0e-3, 1.2e-2, 5.0e-4], rel=1e-12)
    assert with_overrides(curriculum, []) == pytest.approx([1.0e-3, 4.0e-3, 5.0e-4], rel=1e-12)


@pytest.mark.parametrize(("group", "name"), [("tiny-cpu-sweep", "tiny-cpu-lr_3.00e-04"),
                                             ("a: b", "[1, 2] # not a list")])
def test_wandb_overrides_set_the_group_and_name_whatever_they_hold(group: str, name: str) -> None:
    """A sweep's wandb group and run name reach the config as the strings they are (YAML would read ``a: b`` as a
    mapping, ``[1, 2]`` as a list)."""
    raw = apply_set_overrides({"curriculum": {"stages": [{"until_step": 1, "seq_len": 8, "global_batch": 1}]}},
                              wandb_overrides(group, name))
    wandb = validate_config(raw).run.wandb
    assert (wandb.group, wandb.name) == (group, name)


def test_overrides_of_the_base_lr_itself_change_nothing_and_pacing_lr_is_scaled() -> None:
    """At the config's own base_lr the absolute LRs are written back unchanged; a pacing segment's absolute
    ``lr`` scales like a stage's."""
    curriculum = {"base_lr": 2.0e-3, "stages": STAGES}
    assert lr_overrides(make_config(curriculum).curriculum, 2.0e-3) == ["curriculum.base_lr=0.002",
                                                                         "curriculum.stages.0.lr=0.001"]
    pacing = {"base_lr": 1.0e-3, "pacing": {"type": "fixed_linear", "min_seq_len": 64, "max_seq_len": 256,
                                            "total_curriculum_steps": 10, "global_batch": 8, "lr": 6.0e-4,
                                            "until_step": 20}}
    overrides = lr_overrides(make_config(pacing).curriculum, 1.0e-2)
    assert overrides[1].startswith("curriculum.pacing.lr=")
    assert float(overrides[1].split("=")[1]) == pytest.approx(6.0e-3, rel=1e-12)


# --------------------------------------------------------------------------------------------------- status


def records(losses: Sequence[float], stage_steps: int = 100, eval_loss: Optional[float] = None,
            guard_steps: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Train lines for ``losses`` (``stage_steps`` steps per stage, seq_len doubling per stage), an eval line after
    the last step when ``eval_loss`` is given, and a guard line at each of ``guard_steps``."""
    lines: list[dict[str, Any]] = [
        {"kind": "train", "step": step, "tokens": (step + 1) * 512, "stage": step // stage_steps,
         "seq_len": 64 * 2 ** (step // stage_steps), "lr": 1e-3, "grad_clip": 1.0, "loss": loss, "grad_norm": 1.0,
         "tok_per_s": 1000.0}
        for step, loss in enumerate(losses)]
    lines += [{"kind": "guard", "step": step, "stage": step // stage_steps, "reason": "loss", "action": "skip"}
              for step in guard_steps]
    if eval_loss is not None:
        lines.append({"kind": "eval", "step": len(losses) - 1, "tokens": len(losses) * 512, "eval_loss": eval_loss})
    return lines


def falling(steps: int = 30, start: float = 6.0, end: float = 4.0) -> list[float]:
    return [start + (end - start) * step / (steps - 1) for step in range(steps)]


def with_loss(losses: list[float], step: int, loss: float) -> list[float]:
    return losses[:step] + [loss] + losses[step + 1:]


def with_grad_norm(lines: list[dict[str, Any]], step: int, norm: float) -> list[dict[str, Any]]:
    return [{**line, "grad_norm": norm} if line["kind"] == "train" and line["step"] == step else line
            for line in lines]


@pytest.mark.parametrize(("lines", "failed", "status", "reason"), [
    (records(falling()), False, "converged", None),
    (records(with_loss(falling(), 12, math.nan)), False, "diverged", "non-finite train loss from step 12"),
    (records(falling(), eval_loss=math.inf), False, "diverged", "non-finite eval loss"),
    (records(falling(start=6.0, end=7.0)), False, "diverged", "final train loss 6.931 (mean of the last 5 steps) "
                                                              "above the first step's 6"),
    (records(falling(), eval_loss=4.1), True, "diverged", "the trainer failed"),
    (records(falling(), eval_loss=4.1) + [{"kind": "stop", "step": 30, "reason": "guard.eval_rise"}], True,
     "diverged", "stopped by guard.eval_rise"),
    (records(falling(), guard_steps=[5]), False, "unstable", "1 guard event"),
    (records(with_loss(falling(), 15, 12.0)), False, "unstable", "loss spike at step 15"),
    (with_grad_norm(records(falling()), 20, 30.0), False, "unstable", "gradient-norm spike at step 20"),
    (records(with_loss(falling(), 3, 12.0)), False, "converged", None),
    (records(falling(15, 8.0, 3.0) + falling(15, 6.5, 6.0), stage_steps=15), False, "converged", None),
], ids=["falling", "nan-loss", "inf-eval", "final-above-first", "trainer-failed", "guard-stopped", "guard-event",
        "spike", "grad-norm-spike", "jump-before-10-steps-of-the-stage", "stage-switch-jump"])
def test_status_of_a_run(lines: list[dict[str, Any]], failed: bool, status: str, reason: Optional[str]) -> None:
    """``diverged``: a non-finite loss, a failed trainer (named by the reason of its ``kind: stop`` line when the
    guard stopped it), or a final train loss (mean of the last 5 steps) above the first; ``unstable``: guard events
    or a spike, named by what spiked (a loss far above its stage's recent level, judged once the stage has 10 steps;
    a gradient norm 10x its recent median); ``converged`` otherwise. A jump at a stage switch (new sequence length)
    is no spike."""
    got, reasons = classify_run(lines, failed=failed)
    assert got == status, reasons
    if reason is None:
        assert reasons == []
    else:
        assert reason in reasons, reasons


def test_spikes_are_steps_of_the_same_stage_and_exclude_non_finite_losses() -> None:
    """Two spikes in stage 0 (loss 12 at steps 12 and 20, where the previous steps average 5.6 and 5.4; the spike
    at 12 is left out of the average at 20), none for the NaN at step 25 (that is divergence) or at the switch to
    stage 1 at step 30 (loss 7.0 against stage 0's 4.0)."""
    losses = with_loss(with_loss(with_loss(falling(), 12, 12.0), 20, 12.0), 25, math.nan) + [7.0] * 5
    rows = train_rows(records(losses, stage_steps=30))
    assert list(spike_steps(rows)) == [12, 20]


def test_run_numbers_from_its_metrics() -> None:
    """First loss, final train loss (mean of the last 5), final eval loss, minimum, spikes and guard events."""
    run = analyze_run(1e-3, records(with_loss(falling(), 15, 12.0), eval_loss=4.2, guard_steps=[3, 9]))
    assert (run.name, run.status, run.steps) == ("lr_1.00e-03", "unstable", 30)
    assert run.first_loss == 6.0 and run.min_loss == pytest.approx(4.0)
    assert run.final_train_loss == pytest.approx(sum(falling()[-5:]) / 5)
    assert run.final_eval_loss == 4.2 and run.final_loss == 4.2
    assert (run.spikes, run.guard_events, run.non_finite, run.failed) == ([15], 2, False, False)


# --------------------------------------------------------------------------------------------------- analysis


def a_run(lr: float, kind: str = "falling", eval_loss: Optional[float] = None, complete: bool = True) -> RunAnalysis:
    """A run of 30 steps: ``falling`` (6 -> 4), ``guard`` (falling, one guard event), ``rising`` (6 -> 7),
    ``nan`` (NaN from step 10) or ``failed`` (falling, but the trainer exited with an error)."""
    losses = {"falling": falling(), "guard": falling(), "failed": falling(), "rising": falling(start=6.0, end=7.0),
              "nan": falling()[:10] + [math.nan] * 20}[kind]
    lines = records(losses, eval_loss=eval_loss, guard_steps=[4] if kind == "guard" else [])
    return analyze_run(lr, lines, failed=kind == "failed", complete=complete)


def test_best_lr_first_divergent_and_ratio() -> None:
    """The best LR is the lowest final eval loss among runs that did not diverge (an unstable one counts, a failed
    one with a lower eval loss does not); the first divergent LR is the smallest diverged LR above it; 3x apart is
    a comfortable margin."""
    analysis = analyze_sweep([
        a_run(1e-2, "nan"), a_run(1e-4, eval_loss=5.2), a_run(3e-4, eval_loss=4.6), a_run(1e-3, "guard", 4.3),
        a_run(3e-3, "failed", eval_loss=3.0)])
    assert [r.lr for r in analysis.runs] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert [r.status for r in analysis.runs] == ["converged", "converged", "unstable", "diverged", "diverged"]
    assert analysis.compared_by == "final eval loss"
    assert (analysis.best_lr, analysis.best_loss, analysis.first_divergent_lr) == (1e-3, 4.3, 3e-3)
    assert analysis.edge_ratio == pytest.approx(3.0)
    assert "3x margin to divergence" in analysis.suggestions[0]
    assert "Unstable (spikes or guard events) at 1.00e-03." in analysis.suggestions

    data = analysis.to_json()
    json.dumps(data, allow_nan=False)  # strict JSON: the NaN run's losses are null
    nan_run = data["runs"][-1]
    assert (nan_run["lr"], nan_run["final_train_loss"], nan_run["non_finite"]) == (1e-2, None, True)
    assert data["best_lr"] == 1e-3 and data["runs"][2]["final_loss"] == 4.3

    report = format_analysis(analysis, "test")
    assert "| 1.00e-03 | 4.1379 | 4.3000 | 4.0000 | 0 | 1 | unstable |" in report, report
    assert "| 1.00e-02 | n/a | n/a | 5.3793 | 0 | 0 | diverged |" in report, report
    assert "- edge-of-stability ratio (first divergent / best): 3" in report, report


@pytest.mark.parametrize(("runs", "best", "first_divergent", "ratio", "suggestion"), [
    ([a_run(1e-3, eval_loss=5.0), a_run(2e-3, eval_loss=4.5), a_run(4e-3, "rising", 6.5)],
     2e-3, 4e-3, 2.0, "near the edge of stability. For longer runs pick a lower one (e.g. 1.00e-03)"),
    ([a_run(1e-3, eval_loss=5.0), a_run(1e-2, eval_loss=4.5)], 1e-2, None, None,
     "the grid may not reach the edge of stability; extend it upward (above 1.00e-02)"),
    ([a_run(1e-4, "failed"), a_run(1e-3, eval_loss=4.0), a_run(1e-2, eval_loss=4.4), a_run(1e-1, "nan")],
     1e-3, 1e-1, 100.0, "too coarse there to locate the edge; add LRs between 1.00e-03 and 1.00e-01"),
    ([a_run(1e-3, "rising"), a_run(1e-2, "nan")], None, None, None, "extend the grid downward (below 1.00e-03)"),
    ([a_run(1e-3, eval_loss=5.0), a_run(3e-3, eval_loss=3.0, complete=False), a_run(1e-2, "nan")],
     1e-3, 1e-2, 10.0, "a reasonable choice"),
], ids=["near-the-edge", "no-divergence", "diverged-below-best-is-not-the-edge", "all-diverged",
        "unfinished-run-left-out"])
def test_edge_of_stability_cases(runs: list[RunAnalysis], best: Optional[float], first_divergent: Optional[float],
                                 ratio: Optional[float], suggestion: str) -> None:
    """Ratio < 3: pick a lower LR; no divergence above the best: extend upward; ratio > 10: refine between; every
    run diverged: extend downward; an unfinished run is left out of the best LR."""
    analysis = analyze_sweep(runs)
    assert (analysis.best_lr, analysis.first_divergent_lr) == (best, first_divergent)
    assert analysis.edge_ratio == (None if ratio is None else pytest.approx(ratio))
    assert any(suggestion in note for note in analysis.suggestions), analysis.suggestions


def test_without_eval_runs_are_compared_by_final_train_loss() -> None:
    """No eval lines: the best LR is the one with the lowest final train loss (mean of the last 5 steps)."""
    low = analyze_run(1e-3, records(falling(end=3.0)))
    high = analyze_run(1e-4, records(falling(end=5.0)))
    analysis = analyze_sweep([low, high])
    assert analysis.compared_by == "final train loss"
    assert analysis.best_lr == 1e-3 and analysis.best_loss == pytest.approx(low.final_train_loss)


# --------------------------------------------------------------------------------------------------- short runs

# The run: 6 steps, the loss falls from 8.35 to 6.4 and blows up to 13.1 at the last step. The final train
# loss, the mean of the last 5 steps (7.2, 6.6, 6.4, 6.9, 13.1), is 8.04, below the first step's 8.35: it was
# classed converged. The spike rule, which judges a stage's loss from its 11th line on, never looked at step 5.
BLOWN_UP = [8.35, 7.2, 6.6, 6.4, 6.9, 13.1]


def test_a_short_run_whose_loss_ends_above_its_start_is_diverged() -> None:
    """The last step's loss above the first step's is divergence however short the run."""
    lines = records(BLOWN_UP)
    assert analyze_run(1e-2, lines).final_train_loss == pytest.approx(8.04)
    assert classify_run(lines) == ("diverged", ["last train loss 13.1 (step 5) above the first step's 8.35"])


@pytest.mark.parametrize(("eval_losses", "status", "reasons"), [
    ([6.8, 5.2, 4.31, 4.9, 6.22, 5.99], "diverged",
     ["last held-out loss 5.99 (step 29) above its lowest 4.31 (step 14) by more than 10%"]),
    ([6.8, 5.2, 4.31, 4.5, 4.7], "converged", []),
    ([6.8, 5.2, 4.31, 4.2], "converged", [])])
def test_a_run_whose_held_out_loss_climbs_back_is_diverged(eval_losses: list[float], status: str,
                                                            reasons: list[str]) -> None:
    """A run whose train loss stays below its start (no spike the guard would skip) but whose held-out loss ends
    more than 10 % above its lowest broke: the GPU study's run at twice its tuned LR went 4.31 -> 6.22 -> 5.99. A
    last held-out loss within 10 % (4.7 against 4.31: 9 %) is not judged a divergence."""
    lines = records(falling())
    lines += [{"kind": "eval", "step": 5 * index + 4, "tokens": (5 * index + 5) * 512, "eval_loss": loss}
              for index, loss in enumerate(eval_losses)]
    assert classify_run(lines) == (status, reasons)


@pytest.mark.parametrize(("steps", "status", "reasons"), [
    (6, "not judged", ["too few steps: 6 < 10"]), (9, "not judged", ["too few steps: 9 < 10"]), (10, "converged", [])])
def test_a_run_too_short_to_judge_is_not_judged(steps: int, status: str, reasons: list[str]) -> None:
    """A falling run of fewer than 10 logged steps (2 x the final-loss window) is not judged; 10 steps are."""
    assert classify_run(records(falling(steps))) == (status, reasons)


def short_run(lr: float, eval_loss: float, complete: bool = True) -> RunAnalysis:
    return analyze_run(lr, records(falling(6), eval_loss=eval_loss), complete=complete)


def test_runs_too_short_to_judge_are_neither_the_best_lr_nor_a_reason_to_go_higher() -> None:
    """A sweep of 6-step runs: no best LR, no "extend upward", one suggestion saying why; the table says "not
    judged (too few steps: 6 < 10)". Before, the lowest final eval loss (the largest LR here) was the best and the
    grid was to be extended upward."""
    analysis = analyze_sweep([short_run(1e-3, 6.0), short_run(1e-2, 5.0)])
    assert (analysis.best_lr, analysis.first_divergent_lr) == (None, None)
    assert analysis.suggestions == ["Not judged (too few steps: 6 < 10) at 1.00e-03, 1.00e-02: neither the best LR "
                                    "nor evidence for a higher or lower one; train for at least 10 logged steps."]
    report = format_analysis(analysis, "test")
    assert "| 1.00e-02 | 4.8000 | 5.0000 | 4.0000 | 0 | 0 | not judged (too few steps: 6 < 10) |" in report, report
    assert "- best LR: none" in report


def test_a_short_run_above_the_best_is_no_evidence_about_the_edge() -> None:
    """A run stopped after 6 steps at the largest LR: the grid is to be extended above the largest LR judged
    (1e-2), not above the short run's, and the short run is named as not judged."""
    analysis = analyze_sweep([a_run(1e-3, eval_loss=5.0), a_run(1e-2, eval_loss=4.5),
                              short_run(1e-1, 3.0, complete=False)])
    assert analysis.best_lr == 1e-2 and analysis.runs[-1].status == "not judged"
    assert any("extend it upward (above 1.00e-02)" in note for note in analysis.suggestions), analysis.suggestions
    assert any(note.startswith("Not judged (too few steps: 6 < 10) at 1.00e-01") for note in analysis.suggestions)


# --------------------------------------------------------------------------------------------------- processes

# A stand-in for the trainer: sleeps, records what it was started with, prints, exits with the status it is given.
STAND_IN = """\
import json, os, sys, time
run_dir, seconds, status = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
start = time.monotonic()
time.sleep(seconds)
seen = {key: os.environ.get(key) for key in ("CUDA_VISIBLE_DEVICES", "MASTER_PORT", "RANK")}
with open(os.path.join(run_dir, "started.json"), "w") as f:
    json.dump({**seen, "start": start, "end": time.monotonic()}, f)
errors = {2: "curriculum.base_lr = 0: must be positive", 4: "liger_kernel is not installed (No module named ...)"}
print(f"error: {errors[status]}" if status in errors else "stand-in trained")
sys.exit(status)
"""


def stand_in_jobs(root: Path, statuses: Sequence[int], seconds: float = 0.0) -> list[Job]:
    return [Job(f"run{i}", root / f"run{i}", [sys.executable, "-c", STAND_IN, str(root / f"run{i}"), str(seconds),
                                              str(status)])
            for i, status in enumerate(statuses)]


def started(job: Job) -> Optional[dict[str, Any]]:
    path = job.run_dir / "started.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_with_gpus_each_gpu_runs_one_job_at_a_time_with_its_own_device_and_port(tmp_path: Path) -> None:
    """Four runs on ``--gpus 0,1`` of a process that sees CUDA devices 4,5: never two at once on one GPU, both GPUs
    used, each run sees only its device (mapped through the sweep's ``CUDA_VISIBLE_DEVICES``), runs at the same
    time get different ``MASTER_PORT``s, and no launcher variable (``RANK``) leaks into a run."""
    jobs = stand_in_jobs(tmp_path, [0, 0, 0, 0], seconds=0.2)
    environ = {**os.environ, "CUDA_VISIBLE_DEVICES": "4,5", "RANK": "3"}
    starts: list[tuple[str, Optional[int]]] = []
    finishes: list[tuple[str, int]] = []
    run_jobs(jobs, [0, 1], environ, lambda job, gpu: starts.append((job.name, gpu)),
             lambda job, status, seconds: finishes.append((job.name, status)), poll_s=0.02)
    assert sorted(finishes) == [(job.name, 0) for job in jobs]
    seen = [started(job) for job in jobs]
    assert all(s is not None and s["RANK"] is None for s in seen)
    gpu_of = dict(starts)
    assert {gpu_of[job.name] for job in jobs} == {0, 1}
    for job, s in zip(jobs, seen):
        assert s["CUDA_VISIBLE_DEVICES"] == {0: "4", 1: "5"}[gpu_of[job.name]]
    for i, a in enumerate(seen):
        for b in seen[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            if overlap:
                assert a["CUDA_VISIBLE_DEVICES"] != b["CUDA_VISIBLE_DEVICES"], (a, b)
                assert a["MASTER_PORT"] != b["MASTER_PORT"], (a, b)
    assert "stand-in trained" in (jobs[0].run_dir / "train.log").read_text()


def test_a_failed_run_does_not_stop_the_others(tmp_path: Path) -> None:
    """One after another: runs exiting 1, 2 and 4 after the first run are reported as they are and the runs after
    them still train."""
    jobs = stand_in_jobs(tmp_path, [0, 1, 2, 4, 0])
    finishes: list[tuple[str, int]] = []
    run_jobs(jobs, None, os.environ, lambda job, gpu: None,
             lambda job, status, seconds: finishes.append((job.name, status)), poll_s=0.02)
    assert finishes == [("run0", 0), ("run1", 1), ("run2", 2), ("run3", 4), ("run4", 0)]


@pytest.mark.parametrize("status, error", [(2, r"curriculum\.base_lr = 0: must be positive"),
                                           (4, r"liger_kernel is not installed \(No module named \.\.\.\)")])
def test_bad_input_or_a_missing_package_on_the_first_run_aborts_with_the_trainers_error(
        tmp_path: Path, status: int, error: str) -> None:
    """The first run exits 2 (bad input) or 4 (a package not installed), which every other run would hit too:
    ``SweepAborted`` with that status and the trainer's error line, and no other run starts."""
    jobs = stand_in_jobs(tmp_path, [status, 0])
    with pytest.raises(SweepAborted, match=f"^{error}$") as aborted:
        run_jobs(jobs, None, os.environ, lambda job, gpu: None, lambda job, status, seconds: None, poll_s=0.02)
    assert (aborted.value.job, aborted.value.status) == (jobs[0], status)
    assert started(jobs[1]) is None


# --------------------------------------------------------------------------------------------------- a real sweep

# 3 stages, 10 steps of 256 tokens, evaluation at the end, checkpoints after steps 4 and 8 and the final one (10).
# Stage 0 follows base_lr (lr_scaling none), stage 1 is 0.5 x base_lr, stage 2 has an absolute lr the sweep scales.
SWEEP_CONFIG_YAML = """\
name: tiny-sweep
""" + TINY_LLAMA_YAML + """\
curriculum:
  base_lr: 3.0e-3
  lr_scaling: {{rule: none}}
  stages:
    - {{until_step: 4, seq_len: 32, global_batch: 8, warmup_steps: 2}}
    - {{until_step: 7, seq_len: 64, global_batch: 4, lr_mult: 0.5}}
    - {{until_step: 10, seq_len: 128, global_batch: 2, lr: 1.0e-3}}
run:
  seed: 1234
  eval_every: 0
  eval_batches: 1
  eval_batch: 2
  checkpoint_every: 4
  tensorboard: false
  export: false
"""
SWEEP_LRS = [1e-3, 1e-2, 10.0]  # 10.0 diverges on this model: the loss goes from 6.25 to about 1,000
RUN_FILES = ["config.json", "metrics.csv", "metrics.jsonl", "summary.json", "loss_curves.png", "lr_schedule.png",
             "train.log"]
SWEEP_FILES = ["sweep_manifest.json", "lr_sweep_comparison.png", "lr_vs_final_loss.png", "lr_sweep_analysis.md",
               "lr_sweep_analysis.json"]


def sweep(config: Path, sweep_dir: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--config", str(config), "--lrs",
                           ",".join(map(str, SWEEP_LRS)), "--output-dir", str(sweep_dir)], cwd=REPO_ROOT,
                          env=process_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_a_real_three_lr_sweep_compares_the_runs_and_resumes(data_dir: Path, tmp_path: Path) -> None:
    """Three tiny runs (1e-3, 1e-2, 10) trained by the real trainer: every run directory holds its config,
    metrics, summary, plots and checkpoints (periodic, final, best); each stage's peak LR moved with base_lr (the
    absolute one scaled); the sweep's best LR is the one with the lowest final eval loss in the runs' summary.json
    and 10 is diverged. After one run's summary.json is deleted, running the sweep again trains only that run."""
    start = time.perf_counter()
    config = tmp_path / "tiny-sweep.yaml"
    config.write_text(SWEEP_CONFIG_YAML.format(data_dir=data_dir))
    sweep_dir = tmp_path / "sweep"
    sweep(config, sweep_dir)

    names = [run_name(lr) for lr in SWEEP_LRS]
    assert names == ["lr_1.00e-03", "lr_1.00e-02", "lr_1.00e+01"]
    for name in names:
        run_dir = sweep_dir / name
        missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
        assert not missing, f"{name} lacks {missing}: {sorted(p.name for p in run_dir.iterdir())}"
        checkpoints = run_dir / "checkpoints"
        assert (checkpoints / "latest").read_text().strip() == "step00000010"  # the final one
        for kept in ("step00000008", "step00000010"):  # periodic (keep 2: 8 and 10), final
            assert (checkpoints / kept).is_dir(), f"{name}: no checkpoints/{kept}"
        assert (checkpoints / "best").read_text() == "step00000010"  # a pointer: the one evaluation, at the end
    assert all((sweep_dir / f).is_file() for f in SWEEP_FILES), sorted(p.name for p in sweep_dir.iterdir())

    manifest = json.loads((sweep_dir / "sweep_manifest.json").read_text())
    assert manifest["lrs"] == SWEEP_LRS
    for lr, name in zip(SWEEP_LRS, names):
        entry = manifest["runs"][name]
        assert (entry["status"], entry["launches"]) == ("done", 1)
        assert entry["overrides"][0] == f"curriculum.base_lr={lr!r}"
        assert entry["overrides"][1].startswith("curriculum.stages.2.lr=")
        peaks = [lr, 0.5 * lr, 1.0e-3 * lr / 3.0e-3]
        assert entry["peak_lrs"] == pytest.approx(peaks, rel=1e-12)
        rows = [json.loads(line) for line in (sweep_dir / name / "metrics.jsonl").read_text().splitlines()]
        logged_peaks = [max(r["lr"] for r in rows if r["kind"] == "train" and r["stage"] == s) for s in range(3)]
        assert logged_peaks == pytest.approx(peaks, rel=1e-9), name

    analysis = json.loads((sweep_dir / "lr_sweep_analysis.json").read_text())
    summaries = {lr: json.loads((sweep_dir / name / "summary.json").read_text())
                 for lr, name in zip(SWEEP_LRS, names)}
    lowest = min(SWEEP_LRS, key=lambda lr: summaries[lr]["final_eval_loss"])
    assert analysis["best_lr"] == lowest
    status = {run["lr"]: run["status"] for run in analysis["runs"]}
    assert status[10.0] == "diverged", analysis
    assert analysis["first_divergent_lr"] == 10.0 and analysis["edge_ratio"] == pytest.approx(10.0 / lowest)
    report = (sweep_dir / "lr_sweep_analysis.md").read_text()
    assert "| 1.00e+01 |" in report and f"- best LR: {lowest:.2e}" in report, report

    # resume: only the run without summary.json trains again (from its final checkpoint)
    (sweep_dir / names[0] / "summary.json").unlink()
    again = sweep(config, sweep_dir)
    manifest = json.loads((sweep_dir / "sweep_manifest.json").read_text())
    assert [manifest["runs"][name]["launches"] for name in names] == [2, 1, 1]
    assert all(manifest["runs"][name]["status"] == "done" for name in names)
    assert f"{names[1]}: done (summary.json exists), skipped" in again.stdout
    assert "resumed from" in (sweep_dir / names[0] / "train.log").read_text()
    assert (sweep_dir / names[0] / "summary.json").is_file()
    print(f"sweep of {len(SWEEP_LRS)} runs and one resumed run: {time.perf_counter() - start:.0f} s")


@pytest.mark.parametrize(("stops", "by_guard"), [
    ([], None), (["requested"], None), (["guard.max_events"], "guard.max_events"),
    (["guard.eval_rise"], "guard.eval_rise"), (["guard.max_events", "requested"], None),
], ids=["none", "requested", "max-events", "eval-rise", "last-line-wins"])
def test_guard_stop_reads_the_last_stop_line(stops: list[str], by_guard: Optional[str]) -> None:
    """A run is stopped by the guard when its last ``kind: stop`` line has a ``guard.`` reason; a run stopped by
    request (``--stop-at-step``, a signal) or without a stop line is resumable."""
    lines = records(falling()) + [{"kind": "stop", "step": 30, "reason": reason} for reason in stops]
    assert guard_stop(lines) == by_guard


def test_a_run_the_guard_stopped_is_diverged_and_not_relaunched(data_dir: Path, tmp_path: Path) -> None:
    """Running a sweep again over a finished run and one whose last metrics line says the guard stopped it
    (``kind: stop``, ``guard.eval_rise``, no summary.json; its held-out loss within 10 % of its lowest, so only the
    stop line makes it diverged): neither trains again (0 launches); the stopped one is ``diverged`` in the manifest
    and the analysis, and the sweep exits 0 (a diverged run is a result of an LR sweep, not a run left to finish)."""
    config = tmp_path / "tiny-sweep.yaml"
    config.write_text(SWEEP_CONFIG_YAML.format(data_dir=data_dir))
    sweep_dir = tmp_path / "sweep"
    done, stopped = sweep_dir / run_name(1e-3), sweep_dir / run_name(1e-2)
    for run_dir, lines in ((done, records(falling(), eval_loss=4.1)),
                           (stopped, records(falling(), eval_loss=4.1)
                            + [{"kind": "eval", "step": 29, "tokens": 15360, "eval_loss": 4.3},
                               {"kind": "stop", "step": 30, "tokens": 15360, "reason": "guard.eval_rise"}])):
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (done / "summary.json").write_text(json.dumps({"final_eval_loss": 4.1}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--config", str(config), "--lrs",
                           "1e-3,1e-2", "--output-dir", str(sweep_dir)], cwd=REPO_ROOT, env=process_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"{run_name(1e-2)}: stopped by guard.eval_rise (diverged), not relaunched;" in proc.stdout, proc.stdout
    manifest = json.loads((sweep_dir / "sweep_manifest.json").read_text())
    assert [(manifest["runs"][run_name(lr)]["status"], manifest["runs"][run_name(lr)]["launches"])
            for lr in (1e-3, 1e-2)] == [("done", 0), ("diverged", 0)]
    analysis = json.loads((sweep_dir / "lr_sweep_analysis.json").read_text())
    assert {run["lr"]: run["status"] for run in analysis["runs"]} == {1e-3: "converged", 1e-2: "diverged"}
    assert not (stopped / "train.log").exists()  # no trainer started


def test_a_sweep_puts_its_runs_in_one_wandb_group_each_named_after_its_lr(data_dir: Path, tmp_path: Path) -> None:
    """Two LRs cut to 2 steps by --max-steps, with wandb offline: each trainer process gets the sweep's group (the
    directory's name) and a name with its LR, which the manifest records and the offline run files hold, with
    ``tokens`` as the step metric of every metric and in every logged row."""
    config = tmp_path / "tiny-sweep.yaml"
    config.write_text(SWEEP_CONFIG_YAML.format(data_dir=data_dir))
    sweep_dir = tmp_path / "lr-sweep"
    wandb_home = {f"WANDB_{name}_DIR": str(tmp_path / f"wandb-{name.lower()}") for name in ("CONFIG", "CACHE", "DATA")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--config", str(config), "--lrs",
                           "1e-3,1e-2", "--max-steps", "2", "--set", "run.wandb.enabled=true", "--output-dir",
                           str(sweep_dir)], cwd=REPO_ROOT, env=process_env(wandb_home), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    manifest = json.loads((sweep_dir / "sweep_manifest.json").read_text())
    assert manifest["sets"] == ["run.wandb.enabled=true", "run.max_steps=2"]
    for lr in (1e-3, 1e-2):
        name = run_name(lr)
        assert manifest["runs"][name]["overrides"][-2:] == ['run.wandb.group="lr-sweep"',
                                                             f'run.wandb.name="tiny-sweep-{name}"']
        rows = [json.loads(line) for line in (sweep_dir / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == [0, 1]  # cut at step 2
        (offline_run,) = (sweep_dir / name / "wandb").glob("offline-run-*")
        (run_file,) = offline_run.glob("run-*.wandb")
        records = read_wandb_run(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_group, run.display_name) == ("lr-sweep", f"tiny-sweep-{name}")
        metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
        assert [(m.glob_name, m.step_metric) for m in metrics if m.glob_name] == [("*", "tokens")]
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        # one row per step (wandb joins the evaluation after step 1 to that step's row), each with its tokens
        (evaluation,) = [r for r in rows if r["kind"] == "eval"]
        assert [row["tokens"] for row in history] == [r["tokens"] for r in rows if r["kind"] == "train"]
        assert history[-1]["eval/eval_loss"] == pytest.approx(evaluation["eval_loss"])
