"""The spike guard: ``SpikeGuard`` on its own (fast), then through the real trainer with injected faults.

Integration runs train the tiny Llama of ``test_train.py`` (2 layers, d_model 64) through three stages of 7 steps;
steps count from 0:

    stage  steps   seq_len  global batch  micro x accum  finite spikes flagged at (window 4)
    0      0-6     32       8             4 x 2          4-6
    1      7-13    64       4             2 x 2          11-13
    2      14-20   128      2             1 x 2          18-20

A non-finite loss is flagged at any step. 8 x 32 = 4 x 64 = 2 x 128 = 256 tokens per step. Checkpoints every 4
steps (4, 8, 12, 16, 20 and the end, 21).

Faults are injected by a wrapper script around ``pipeline.train.main()``: it multiplies the training loss of chosen
steps by a factor (NaN for a non-finite loss, 10 for a finite spike), on the first pass over those steps only (a
step replayed after a rollback trains cleanly). Evaluation runs under ``no_grad`` and is never touched.

An LR event has to be large to upset this model. With the default thresholds (``loss_factor`` 2,
``grad_norm_factor`` 10) and ``at_step: 10``: at 10x the loss keeps falling (step 11: loss 0.95x its running
average, gradient norm 1.5x); 20x-100x trip the guard on one to three of four seeds (1, 2, 3, 1234), 150x on three,
200x on all four (step 11: loss 2.6-3.2x its running average). The tests use 300x: 4.1-5.2x, twice ``loss_factor``,
on all four seeds.

Each training process costs 5-10 s (importing torch and DeepSpeed); eleven of them run here, shared through
module-scoped fixtures.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pytest
import torch
from conftest import REPO_ROOT, TINY_LLAMA_YAML, process_env

from curriculum.config import GuardConfig
from curriculum.loading import load_config
from curriculum.schedule import Schedule, build_schedule
from pipeline.guard import SpikeGuard

# --------------------------------------------------------------------------------------------------- unit tests


def make_guard(**fields: Any) -> SpikeGuard:
    """A guard with the ratio rule these unit tests were written for (the robust rule has tests/test_spikes.py)."""
    return SpikeGuard(GuardConfig(**{"window": 4, "method": "ratio", **fields}))


def fill(guard: SpikeGuard, stage: int, losses: list[float], grad_norm: Optional[float] = 1.0) -> None:
    """Accept ``losses`` as clean steps of ``stage`` (checked first, as the training loop does)."""
    for loss in losses:
        assert guard.check_loss(stage, loss) is None
        assert guard.check_grad_norm(stage, grad_norm) is None
        guard.accept(loss, grad_norm)


def test_nothing_finite_is_flagged_in_the_first_window_steps_of_a_stage() -> None:
    """Until ``window`` steps of the stage were accepted there is no running average to compare with: a loss 100x
    the previous ones, or a gradient norm 1000x, is not a spike yet."""
    guard = make_guard()
    fill(guard, 0, [1.0, 100.0, 1.0])
    assert guard.check_loss(0, 1000.0) is None
    assert guard.check_grad_norm(0, 1000.0) is None


def test_a_loss_above_loss_factor_times_the_running_mean_is_a_loss_spike() -> None:
    """Window 4 of losses 1, 2, 3, 4 (mean 2.5), loss_factor 2: 5.0 is not a spike (the bar is strict), 5.001 is."""
    guard = make_guard(loss_factor=2.0)
    fill(guard, 0, [1.0, 2.0, 3.0, 4.0])
    assert guard.check_loss(0, 5.0) is None
    spike = guard.check_loss(0, 5.001)
    assert spike is not None
    assert (spike.reason, spike.value, spike.running_average) == ("loss_spike", 5.001, 2.5)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_is_flagged_from_the_first_step(loss: float) -> None:
    """NaN and +-inf are ``non_finite_loss`` at once, even before the window is full (no running average yet)."""
    guard = make_guard()
    spike = guard.check_loss(0, loss)
    assert spike is not None and spike.reason == "non_finite_loss" and spike.running_average is None
    fill(guard, 0, [2.0, 2.0])
    spike = guard.check_loss(0, loss)
    assert spike is not None and spike.reason == "non_finite_loss" and spike.running_average == 2.0


def test_gradient_norm_spikes_and_non_finite_gradient_norms() -> None:
    """grad_norm_factor 10 over a window of norms averaging 1.0: 10.0 passes, 10.5 is a ``grad_norm_spike``; NaN
    and inf are ``non_finite_grad_norm`` even in a fresh stage; no norm (ZeRO, before the step) is never a spike."""
    guard = make_guard(grad_norm_factor=10.0)
    for value in (math.nan, math.inf):
        spike = guard.check_grad_norm(0, value)
        assert spike is not None and spike.reason == "non_finite_grad_norm"
    assert guard.check_grad_norm(0, None) is None
    fill(guard, 0, [3.0] * 4, grad_norm=1.0)
    assert guard.check_grad_norm(0, 10.0) is None
    spike = guard.check_grad_norm(0, 10.5)
    assert spike is not None and (spike.reason, spike.running_average) == ("grad_norm_spike", 1.0)
    assert guard.check_grad_norm(0, None) is None


def test_a_stage_switch_restarts_the_running_averages() -> None:
    """Stage 0 settles at loss 1.0; stage 1 (longer sequences) starts at 3.0, which is 3x stage 0's mean but not a
    spike: the averages restart, and detection resumes once stage 1 has its own window."""
    guard = make_guard(loss_factor=2.0)
    fill(guard, 0, [1.0] * 4)
    assert guard.check_loss(0, 3.0) is not None  # in stage 0 it would be
    fill(guard, 1, [3.0, 3.0, 3.0, 3.0])  # each of these passes, the window restarted at the switch
    assert guard.check_loss(1, 5.9) is None
    assert guard.check_loss(1, 6.1) is not None
    assert guard.check_loss(2, 100.0) is None  # any change of stage index restarts them


def test_only_accepted_steps_feed_the_running_averages() -> None:
    """A rejected spike does not raise the bar: after 1, 1, 1, 1 a rejected 5.0 leaves the mean at 1.0, so 2.5 is
    still a spike. Had 5.0 been accepted the mean would be 2.0 and 2.5 would pass."""
    guard = make_guard(loss_factor=2.0)
    fill(guard, 0, [1.0] * 4)
    assert guard.check_loss(0, 5.0) is not None  # rejected: the loop does not call accept()
    spike = guard.check_loss(0, 2.5)
    assert spike is not None and spike.running_average == 1.0

    accepting = make_guard(loss_factor=2.0)
    fill(accepting, 0, [1.0] * 4)
    accepting.accept(5.0, 1.0)
    assert accepting.check_loss(0, 2.5) is None


def test_scale_lr_compounds_and_ends_lr_scale_steps_after_the_last_event() -> None:
    """lr_scale 0.5, lr_scale_steps 3. An event at step 10 scales step 10 itself (its update is applied at the lower
    LR) and steps 11-13; a second at step 11 compounds to 0.25 and holds through step 14; step 15 is back at 1.0.
    ``skip`` and ``rollback`` events count but leave the LR alone."""
    guard = make_guard(lr_scale=0.5, lr_scale_steps=3)
    assert guard.lr_factor(9) == 1.0
    guard.record(10, "scale_lr")
    assert guard.lr_factor(10) == 0.5
    guard.record(11, "scale_lr")
    assert [guard.lr_factor(step) for step in range(11, 16)] == [0.25, 0.25, 0.25, 0.25, 1.0]
    assert guard.lr_factor(16) == 1.0

    other = make_guard(lr_scale=0.5, lr_scale_steps=3)
    other.record(10, "skip")
    other.record(11, "rollback")
    assert other.events == 2
    assert [other.lr_factor(step) for step in range(10, 13)] == [1.0, 1.0, 1.0]


def test_a_lasting_gradient_norm_is_a_new_level_after_three_skips() -> None:
    """Skipping leaves the weights where they are, so a lasting change of the gradient norm is flagged at every step.
    Under ``skip`` the first 3 norm spikes in a row are skipped; the 4th (``new_level_after`` 3) is applied at
    ``lr_scale`` x the LR (``scale_lr``) and restarts the norm history, so the steps after it, at the new level, are
    clean. A norm spike that passes (flagged, then a clean step) starts the count again, and loss spikes never make
    a new level: they are skipped until ``max_events``."""
    guard = make_guard(lr_scale=0.5, lr_scale_steps=5)
    fill(guard, 0, [1.0] * 4)
    verdicts = [guard.before_update(step, 0, 1.0, 30.0) for step in range(10, 14)]
    assert [(v.action, v.new_level, v.update_applies) for v in verdicts] == [
        ("skip", False, False)] * 3 + [("scale_lr", True, True)]
    assert guard.events == 4 and guard.lr_factor(13) == 0.5
    assert list(guard.detector.grad_norms) == [30.0] * 4  # a full window: the next norm is judged at once
    assert [guard.before_update(step, 0, 1.0, 30.0).action for step in range(14, 24)] == ["apply"] * 10
    assert guard.before_update(24, 0, 1.0, 5000.0).action == "skip"

    passing = make_guard()
    fill(passing, 0, [1.0] * 4)
    for start in (10, 20, 30):
        actions = [passing.before_update(start + k, 0, 1.0, norm).action for k, norm in enumerate([30.0] * 3 + [1.0])]
        assert actions == ["skip"] * 3 + ["apply"]

    rolling_back = make_guard(action="rollback")
    fill(rolling_back, 0, [1.0] * 4)
    verdicts = [rolling_back.before_update(step, 0, 1.0, 30.0) for step in range(10, 16)]
    assert {(v.action, v.new_level) for v in verdicts} == {("rollback", False)}  # the weights go back: no new level
    assert list(rolling_back.detector.grad_norms) == [1.0] * 4

    restored = make_guard()
    fill(restored, 0, [1.0] * 4)
    for step in range(10, 13):
        restored.before_update(step, 0, 1.0, 30.0)
    reloaded = make_guard()
    reloaded.load_state_dict(json.loads(json.dumps(restored.state_dict())))
    assert reloaded.detector.flagged_in_a_row == 3
    assert reloaded.before_update(13, 0, 1.0, 30.0).new_level  # the count came through the checkpoint

    diverging = make_guard(loss_factor=2.0, max_events=8)
    fill(diverging, 0, [1.0] * 4)
    verdicts = [diverging.before_update(step, 0, 3.0, 1.0) for step in range(10, 18)]
    assert {v.action for v in verdicts} == {"skip"} and not any(v.new_level for v in verdicts)
    assert verdicts[-1].stop


def test_exhausted_after_max_events() -> None:
    guard = make_guard(max_events=3)
    for step, action in enumerate(["skip", "scale_lr"]):
        guard.record(step, action)
        assert not guard.exhausted
    guard.record(2, "rollback")
    assert guard.events == 3 and guard.exhausted


def test_a_disabled_guard_flags_nothing() -> None:
    guard = make_guard(enabled=False)
    fill(guard, 0, [1.0] * 4)
    assert guard.check_loss(0, math.nan) is None
    assert guard.check_loss(0, 100.0) is None
    assert guard.check_grad_norm(0, math.inf) is None


@pytest.mark.parametrize(("fields", "eval_loss", "lowest", "rose"), [
    ({}, 4.0, math.inf, False),  # the first evaluation has nothing to rise above
    ({}, math.nan, math.inf, True),
    ({}, math.inf, 4.0, True),
    ({"eval_rise": 0.5}, 6.0, 4.0, False),  # exactly 50 % above the lowest: still allowed
    ({"eval_rise": 0.5}, 6.01, 4.0, True),
    ({}, 4.39, 4.0, False),
    ({}, 4.41, 4.0, True),
    ({"eval_rise": None}, 40.0, 4.0, False),
    ({"enabled": False}, math.nan, 4.0, False),
], ids=["first", "nan", "inf", "at-the-margin", "past-the-margin", "within-10%", "past-10%", "eval-rise-off",
        "guard-off"])
def test_a_held_out_loss_past_eval_rise_above_the_lowest_stops_the_run(fields: dict[str, Any], eval_loss: float,
                                                                       lowest: float, rose: bool) -> None:
    """``held_out_rose``: a held-out loss more than ``guard.eval_rise`` (10 %) above the lowest before it, or a
    non-finite one, stops the run (at exactly the margin it does not); never with the guard or ``eval_rise`` off."""
    assert make_guard(**fields).held_out_rose(eval_loss, lowest) is rose


def test_state_dict_round_trips_through_a_checkpoint() -> None:
    """The state goes into checkpoints (``torch.save``): a guard loaded from it holds the same state and takes the
    same decisions as the one that saved it, including the window and the LR factor in force."""
    guard = make_guard(loss_factor=2.0, lr_scale=0.5, lr_scale_steps=5)
    fill(guard, 1, [1.0, 2.0, 3.0, 4.0, 5.0], grad_norm=0.5)  # the window keeps the last four: mean 3.5
    guard.record(20, "scale_lr")
    state = guard.state_dict()
    assert state == {"stage": 1, "losses": [2.0, 3.0, 4.0, 5.0], "grad_norms": [0.5] * 4, "flagged_in_a_row": 0,
                     "events": 1, "lr_factor": 0.5, "scale_until": 26}

    restored = make_guard(loss_factor=2.0, lr_scale=0.5, lr_scale_steps=5)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.state_dict() == state
    assert restored.losses.maxlen == 4
    for candidate in (guard, restored):
        assert candidate.lr_factor(25) == 0.5
        assert candidate.check_loss(1, 7.0) is None
        assert candidate.check_loss(1, 7.01) is not None
        assert candidate.check_grad_norm(1, 5.01) is not None
        assert candidate.lr_factor(26) == 1.0


# --------------------------------------------------------------------------------------------------- integration

TOTAL_STEPS = 21
TOKENS_PER_STEP = 256
CHECKPOINT_EVERY = 4
EARLY_NAN_STEP = 2  # stage 0, before its window is full and before the first checkpoint (step 4)
NAN_STEP = 11  # stage 1, its window (steps 7-10) full; the last checkpoint before it is step 8
SPIKE_STEP = 18  # stage 2, its window (steps 14-17) full; the last checkpoint before it is step 16
SPIKE_FACTOR = 10.0
LR_EVENT_STEP = 10  # its update is applied at 300x; the guard sees the damage at step 11
LR_EVENT_MULTIPLY = 300.0
# a finite spike can be flagged at steps 11-13 and 18-20 only (windows of 4): skip / scale_lr log at most 6 events,
# so with max_events 7 they finish; a rollback replays the event and must stop at 7
LR_EVENT_MAX_EVENTS = 7
HALT_MAX_EVENTS = 3
PROCESS_TIMEOUT_S = 300  # one run is 5-15 s; the first engine start on a fresh machine adds a ~40 s JIT build
OVER_MAX_EVENTS_STATUS = 86  # the wrapper's own exit status when the guard logs more events than max_events

CONFIG_YAML = """\
name: guard-test
""" + TINY_LLAMA_YAML + """\
curriculum:
  base_lr: 3.0e-3
  lr_scaling: {{rule: none}}
  stages:
    # 8 x 32 = 4 x 64 = 2 x 128 = 256 tokens/step, two micro-batches per step in every stage
    - {{until_step: 7, seq_len: 32, global_batch: 8, micro_batch: 4, warmup_steps: 2}}
    - {{until_step: 14, seq_len: 64, global_batch: 4, micro_batch: 2, warmup_steps: 1}}
    - {{until_step: 21, seq_len: 128, global_batch: 2, micro_batch: 1, warmup_steps: 1}}
guard:
  window: 4
run:
  seed: 1234
  eval_every: 0
  eval_batches: 1
  eval_batch: 2
  checkpoint_every: {checkpoint_every}
  keep_checkpoints: 8  # keeps every periodic checkpoint of the run, so a test can read the one rolled back to
  tensorboard: false
  export: false
  keep_best: false
"""

WRAPPER = """\
import json
import os
import sys

import torch

from pipeline.batches import Prefetcher
from pipeline.kernels import CausalLMWithLoss
from pipeline.metrics import RunLogger

# step -> factor for the training loss of that step's micro-batches, first pass over the step only
PENDING = {{int(step): factor for step, factor in json.loads({inject!r}).items()}}
MAX_EVENTS = {max_events}
now = {{"factor": None, "guard_lines": 0}}

_get = Prefetcher.get
_forward = CausalLMWithLoss.forward
_log = RunLogger.log


def get(self, step, cursor):  # the loop takes each pass over a step's batches once, before training on them
    now["factor"] = PENDING.pop(step, None)
    return _get(self, step, cursor)


def forward(self, *args, **kwargs):  # the module's loss, whichever way it is computed, and so its gradient
    loss = _forward(self, *args, **kwargs)
    if now["factor"] is not None and torch.is_grad_enabled():  # training, not evaluation
        loss = loss * now["factor"]
    return loss


def log(self, record):  # a guard that never stops would loop forever: end the process instead
    _log(self, record)
    if record["kind"] == "guard":
        now["guard_lines"] += 1
        if now["guard_lines"] > MAX_EVENTS:
            print(f"test wrapper: guard event {{now['guard_lines']}} logged with guard.max_events = {{MAX_EVENTS}}",
                  flush=True)
            os._exit({status})


Prefetcher.get = get
CausalLMWithLoss.forward = forward
RunLogger.log = log

from pipeline.train import main

sys.exit(main())
"""


@dataclass
class Run:
    """A training run that ended (its exit status and output) and its directory."""

    dir: Path
    returncode: int
    output: str

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines()]

    def train_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == "train"]

    def guard_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == "guard"]

    def row(self, step: int) -> dict[str, Any]:
        (row,) = [r for r in self.train_rows() if r["step"] == step]
        return row

    def summary(self) -> dict[str, Any]:
        return json.loads((self.dir / "summary.json").read_text())

    def latest_checkpoint(self) -> str:
        return (self.dir / "checkpoints" / "latest").read_text().strip()

    def explain(self) -> str:
        return f"exit status {self.returncode}\n" + "\n".join(self.output.splitlines()[-40:])


def train(config: Path, run_dir: Path, *sets: str, inject: Optional[Mapping[int, float]] = None,
          max_events: int = GuardConfig().max_events, resume: str = "none") -> Run:
    """One training process through the fault-injecting wrapper; ``max_events`` must match the run's
    ``guard.max_events`` (the wrapper ends a run whose guard logs more events than that)."""
    wrapper = run_dir.parent / f"{run_dir.name}-wrapper.py"
    wrapper.write_text(WRAPPER.format(inject=json.dumps({str(k): v for k, v in (inject or {}).items()}),
                                      max_events=max_events, status=OVER_MAX_EVENTS_STATUS))
    args = ["--config", str(config), "--output-dir", str(run_dir), "--resume", resume]
    for assignment in sets:
        args += ["--set", assignment]
    proc = subprocess.run([sys.executable, str(wrapper), *args], cwd=REPO_ROOT, env=process_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=PROCESS_TIMEOUT_S)
    return Run(run_dir, proc.returncode, proc.stdout)


def checkpoint_params_sha256(checkpoint: Path) -> str:
    """The parameters stored in a checkpoint's files, hashed as the trainer hashes a live model (its state dict in
    order, each tensor's bytes)."""
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    params = hashlib.sha256()
    for tensor in module.values():
        params.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return params.hexdigest()


def assert_each_step_once(run: Run, steps: int = TOTAL_STEPS) -> None:
    """Every train step logged once, in order, with the tokens of the steps up to it (none counted twice)."""
    rows = run.train_rows()
    assert [r["step"] for r in rows] == list(range(steps)), run.explain()
    assert [r["tokens"] for r in rows] == [(r["step"] + 1) * TOKENS_PER_STEP for r in rows]


def assert_finished(run: Run) -> None:
    assert run.returncode == 0, run.explain()
    assert_each_step_once(run)
    summary = run.summary()
    assert summary["steps"] == TOTAL_STEPS
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["final_eval_loss"]), summary
    assert summary["guard_events"] == len(run.guard_rows())


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "guard-test.yaml"
    path.write_text(CONFIG_YAML.format(data_dir=data_dir, checkpoint_every=CHECKPOINT_EVERY))
    return path


@pytest.fixture(scope="module")
def schedule(config: Path) -> Schedule:
    """The plan the runs follow at world size 1 (expected LRs and samples per step)."""
    return build_schedule(load_config(str(config), environ={}), 1)


@pytest.fixture(scope="module")
def injected(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """``injected(action)``: a run with NaN losses at steps 2 and 11 and a 10x loss at step 18, one per action."""
    runs: dict[str, Run] = {}

    def get(action: str) -> Run:
        if action not in runs:
            run_dir = tmp_path_factory.mktemp(f"injected-{action}") / "run"
            runs[action] = train(config, run_dir, f"guard.action={action}",
                                 inject={EARLY_NAN_STEP: math.nan, NAN_STEP: math.nan, SPIKE_STEP: SPIKE_FACTOR})
        return runs[action]

    return get


@pytest.fixture(scope="module")
def lr_event(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """``lr_event(action)``: a run whose LR is multiplied by 300 from step 10 on, one per action, with the ratio
    rule, whose histories restart at every stage switch (the robust rule's gradient-norm history does not:
    ``test_the_robust_rule_keeps_flagging_a_broken_model_into_the_next_stage``)."""
    runs: dict[str, Run] = {}

    def get(action: str) -> Run:
        if action not in runs:
            run_dir = tmp_path_factory.mktemp(f"lr-event-{action}") / "run"
            runs[action] = train(config, run_dir, f"guard.action={action}", "guard.method=ratio",
                                 f"guard.max_events={LR_EVENT_MAX_EVENTS}",
                                 f"curriculum.lr_events=[{{at_step: {LR_EVENT_STEP}, "
                                 f"multiply: {LR_EVENT_MULTIPLY}}}]", max_events=LR_EVENT_MAX_EVENTS)
        return runs[action]

    return get


HALT_SETS = ("guard.action=skip", f"guard.max_events={HALT_MAX_EVENTS}",
             f"curriculum.lr_events=[{{at_step: {LR_EVENT_STEP}, multiply: {LR_EVENT_MULTIPLY}}}]")


@pytest.fixture(scope="module")
def halted(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The 300x LR event with ``skip`` and max_events 3: steps 11, 12 and 13 are flagged and the run stops."""
    return train(config, tmp_path_factory.mktemp("halted") / "run", *HALT_SETS, max_events=HALT_MAX_EVENTS)


@pytest.fixture(scope="module")
def resumed(halted: Run, tmp_path_factory: pytest.TempPathFactory, config: Path) -> Run:
    """A copy of the halted run, resumed as its message says: the LR lowered (the event removed), ``--resume auto``.
    The 300x update of step 10 is in every checkpoint after it (the guard can only see it one step later), so the
    resumed run still trips the guard for a few steps: max_events is raised to let it finish."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(halted.dir, run_dir)
    return train(config, run_dir, *HALT_SETS, "curriculum.lr_events=[]", "guard.max_events=20", resume="auto")


# --------------------------------------------------------------------------------------------------- injected faults

ACTIONS = ["skip", "scale_lr", "rollback"]


@pytest.mark.parametrize("action", ACTIONS)
def test_an_injected_nan_and_spike_trigger_the_action_and_the_run_finishes(action: str,
                                                                          injected: Callable[[str], Run]) -> None:
    """A NaN loss is ``non_finite_loss`` at step 2 (window not yet full) and at step 11, a 10x loss at step 18 is
    ``loss_spike``, each handled with the configured action (a rollback at step 2, before the first checkpoint, is a
    skip and says so); the run finishes every step with finite parameters (a NaN step is never applied, also under
    ``scale_lr``): every loss after step 11 and the final evaluation are finite."""
    run = injected(action)
    assert_finished(run)
    guards = run.guard_rows()
    early_action = "skip (no checkpoint to roll back to yet)" if action == "rollback" else action
    assert [(g["step"], g["reason"], g["action"], g["events"]) for g in guards] == [
        (EARLY_NAN_STEP, "non_finite_loss", early_action, 1), (NAN_STEP, "non_finite_loss", action, 2),
        (SPIKE_STEP, "loss_spike", action, 3)], guards
    early_event, nan_event, spike_event = guards
    # flagged with 2 of the window's 4 steps accepted: the mean of steps 0 and 1 is reported all the same
    assert early_event["running_average"] == pytest.approx((run.row(0)["loss"] + run.row(1)["loss"]) / 2, rel=1e-12)
    assert all(math.isnan(event[key]) for event in (early_event, nan_event) for key in ("loss", "value"))
    assert spike_event["value"] == spike_event["loss"] > 2.0 * spike_event["running_average"]
    assert spike_event["stage"] == 2 and spike_event["seq_len"] == 128
    assert all(math.isfinite(r["loss"]) for r in run.train_rows() if r["step"] > NAN_STEP), run.train_rows()
    assert f"{NAN_STEP}: non_finite_loss" in run.output and f"{SPIKE_STEP}: loss_spike" in run.output


def test_skip_keeps_the_planned_lr(injected: Callable[[str], Run], schedule: Schedule) -> None:
    run = injected("skip")
    assert [r["lr"] for r in run.train_rows()] == pytest.approx(
        [schedule.lr_at(step) for step in range(TOTAL_STEPS)], rel=1e-12)


def test_scale_lr_halves_the_lr_per_event_from_the_flagged_step_on(injected: Callable[[str], Run],
                                                                    schedule: Schedule) -> None:
    """lr_scale 0.5 held for lr_scale_steps (50, past the end), compounding: the plan's LR at steps 0-1, half of it
    from the NaN step 2, a quarter from the NaN step 11 (NaN updates are dropped all the same), an eighth from the
    spike step 18 (whose update is applied at that LR)."""
    run = injected("scale_lr")
    expected = [schedule.lr_at(step) * 0.5 ** sum(step >= flagged for flagged in (EARLY_NAN_STEP, NAN_STEP, SPIKE_STEP))
                for step in range(TOTAL_STEPS)]
    assert [r["lr"] for r in run.train_rows()] == pytest.approx(expected, rel=1e-12)


def test_rollback_restores_the_checkpoint_exactly(injected: Callable[[str], Run], schedule: Schedule) -> None:
    """Each rollback reloads the last checkpoint before its spike (step 8 for the NaN at 11, step 16 for the spike
    at 18): the parameters after the reload hash the same as the ones the checkpoint saved and as the ones in its
    files; the samples of the steps from the checkpoint through the spike are skipped (8-11: 4 x 4, 16-18: 3 x 2);
    the rolled-back steps are logged again, each step once with its token count, and both guard lines stay."""
    run = injected("rollback")
    assert_finished(run)
    rollbacks = [g for g in run.guard_rows() if "restored_step" in g]
    assert [g["step"] for g in rollbacks] == [NAN_STEP, SPIKE_STEP], run.guard_rows()
    for event, spike_step in zip(rollbacks, (NAN_STEP, SPIKE_STEP)):
        restored = spike_step // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        assert event["step"] == spike_step
        assert event["restored_from"] == f"step{restored:08d}" and event["restored_step"] == restored, event
        assert event["skipped_samples"] == sum(schedule.stage_at(step).samples_per_step
                                               for step in range(restored, spike_step + 1))
        assert event["params_sha256"] == event["checkpoint_params_sha256"], event
        assert event["params_sha256"] == checkpoint_params_sha256(run.dir / "checkpoints" / event["restored_from"])
    assert [g["skipped_samples"] for g in rollbacks] == [16, 6]


def test_a_disabled_guard_logs_no_event(config: Path, tmp_path: Path) -> None:
    """``guard.enabled: false``: the same 10x loss at step 18 is trained on and nothing is flagged."""
    run = train(config, tmp_path / "run", "guard.enabled=false", inject={SPIKE_STEP: SPIKE_FACTOR})
    assert_finished(run)
    assert run.guard_rows() == [] and run.summary()["guard_events"] == 0
    assert run.row(SPIKE_STEP)["loss"] > 5.0 * run.row(SPIKE_STEP - 1)["loss"], "the loss was not injected"
    assert "loss_spike" not in run.output


# --------------------------------------------------------------------------------------------------- LR events


@pytest.mark.parametrize("action", ["skip", "scale_lr"])
def test_a_300x_lr_event_triggers_the_action_and_the_run_finishes(action: str,
                                                                   lr_event: Callable[[str], Run]) -> None:
    """The 300x update of step 10 shows at step 11 as a ``loss_spike`` (4-5x the running average) handled with the
    configured action. At most 3 steps per stage can be flagged (11-13, 18-20), fewer than max_events 7: the run
    finishes."""
    run = lr_event(action)
    assert_finished(run)
    guards = run.guard_rows()
    assert guards and (guards[0]["step"], guards[0]["reason"]) == (LR_EVENT_STEP + 1, "loss_spike"), guards
    assert {g["action"] for g in guards} == {action}
    assert guards[0]["value"] > 2.0 * guards[0]["running_average"]
    assert [g["events"] for g in guards] == list(range(1, len(guards) + 1))
    assert len(guards) < LR_EVENT_MAX_EVENTS


def test_rollback_past_a_300x_lr_event_stops_after_max_events(lr_event: Callable[[str], Run]) -> None:
    """Rolling back to step 8 replays the 300x event at step 10, so step 11 spikes again on every replay: the run
    must stop with exit status 1 after max_events (7) events, not replay forever."""
    run = lr_event("rollback")
    guards = run.guard_rows()
    assert guards and guards[0]["restored_step"] == 8, run.explain()
    assert run.returncode == 1, run.explain()
    assert "spike events" in run.output
    # the last event stops the run instead of rolling back once more
    assert len(guards) == LR_EVENT_MAX_EVENTS, guards
    assert [g["action"] for g in guards] == ["rollback"] * (LR_EVENT_MAX_EVENTS - 1) + [
        "stop (guard.max_events reached)"], guards


# --------------------------------------------------------------------------------------------------- max_events


def test_the_guard_stops_the_run_after_max_events_with_a_checkpoint(halted: Run) -> None:
    """Three flagged steps with max_events 3: exit status 1, an error naming the events and the limit, no summary;
    the last good state (before the step that was not done) is the latest checkpoint and every step before it is
    logged once."""
    assert halted.returncode == 1, halted.explain()
    guards = halted.guard_rows()
    assert [g["events"] for g in guards] == [1, 2, 3] and {g["action"] for g in guards} == {"skip"}, guards
    assert guards[0]["step"] == LR_EVENT_STEP + 1
    stopped_at = guards[-1]["step"]
    assert f"error: stopped after {HALT_MAX_EVENTS} spike events (guard.max_events = {HALT_MAX_EVENTS})" \
           in halted.output, halted.explain()
    assert f"checkpointed at step {stopped_at}" in halted.output
    assert halted.latest_checkpoint() == f"step{stopped_at:08d}"
    assert_each_step_once(halted, steps=stopped_at)
    assert not (halted.dir / "summary.json").exists()
    assert halted.records()[-1] == {"kind": "stop", "step": stopped_at, "tokens": stopped_at * TOKENS_PER_STEP,
                                    "reason": "guard.max_events"}


def test_a_run_stopped_by_the_guard_resumes(halted: Run, resumed: Run) -> None:
    """``--resume auto`` with the LR event removed starts at the stopped step, reports the changed field and
    finishes, each step logged once; the line saying why the run had stopped is gone."""
    stopped_at = halted.guard_rows()[-1]["step"]
    assert resumed.returncode == 0, resumed.explain()
    assert "resumed from" in resumed.output and f"at step {stopped_at} " in resumed.output, resumed.explain()
    assert "resuming with a changed hyperparameter: curriculum.lr_events" in resumed.output
    assert_each_step_once(resumed)
    assert not [r for r in resumed.records() if r["kind"] == "stop"]
    assert math.isfinite(resumed.summary()["final_loss"])


def test_a_resumed_run_keeps_the_guard_line_that_stopped_it(halted: Run, resumed: Run) -> None:
    """Every event the guard counted (summary ``guard_events``, carried through the checkpoint) has its line in
    metrics.jsonl, the one that stopped the run included."""
    events = [g["events"] for g in resumed.guard_rows()]
    assert events == list(range(1, resumed.summary()["guard_events"] + 1)), events


EVAL_EVERY = 4  # evaluations after steps 3, 7 and 11: the 300x update of step 10 is between the last two


@pytest.fixture(scope="module")
def diverging(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The 300x LR event under the ratio rule, which lets the run train on (its loss history restarts at step 14),
    with evaluations every 4 steps: the held-out loss after step 11 is far above the lowest (after step 7)."""
    return train(config, tmp_path_factory.mktemp("diverging") / "run", "guard.method=ratio",
                 f"run.eval_every={EVAL_EVERY}",
                 f"curriculum.lr_events=[{{at_step: {LR_EVENT_STEP}, multiply: {LR_EVENT_MULTIPLY}}}]")


def test_a_run_whose_held_out_loss_rises_past_eval_rise_stops_with_a_checkpoint(diverging: Run) -> None:
    """The held-out loss after step 11 more than 10 % above the one after step 7: exit status 1 at that
    evaluation, with an error naming ``guard.eval_rise`` (and a ``kind: stop`` line naming it) and a checkpoint of
    the state it stopped at; no summary."""
    assert diverging.returncode == 1, diverging.explain()
    evals = [r for r in diverging.records() if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 7, 11]
    assert evals[2]["eval_loss"] > 1.1 * min(evals[0]["eval_loss"], evals[1]["eval_loss"]), evals
    assert "error: stopped at step 12: the eval loss rose more than 10% above its lowest or was not finite " \
           "(guard.eval_rise)" in diverging.output, diverging.explain()
    assert "checkpoints: step00000004, step00000008, step00000012" in diverging.output
    assert diverging.latest_checkpoint() == "step00000012"
    assert_each_step_once(diverging, steps=12)
    assert not (diverging.dir / "summary.json").exists()
    assert diverging.records()[-1] == {"kind": "stop", "step": 12, "tokens": 12 * TOKENS_PER_STEP,
                                       "reason": "guard.eval_rise"}


def test_a_run_stopped_by_eval_rise_resumes_from_a_checkpoint_before_the_rise(diverging: Run, config: Path,
                                                                             tmp_path: Path) -> None:
    """As the message says: resumed from the checkpoint of step 8 (before the event) with the LR event removed,
    the run finishes, each step logged once (the abandoned evaluation after step 11 and the stop line are gone)."""
    run_dir = tmp_path / "run"
    shutil.copytree(diverging.dir, run_dir)
    resumed = train(config, run_dir, "guard.method=ratio", f"run.eval_every={EVAL_EVERY}",
                    resume=str(run_dir / "checkpoints" / "step00000008"))
    assert resumed.returncode == 0, resumed.explain()
    assert_each_step_once(resumed)
    assert math.isfinite(resumed.summary()["final_eval_loss"])
    records = resumed.records()
    assert not [r for r in records if r["kind"] == "stop"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 7, 11, 15, 19, 20] and all(r["eval_loss"] < 7.0 for r in evals), evals


def test_the_robust_rule_keeps_flagging_a_broken_model_into_the_next_stage(config: Path, tmp_path: Path) -> None:
    """The 300x update of step 10 leaves the model broken (loss about 5x its level, gradient norm over 10x). The
    robust rule (the default) flags steps 11-13 by their loss, then, in stage 2 where the loss history restarts,
    by the gradient norm, whose history spans stages: ``skip`` cannot undo an update already applied, so the run
    stops at max_events instead of training on a wrecked model as the ratio rule lets it."""
    run = train(config, tmp_path / "run", "guard.action=skip", f"guard.max_events={LR_EVENT_MAX_EVENTS}",
                f"curriculum.lr_events=[{{at_step: {LR_EVENT_STEP}, multiply: {LR_EVENT_MULTIPLY}}}]",
                max_events=LR_EVENT_MAX_EVENTS)
    guards = run.guard_rows()
    assert run.returncode == 1, run.explain()
    assert [g["step"] for g in guards] == list(range(LR_EVENT_STEP + 1, LR_EVENT_STEP + 1 + LR_EVENT_MAX_EVENTS))
    assert {g["reason"] for g in guards if g["stage"] == 1} == {"loss_spike"}
    assert {g["reason"] for g in guards if g["stage"] == 2} == {"grad_norm_spike"}
    assert all(g["value"] > 10 * g["running_average"] for g in guards if g["stage"] == 2)
