"""One definition of a spike (``pipeline.spikes``) for the guard, ``diagnose`` and ``sweep``: the cases a ratio to the
running mean misses are caught by all three, and normal runs of the shipped recipes raise no alarm."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import REPO_ROOT, run_cli

from curriculum.config import GuardConfig
from pipeline.diagnose import find_spikes
from pipeline.guard import SpikeGuard
from pipeline.spikes import SpikeRule, find_spike_steps, robust_centre_and_spread
from pipeline.sweep import spike_steps

ROBUST, RATIO = SpikeRule(), SpikeRule("ratio")

# A 10x LR event on the tiny test model (2 layers, d_model 64; stages of 7 steps at 32/64/128 tokens): `train` of
# the test config with `curriculum.lr_events=[{at_step: 10, multiply: 10}]`, `run.seed=1` and the guard off, on 60
# standard-library files. (stage, loss, grad_norm) per step; at step 15, the second step of stage 2, the loss goes
# 5.38 -> 7.65 and the gradient norm 0.7 -> 18.
TEN_X_LR_EVENT = [(0, 6.258, 1.039), (0, 6.225, 1.064), (0, 6.165, 1.155), (0, 6.114, 1.269), (0, 6.009, 0.972),
                  (0, 5.925, 0.839), (0, 5.892, 0.905), (1, 5.98, 2.621), (1, 5.729, 0.931), (1, 5.689, 0.888),
                  (1, 5.559, 1.02), (1, 5.419, 0.672), (1, 5.541, 0.804), (1, 5.474, 0.869), (2, 5.381, 0.705),
                  (2, 7.652, 18.03), (2, 5.752, 0.862), (2, 5.708, 0.912), (2, 5.65, 0.732), (2, 5.574, 0.859),
                  (2, 5.492, 0.957)]


def lines(losses: list[float], grad_norms: Optional[list[float]] = None, stages: Optional[list[int]] = None
          ) -> list[dict[str, Any]]:
    """Train lines as the loop logs them (the fields the detectors read)."""
    norms = grad_norms or [1.0] * len(losses)
    return [{"kind": "train", "step": step, "stage": (stages or [0] * len(losses))[step], "seq_len": 64,
             "loss": loss, "grad_norm": norm, "grad_clip": 1.0, "tok_per_s": 1000.0, "tokens": 64 * (step + 1),
             "lr": 1e-3, "global_batch": 1}
            for step, (loss, norm) in enumerate(zip(losses, norms))]


def noisy(level: float, steps: int, noise: float = 0.05, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.uniform(-noise, noise) for _ in range(steps)]


def guard_flags(rows: list[dict[str, Any]], config: GuardConfig = GuardConfig()) -> dict[int, str]:
    """Replay lines through the guard as the loop does (checked before the update, accepted when clean)."""
    guard = SpikeGuard(config)
    flagged = {}
    for row in rows:
        verdict = guard.before_update(row["step"], row["stage"], row["loss"], row["grad_norm"])
        if verdict.spike is not None:
            flagged[row["step"]] = verdict.spike.reason
    return flagged


def diagnose_flags(rows: list[dict[str, Any]], rule: SpikeRule = ROBUST) -> list[int]:
    return [step for f in find_spikes(rows, rule) for step in range(f.first_step, f.last_step + 1)]


# --------------------------------------------------------------------------------------------------- the definition


def test_the_spread_is_the_mad_scaled_and_floored() -> None:
    """1.4826 x the median absolute deviation, at least 1 % of the median."""
    assert robust_centre_and_spread([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, pytest.approx(1.4826))
    assert robust_centre_and_spread([5.0] * 10) == (5.0, pytest.approx(0.05))


def test_the_robust_rule_waits_for_ten_values_or_a_shorter_window() -> None:
    detector_rows = lines(noisy(3.0, 9) + [9.0])
    assert find_spike_steps(detector_rows, ROBUST) == {}  # 9 values of history: not judged yet
    assert list(find_spike_steps(detector_rows, SpikeRule(window=4))) == [9]


def test_a_lasting_gradient_norm_is_a_new_level_after_three_flags() -> None:
    """A gradient norm that moves from 1 to 30 for good is flagged 4 times (steps 20-23); the 4th norm spike in a row
    restarts the norm history (``new_level_after`` 3), and the new level is judged against itself from then on. A
    norm spike between clean steps does not count towards it, and a loss that stays high is flagged at every step."""
    norms = [1.0] * 20 + [30.0] * 30
    rows = [{**row, "grad_norm": norm} for row, norm in zip(lines(noisy(3.0, 50)), norms)]
    assert list(find_spike_steps(rows, ROBUST)) == [20, 21, 22, 23]
    bumps = [1.0] * 20 + [30.0, 1.0] * 4 + [1.0] * 10
    rows = [{**row, "grad_norm": norm} for row, norm in zip(lines(noisy(3.0, 38)), bumps)]
    assert list(find_spike_steps(rows, ROBUST)) == [20, 22, 24, 26]
    assert list(find_spike_steps(lines(noisy(3.0, 20) + noisy(6.0, 30)), ROBUST)) == list(range(20, 50))


# --------------------------------------------------------------------------------------------------- what ratio missed


def test_a_jump_from_3_to_5_5_is_a_spike() -> None:
    """1.83x the running mean passes the ratio rule's 2x bar; it is about 100 spreads above the median."""
    rows = lines(noisy(3.0, 30) + [5.5] + noisy(3.0, 5, seed=1))
    assert guard_flags(rows) == {30: "loss_spike"}
    assert diagnose_flags(rows) == [30] and list(spike_steps(rows)) == [30]
    assert guard_flags(rows, GuardConfig(method="ratio")) == {} and diagnose_flags(rows, RATIO) == []


def test_a_loss_jump_with_a_gradient_blow_up_is_found_by_diagnose(tmp_path: Path) -> None:
    """A metrics file whose loss jumps 3.9 -> 7.4 at one step while the gradient norm goes 1 -> 21: `diagnose`
    reports a loss spike there and exits 1 (its earlier rule, a loss ratio alone, found no problem: 1.9x passes 2x;
    `--spike-rule ratio` now has the guard's gradient-norm check too, and finds the step by its norm only)."""
    losses = noisy(3.9, 40) + [7.4] + noisy(3.9, 9, seed=2)
    norms = noisy(1.0, 40, noise=0.1) + [21.0] + noisy(1.0, 9, noise=0.1, seed=3)
    rows = lines(losses, norms)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    found = run_cli(["diagnose", str(tmp_path), "--json"])
    assert found.returncode == 1, found.stderr
    spikes = [f for f in json.loads(found.stdout)["findings"] if f["kind"] == "spike"]
    assert [tuple(f["steps"]) for f in spikes] == [(40, 40)]
    assert "loss 7.4 at step 40" in spikes[0]["message"] and "robust spreads" in spikes[0]["message"]
    assert guard_flags(rows) == {40: "loss_spike"}
    ratio = run_cli(["diagnose", str(tmp_path), "--json", "--spike-rule", "ratio"])
    (by_norm,) = [f for f in json.loads(ratio.stdout)["findings"] if f["kind"] == "spike"]
    assert by_norm["steps"] == [40, 40] and by_norm["message"].startswith("grad_norm 21 at step 40")


def test_a_10x_lr_event_on_the_tiny_model_is_caught_by_its_gradient_norm() -> None:
    """The 10x LR event above: the loss history of stage 2 holds one step when it hits, so the loss cannot be
    judged, but the gradient norm history spans stages (18 against a median of 0.9); the ratio rule, whose
    histories restart at the stage switch, sees nothing. Guard and diagnose agree."""
    rows = lines([loss for _, loss, _ in TEN_X_LR_EVENT], [norm for _, _, norm in TEN_X_LR_EVENT],
                 [stage for stage, _, _ in TEN_X_LR_EVENT])
    assert guard_flags(rows) == {15: "grad_norm_spike"}
    assert diagnose_flags(rows) == [15] and list(spike_steps(rows)) == [15]
    assert guard_flags(rows, GuardConfig(method="ratio")) == {} and diagnose_flags(rows, RATIO) == []


def test_an_early_norm_jump_of_gpt2_124m_is_a_new_level_not_a_stop() -> None:
    """The first 20 steps of a GPT-2 124M run on an H200 (the GPU study's `length` on Python code, docs/RESULTS.md):
    the gradient norm went from about 1-2 to 27-86 at step 16 and stayed there. The guard used to skip every step
    from 16 on (the weights could not move) until max_events stopped the run at step 34; now 16-18 are skipped and
    step 19, the 4th norm spike in a row, is applied at half the LR as a new level."""
    rows = recorded(REPO_ROOT / "tests/data/gpt2-124m-norm-jump.train.jsonl")
    guard = SpikeGuard(GuardConfig())
    verdicts = {row["step"]: guard.before_update(row["step"], row["stage"], row["loss"], row["grad_norm"])
                for row in rows}
    flagged = {step: (v.spike.reason, v.action, v.new_level) for step, v in verdicts.items() if v.spike is not None}
    assert flagged == {16: ("grad_norm_spike", "skip", False), 17: ("grad_norm_spike", "skip", False),
                       18: ("grad_norm_spike", "skip", False), 19: ("grad_norm_spike", "scale_lr", True)}
    assert guard.lr_factor(19) == 0.5 and not guard.exhausted


# --------------------------------------------------------------------------------------------------- no false alarms


def recorded(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{**row, "kind": "train"} for row in rows if row.get("kind", "train") == "train"]


@pytest.mark.parametrize("path", [
    "tests/data/tiny-cpu.train.jsonl",  # `curriculum-pretrain train --config tiny-cpu` on a 2-core CPU, 200 steps
    "bench/h200/gpt2-124m-curriculum-train.metrics.jsonl",  # the shortened gpt2-124m-curriculum on an H200
], ids=["tiny-cpu", "gpt2-124m-curriculum"])
def test_normal_runs_of_the_shipped_recipes_raise_no_alarm(path: str) -> None:
    """Their worst step is under 4 spreads (3.3 and 1.7) and 3x the recent gradient norm (2.3x and 1.9x):
    neither the guard nor diagnose flags anything."""
    rows = recorded(REPO_ROOT / path)
    assert guard_flags(rows) == {} and diagnose_flags(rows) == [] and list(spike_steps(rows)) == []
