"""lr-find: the ramp and its analysis as pure functions, the caps overlay, and one real range test on a tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curriculum.loading import load_config
from curriculum.schedule import build_schedule
from pipeline.lr_find import analyse, lengths_to_test, ramp_lr, smooth, steps_warnings, write_caps
from conftest import REPO_ROOT, TINY_LLAMA_YAML, make_config, process_env

TINY_YAML = """\
name: lr-find-test
""" + TINY_LLAMA_YAML + """\
curriculum:
  stages:
    - {{until_step: 4, seq_len: 32, global_batch: 8}}
    - {{until_step: 8, seq_len: 64, global_batch: 4}}
    - {{until_step: 12, seq_len: 64, global_batch: 4}}
run: {{tensorboard: false}}
"""


def test_ramp_runs_exponentially_from_min_to_max() -> None:
    """Step 0 is min_lr, the last step max_lr, the middle the geometric mean."""
    assert ramp_lr(0, 101, 1e-6, 1.0) == pytest.approx(1e-6)
    assert ramp_lr(100, 101, 1e-6, 1.0) == pytest.approx(1.0)
    assert ramp_lr(50, 101, 1e-6, 1.0) == pytest.approx(1e-3)  # sqrt(1e-6 * 1)


def test_smoothing_is_bias_corrected() -> None:
    """A constant loss smooths to itself from the first step (no pull towards zero)."""
    assert smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])


def test_analysis_finds_steepest_descent_and_divergence() -> None:
    """A loss that falls fastest around 3e-3 and blows up past 1: steepest near 3e-3, divergence past 1."""
    lrs = [ramp_lr(i, 100, 1e-5, 10.0) for i in range(100)]
    losses = [8 - 4 / (1 + math.exp(-3 * (math.log10(lr) + 2.5))) + max(0.0, 5 * math.log10(lr)) for lr in lrs]
    found = analyse(lrs, losses)
    assert 1e-3 < found["steepest_lr"] < 1e-2
    assert 1.0 < found["divergence_lr"] < 10.0


def test_a_stable_ramp_has_no_divergence_and_nan_is_divergence() -> None:
    """No rise of 30 % over the best: no divergence LR; a NaN loss diverges where it appears."""
    lrs = [ramp_lr(i, 20, 1e-5, 1e-2) for i in range(20)]
    falling = [8.0 - 0.1 * i for i in range(20)]
    assert analyse(lrs, falling)["divergence_lr"] is None
    assert analyse(lrs, falling[:10] + [math.nan] * 10)["divergence_lr"] == lrs[10]


# `lr-find --config tiny-cpu --steps 20` (LR 1e-6 -> 1), the raw losses of its seq_len 64 and 128 ramps. The smoothed
# loss crossed 1.3x its best only at the last step at 64 (divergence LR 1, cap 0.333) and never at 128.
TINY_CPU_20_STEPS = {
    64: [8.3487, 8.345, 8.3415, 8.3424, 8.3372, 8.3376, 8.3283, 8.3259, 8.2931, 8.2499, 8.2092, 8.092, 7.8892, 7.5152,
         6.8873, 6.8171, 14.4201, 10.007, 14.0879, 21.1811],
    128: [8.3419, 8.3524, 8.3505, 8.3452, 8.3314, 8.3278, 8.3277, 8.3217, 8.2903, 8.2501, 8.1233, 8.072, 7.9012, 7.589,
          6.95, 7.0669, 7.4268, 11.429, 16.9344, 13.8259],
}


@pytest.mark.parametrize(("seq_len", "step"), [(64, 16), (128, 17)])
def test_divergence_is_where_the_raw_loss_rises_and_a_short_ramp_judges_no_steepest_descent(seq_len: int,
                                                                                            step: int) -> None:
    """The 20-step ramps diverge where the raw loss first exceeds 1.3x its best so far: 14.4 after a best of 6.82 at
    LR 0.113 (step 16), 11.4 after a best of 6.95 at LR 0.234 (step 17). The 16 and 17 steps before are too few for
    the smoothed loss (22), so there is no steepest descent, and --steps 20 is a warning."""
    lrs = [ramp_lr(i, 20, 1e-6, 1.0) for i in range(20)]
    found = analyse(lrs, TINY_CPU_20_STEPS[seq_len])
    assert (found["divergence_step"], found["divergence_lr"]) == (step, lrs[step])
    assert found["steepest_lr"] is None
    assert found["not_judged"] == [f"steepest descent (too few steps: {step} < 22)"]
    assert steps_warnings(20) == ["--steps 20 is too few for the smoothing: the moving average of the loss (factor "
                                  "0.9) needs 22 steps to follow it, so no steepest descent is judged; give --steps "
                                  "22 or more (default 200)"]
    assert steps_warnings(22) == []


def test_a_ramp_that_diverges_in_its_first_steps_gets_no_cap(tmp_path: Path) -> None:
    """A NaN at step 3 of the ramp: divergence there, but no cap (the ramp started above every stable LR), and a
    message; a ramp that lasts 10 steps before diverging gets its cap."""
    lrs = [ramp_lr(i, 40, 1e-3, 10.0) for i in range(40)]
    early = analyse(lrs[:4], [6.0, 5.9, 5.9, math.nan])
    assert early["divergence_lr"] == lrs[3]
    assert "LR cap (too few steps: diverged at step 3 < 10; the ramp started too high, start it lower with " \
           "--min-lr)" in early["not_judged"]
    later = analyse(lrs[:11], [6.0 - 0.01 * i for i in range(10)] + [math.nan])
    assert later["divergence_step"] == 10 and not any(what.startswith("LR cap") for what in later["not_judged"])
    config = make_config({"stages": [{"until_step": 4, "seq_len": 32, "global_batch": 8},
                                     {"until_step": 8, "seq_len": 64, "global_batch": 4}]})
    caps = tmp_path / "lr_caps.yaml"
    count = write_caps(config, build_schedule(config), [{"seq_len": 32, **early}, {"seq_len": 64, **later}], caps)
    assert count == 1
    assert yaml.safe_load(caps.read_text()) == {"curriculum": {"stages": [{}, {"lr_max": float(f"{lrs[10] / 3:.3g}")}]}}


def test_one_ramp_per_distinct_sequence_length() -> None:
    """Two stages at 64 tokens share one test, run with the first of them."""
    schedule = build_schedule(make_config({"stages": [
        {"until_step": 4, "seq_len": 32, "global_batch": 8},
        {"until_step": 8, "seq_len": 64, "global_batch": 4},
        {"until_step": 12, "seq_len": 64, "global_batch": 2}]}))
    assert [(s.index, s.seq_len) for s in lengths_to_test(schedule)] == [(0, 32), (1, 64)]


def test_caps_overlay_is_accepted_by_train_config(tmp_path: Path, data_dir: Path) -> None:
    """lr_caps.yaml caps every stage at a third of its length's divergence LR, and loading the recipe with it
    as an overlay gives those peak LRs (a length that never diverged gets no cap)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_YAML.format(data_dir=data_dir))
    config = load_config(str(recipe), environ={})
    schedule = build_schedule(config)
    caps = tmp_path / "lr_caps.yaml"
    count = write_caps(config, schedule, [{"seq_len": 32, "divergence_lr": 3e-5}, {"seq_len": 64,
                                                                                   "divergence_lr": None}], caps)
    assert count == 1
    assert yaml.safe_load(caps.read_text()) == {"curriculum": {"stages": [{"lr_max": 1e-5}, {}, {}]}}
    capped = build_schedule(load_config(str(recipe), environ={}, overlays=[str(caps)]))
    assert capped.stages[0].peak_lr == pytest.approx(1e-5)
    assert [s.peak_lr for s in capped.stages[1:]] == [s.peak_lr for s in schedule.stages[1:]]


def test_range_test_on_a_tiny_model_finds_a_divergence_point(tmp_path: Path, data_dir: Path) -> None:
    """The real command on the real engine: a 40-step ramp to LR 30 diverges at every length, writes the JSON,
    plot and caps, and the caps sit below the divergence LRs."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_YAML.format(data_dir=data_dir))
    out = tmp_path / "lr-find"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "lr-find", "--config", str(recipe), "--steps", "40",
                           "--min-lr", "1e-4", "--max-lr", "30", "--output-dir", str(out)],
                          cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "lr_find.json").read_text())
    assert [r["seq_len"] for r in report["lengths"]] == [32, 64]
    for length in report["lengths"]:
        assert length["divergence_lr"] is not None, length
        assert length["steepest_lr"] < length["divergence_lr"]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = yaml.safe_load((out / "lr_caps.yaml").read_text())["curriculum"]["stages"]
    divergence = {r["seq_len"]: r["divergence_lr"] for r in report["lengths"]}
    assert [s["lr_max"] for s in stages] == pytest.approx(
        [divergence[32] / 3, divergence[64] / 3, divergence[64] / 3], rel=1e-2)


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    """--steps below 10 and an inverted LR range are rejected before anything starts."""
    for extra, field in ((["--steps", "3"], "--steps"), (["--min-lr", "1", "--max-lr", "0.1"], "--min-lr")):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "lr-find", "--config", "tiny-cpu", *extra],
                              cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"error: {field}") and "Traceback" not in proc.stderr
