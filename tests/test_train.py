"""Integration tests of ``train``: the real DeepSpeed engine in real processes, no mocks.

One small data directory (40 standard-library files, a 512-token BPE) is prepared once per session. Every run
trains the same tiny Llama (2 layers, d_model 64) through three stages; steps count from 0:

    stage  steps  seq_len  global batch  world 1: micro x accum  world 2: micro x accum x world
    0      0-4    32       8             2 x 4                   2 x 2 x 2
    1      5-9    64       4             2 x 2                   2 x 1 x 2
    2      10-14  128      2             1 x 2                   1 x 1 x 2

8 x 32 = 4 x 64 = 2 x 128 = 256 tokens per step, 3,840 in all. Checkpoints every 4 steps (4, 8, 12, 15), evaluation
every 5 (after steps 4, 9 and 14). Straight runs are shared through module-scoped fixtures: one process through the
CLI (``straight_w1``) and two through torchrun (``straight_w2``); resumed runs must end bit-identical to them.

Each process start costs 5-10 s (importing torch and DeepSpeed, building the engine); the first engine start on a
machine also JIT-builds DeepSpeed's shared-memory communication op (~40 s, cached in ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import pytest
from conftest import (PROCESS_TIMEOUT_S, REPO_ROOT, TINY_LLAMA_YAML, Run, assert_two_replicas, log_tail, process_env,
                      run_cli, run_process, run_together, train_args, two_ranks, write_wrapper)

from pipeline.environment import free_port
from pipeline.metrics import CSV_FIELDS

TOTAL_STEPS = 15
MAX_SEQ_LEN = 128
TOKENS_PER_STEP = 256
CHECKPOINT_EVERY = 4
STOP_STEP = 7  # inside stage 1 (steps 5-9): the resumed part crosses the boundary into stage 2 at step 10

CONFIG_YAML = """\
name: tiny-test
""" + TINY_LLAMA_YAML + """\
curriculum:
  base_lr: 3.0e-3
  lr_scaling: {{rule: none}}
  stages:
    # 8 x 32 = 4 x 64 = 2 x 128 = 256 tokens/step; grad_accum > 1 at world size 1 in every stage, at 2 in stage 0
    - {{until_step: 5, seq_len: 32, global_batch: 8, micro_batch: 2, warmup_steps: 2}}
    - {{until_step: 10, seq_len: 64, global_batch: 4, micro_batch: 2, warmup_steps: 1}}
    - {{until_step: 15, seq_len: 128, global_batch: 2, micro_batch: 1, warmup_steps: 1}}
run:
  seed: 1234
  eval_every: 5
  eval_batches: 1
  eval_batch: 2
  checkpoint_every: {checkpoint_every}
  tensorboard: true
"""

def cli_train(config: Path, run_dir: Path, *extra: str, env: Optional[Mapping[str, str]] = None) -> str:
    """One process: ``python -m pipeline.cli train`` (the ``curriculum-pretrain train`` console script)."""
    return run_process([sys.executable, "-m", "pipeline.cli", "train", *train_args(config, run_dir, *extra)], env)


def torchrun_train(config: Path, run_dir: Path, *extra: str) -> str:
    """Two processes on this machine through torchrun."""
    return run_process(two_ranks("torchrun", "-m", "pipeline.train", *train_args(config, run_dir, *extra)))


def train_with_world(world_size: int, config: Path, run_dir: Path, *extra: str) -> str:
    return cli_train(config, run_dir, *extra) if world_size == 1 else torchrun_train(config, run_dir, *extra)


def plan_steps(config: Path, world_size: int, *sets: str) -> list[dict[str, Any]]:
    """``plan --json --per-step``: the schedule's per-step values (step, seq_len, global_batch, lr, grad_clip)."""
    args = ["plan", "--config", str(config), "--world-size", str(world_size), "--json", "--per-step"]
    for assignment in sets:
        args += ["--set", assignment]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["steps"]


def logged_train_steps(metrics: Path) -> list[int]:
    """The train steps in a metrics.jsonl that a live run is appending to (a torn last line is skipped)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == "train":
            steps.append(record["step"])
    return steps


def latest_checkpoint(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def steps_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


def assert_each_step_once(run: Run) -> None:
    steps = [r["step"] for r in run.train_rows()]
    assert steps == list(range(TOTAL_STEPS)), f"train steps logged: {steps}"


def assert_same_training(resumed: Run, straight: Run) -> None:
    """Bit-identical: the same loss at every step, the same final parameters, every rank the same data."""
    assert resumed.losses() == straight.losses()
    assert resumed.replicas()["params_sha256"] == straight.replicas()["params_sha256"]
    assert resumed.replicas()["data_sha256"] == straight.replicas()["data_sha256"]


def assert_two_rank_run(run: Run, config: Path) -> None:
    """Two replicas with identical parameters after training on different data; the per-step schedule of the
    plan for world size 2; tokens per step = global_batch x seq_len, counted from the batches trained."""
    assert_two_replicas(run)
    rows = run.train_rows()
    assert_each_step_once(run)
    assert [r["seq_len"] for r in rows] == [s["seq_len"] for s in plan_steps(config, 2)]
    previous_tokens = 0
    for row in rows:
        assert row["tokens"] - previous_tokens == row["global_batch"] * row["seq_len"] == TOKENS_PER_STEP, row
        previous_tokens = row["tokens"]


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny-test.yaml"
    path.write_text(CONFIG_YAML.format(data_dir=data_dir, checkpoint_every=CHECKPOINT_EVERY))
    return path


@pytest.fixture(scope="module")
def straight_w1(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One process, start to end, with TensorBoard and offline wandb on (wandb's own directories kept in tmp)."""
    root = tmp_path_factory.mktemp("straight-w1")
    run_dir = root / "run"
    wandb_home = {f"WANDB_{name}_DIR": str(root / f"wandb-{name.lower()}") for name in ("CONFIG", "CACHE", "DATA")}
    output = cli_train(config, run_dir, "--set", "run.wandb.enabled=true", env=wandb_home)
    return Run(run_dir, output)


@pytest.fixture(scope="module")
def straight_w2(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Two processes through torchrun, start to end."""
    run_dir = tmp_path_factory.mktemp("straight-w2") / "run"
    return Run(run_dir, torchrun_train(config, run_dir))


@pytest.fixture(scope="module")
def stopped_w1(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One process stopped with ``--stop-at-step 7``; tests copy the directory before resuming it."""
    run_dir = tmp_path_factory.mktemp("stopped-w1") / "run"
    return Run(run_dir, cli_train(config, run_dir, "--stop-at-step", str(STOP_STEP)))


@pytest.fixture(scope="module")
def stopped_w1_zero2(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``stopped_w1`` under the ZeRO-2 template (the optimizer state partitioned by rank); tests copy it."""
    run_dir = tmp_path_factory.mktemp("stopped-w1-zero2") / "run"
    output = cli_train(config, run_dir, "--stop-at-step", str(STOP_STEP), "--set", "deepspeed.template=zero2")
    return Run(run_dir, output)


def straight_run(request: pytest.FixtureRequest, world_size: int) -> Run:
    return request.getfixturevalue(f"straight_w{world_size}")


def copy_run(run: Run, destination: Path) -> Run:
    shutil.copytree(run.dir, destination)
    return Run(destination)


# --------------------------------------------------------------------------------------------------- one process


def test_single_process_follows_the_plan_and_writes_every_output(straight_w1: Run, config: Path) -> None:
    """One process through three stages: every step's seq_len, LR, global batch and clip are the plan's; the loss
    falls; evaluation is at the longest stage's length; metrics.csv, TensorBoard and wandb (offline) got the same
    rows; the plot, summary and a ``final/`` model that transformers loads and runs exist."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = straight_w1
    rows = run.train_rows()
    plan = plan_steps(config, 1)
    assert_each_step_once(run)
    assert [r["seq_len"] for r in rows] == [s["seq_len"] for s in plan]
    assert [r["seq_len"] for r in rows] == [32] * 5 + [64] * 5 + [128] * 5
    for row, planned in zip(rows, plan):
        assert row["global_batch"] == planned["global_batch"], row
        assert row["lr"] == pytest.approx(planned["lr"], rel=1e-12), row
        assert row["grad_clip"] == pytest.approx(planned["grad_clip"], rel=1e-12), row
        assert row["tokens"] == (row["step"] + 1) * TOKENS_PER_STEP, row
    losses = run.losses()
    assert sum(losses[-3:]) / 3 < losses[0], f"loss did not fall: {losses}"

    evals = run.eval_rows()
    assert [r["step"] for r in evals] == [4, 9, 14]
    assert all(r["seq_len"] == MAX_SEQ_LEN for r in evals), evals

    with open(run.dir / "metrics.csv", newline="") as f:
        csv_rows = [row for row in csv.DictReader(f) if row["kind"] == "train"]
    assert len(csv_rows) == len(rows)
    for csv_row, row in zip(csv_rows, rows):  # csv writes str(value), "" for None and for fields a line lacks
        assert csv_row == {field: "" if row.get(field) is None else str(row[field]) for field in CSV_FIELDS}

    events = sorted((run.dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    accumulator = EventAccumulator(str(run.dir / "tensorboard"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(TOTAL_STEPS))
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)

    offline_runs = list((run.dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, f"wandb offline runs: {offline_runs}"
    assert list(offline_runs[0].glob("run-*.wandb")), "the offline run holds no .wandb file"
    wandb_log = (offline_runs[0] / "logs" / "debug-internal.log").read_text()
    assert '"level":"ERROR"' not in wandb_log, wandb_log

    assert (run.dir / "training.png").stat().st_size > 0
    summary = run.summary()
    assert summary["steps"] == TOTAL_STEPS and summary["tokens"] == TOTAL_STEPS * TOKENS_PER_STEP
    assert summary["replicas"]["params_identical"] is True and len(summary["replicas"]["params_sha256"]) == 1
    assert [s["seq_len"] for s in summary["stages"]] == [32, 64, 128]
    assert summary["peak_memory_gib"] is None  # GPU memory only; there is no GPU here

    model = AutoModelForCausalLM.from_pretrained(run.dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run.dir / "final")
    inputs = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")
    logits = model(input_ids=inputs["input_ids"]).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    assert model.config.vocab_size == 512 and model.config.num_hidden_layers == 2


def test_evaluations_every_n_tokens_follow_the_tokens_not_the_steps(config: Path, tmp_path: Path) -> None:
    """``run.eval_every_tokens=640`` (replacing the config's every 5 steps) with stage 0 cut to 4 x 32 = 128 tokens
    per step (then 256): the tokens trained reach or pass 640, 1,280, 1,920 and 2,560 at steps 4, 7, 9 and 12, where
    it evaluates; the run's final evaluation follows step 14. Every 5 steps would have been 4, 9 and 14."""
    run_dir = tmp_path / "run"
    run = Run(run_dir, cli_train(config, run_dir, "--set", "curriculum.stages.0.global_batch=4", "--set",
                                 "run.eval_every_tokens=640", "--set", "run.checkpoint_every=0", "--set",
                                 "run.export=false"))
    evals = run.eval_rows()
    assert [(r["step"], r["tokens"]) for r in evals] == [(4, 640), (7, 1408), (9, 1920), (12, 2688), (14, 3200)]


@pytest.mark.parametrize("dynamic, graphs", [
    ("false", ["2x32", "2x64", "1x128", f"2x{MAX_SEQ_LEN} (no grad)"]),
    ("auto", ["*x*", "1x*", f"2x{MAX_SEQ_LEN} (no grad)"]),  # *: a symbolic size; dynamo keeps a size of 1 static
])
def test_a_compiled_run_builds_each_graph_once_before_step_0(straight_w1: Run, config: Path, tmp_path: Path,
                                                             dynamic: str, graphs: list[str]) -> None:
    """``kernels.compile`` with a tracing-only backend (``eager``: the graphs dynamo captures run as they are) through
    three stages (2 x 32, 2 x 64, 1 x 128) with evaluations: the warm-up builds one graph per (micro-batch,
    seq_len), or with dynamic shapes one with both sizes symbolic and one for the stage of micro-batch 1, and one
    for evaluation; nothing is built (or given up) afterwards, and the run trains exactly as the uncompiled one."""
    run = Run(tmp_path / "run", cli_train(config, tmp_path / "run", "--set", "kernels.compile=true",
                                          "--set", "kernels.compile_backend=eager",
                                          "--set", f"kernels.dynamic_shapes={dynamic}"))
    compiles = [r for r in run.records() if r["kind"] == "compile"]
    assert len(compiles) == 1, compiles  # the warm-up's line, and no report of a later graph or fallback
    assert compiles[0]["graphs"] == graphs
    assert compiles[0]["warmup_s"] > 0 and compiles[0]["graph_breaks"] == 0
    assert "compile_caches" not in compiles[0]  # no Inductor behind the eager backend, so no cache to report
    assert f"compiled and warmed up {len(graphs)} graphs before step 0" in run.output
    assert "torch.compile:" not in run.output
    assert_each_step_once(run)
    assert run.losses() == straight_w1.losses()
    assert [r["eval_loss"] for r in run.eval_rows()] == [r["eval_loss"] for r in straight_w1.eval_rows()]


# --------------------------------------------------------------------------------------------------- two processes


@pytest.mark.multiprocess
def test_two_processes_through_the_deepspeed_launcher(config: Path, tmp_path: Path, straight_w2: Run) -> None:
    """``deepspeed --num_gpus 2 --module pipeline.train`` on CPU (the console script's entry point,
    ``deepspeed.launcher.runner``): identical replicas trained on different data, tokens per step = global batch x
    seq_len; each rank saw the same data as the same rank under torchrun."""
    run_dir = tmp_path / "run"
    output = run_process(two_ranks("deepspeed", "--module", "pipeline.train", *train_args(config, run_dir)))
    run = Run(run_dir, output)
    assert_two_rank_run(run, config)
    assert run.replicas()["data_sha256"] == straight_w2.replicas()["data_sha256"]


@pytest.mark.multiprocess
def test_two_processes_through_torchrun(straight_w2: Run, config: Path) -> None:
    """``torchrun --nproc_per_node 2 -m pipeline.train``: identical replicas trained on different data, tokens per
    step = global batch x seq_len, the plan's lengths for world size 2."""
    assert_two_rank_run(straight_w2, config)


@pytest.mark.multiprocess
def test_two_single_process_nodes_rendezvous_on_localhost(config: Path, tmp_path: Path, straight_w2: Run) -> None:
    """Two torchrun "nodes" of one process each (``--nnodes 2 --node_rank 0/1``) meeting at 127.0.0.1: both exit 0,
    the replicas are identical after training on different data, each rank saw torchrun's data for that rank."""
    run_dir, port = tmp_path / "run", free_port()
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                 "-m", "pipeline.train", *train_args(config, run_dir)] for node_rank in (0, 1)]
    nodes = run_together(commands, tmp_path)
    statuses, outputs = [node.status for node in nodes], [node.output for node in nodes]
    assert statuses == [0, 0], "\n\n".join(f"node {i} exit status {s}:\n{log_tail(o)}"
                                           for i, (s, o) in enumerate(zip(statuses, outputs)))
    run = Run(run_dir, outputs[0])
    assert_two_rank_run(run, config)
    assert run.replicas()["data_sha256"] == straight_w2.replicas()["data_sha256"]


# --------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_stop_and_resume_across_a_stage_boundary_is_exact(world_size: int, config: Path, tmp_path: Path,
                                                           request: pytest.FixtureRequest,
                                                           stopped_w1: Run) -> None:
    """``--stop-at-step 7`` then ``--resume auto`` (the resumed part enters stage 2 at step 10) ends bit-identical
    to the straight run: the same loss at every step (==), the same parameter hash and data fingerprint on every
    rank, and each step logged exactly once."""
    straight = straight_run(request, world_size)
    if world_size == 1:
        stopped = copy_run(stopped_w1, tmp_path / "run")
    else:
        stopped = Run(tmp_path / "run", torchrun_train(config, tmp_path / "run", "--stop-at-step", str(STOP_STEP)))
    assert latest_checkpoint(stopped.dir) == f"step{STOP_STEP:08d}"
    assert not (stopped.dir / "summary.json").exists()
    assert [r["step"] for r in stopped.train_rows()] == list(range(STOP_STEP))

    resumed = Run(stopped.dir, train_with_world(world_size, config, stopped.dir, "--resume", "auto"))
    assert f"at step {STOP_STEP} " in resumed.output and "resumed from" in resumed.output, log_tail(resumed.output)
    assert_each_step_once(resumed)
    assert_same_training(resumed, straight)
    assert resumed.replicas()["params_identical"] is True
    assert len(resumed.replicas()["params_sha256"]) == world_size


@pytest.mark.multiprocess
@pytest.mark.parametrize(("saved", "resumed", "template"), [(2, 1, "zero2"), (1, 2, "zero2"), (1, 2, "default")])
def test_a_checkpoint_resumes_on_another_world_size(saved: int, resumed: int, template: str, config: Path,
                                                    tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Stopped at step 7 on ``saved`` ranks, resumed on ``resumed``: under ZeRO-2 (the optimizer state partitioned
    by rank: rank 0 converts it once into ``universal/`` inside the checkpoint while the other rank waits) 2 ranks
    on 1 and 1 on 2, and under ZeRO-0 1 rank on 2. The resumed steps are the straight run's on the new world size to
    float rounding (the gradient sums run in another order): the same data order, schedule and tokens; the log says
    what changed."""
    run_dir = tmp_path / "run"
    template_set = ("--set", f"deepspeed.template={template}")
    if saved == 1:  # the module's stopped run of that template (default: the template left out)
        copy_run(request.getfixturevalue("stopped_w1_zero2" if template == "zero2" else "stopped_w1"), run_dir)
    else:
        train_with_world(saved, config, run_dir, "--stop-at-step", str(STOP_STEP), *template_set)
    checkpoint = run_dir / "checkpoints" / f"step{STOP_STEP:08d}"
    assert len(list(checkpoint.glob("rank*.pt"))) == saved
    run = Run(run_dir, train_with_world(resumed, config, run_dir, *template_set, "--set", "run.keep_checkpoints=9"))
    assert (f"the checkpoint was saved by {saved} rank{'s' if saved > 1 else ''}, resumed on {resumed}: same data "
            "order and schedule") in run.output, log_tail(run.output)
    assert (checkpoint / "universal").is_dir() == (template == "zero2")
    assert_each_step_once(run)
    straight = straight_run(request, resumed)
    assert run.losses() == pytest.approx(straight.losses(), rel=1e-5)
    assert [r["tokens"] for r in run.train_rows()] == [r["tokens"] for r in straight.train_rows()]
    assert [r["eval_loss"] for r in run.eval_rows()] == pytest.approx([r["eval_loss"] for r in straight.eval_rows()],
                                                                      rel=1e-5)
    assert run.replicas()["params_identical"] is True and len(run.replicas()["params_sha256"]) == resumed


@pytest.mark.multiprocess
def test_a_failed_conversion_for_another_world_size_ends_every_rank_with_the_error(config: Path, tmp_path: Path,
                                                                                    stopped_w1_zero2: Run) -> None:
    """A ZeRO-2 checkpoint of 1 rank whose optimizer file holds no optimizer state (a whole archive: one cut short
    is refused before any conversion), resumed on 2: rank 0's conversion fails, the other rank, waiting for it, reads
    the same error; both exit with it (none waits forever), and nothing half-made is left in the checkpoint."""
    import torch

    run_dir = copy_run(stopped_w1_zero2, tmp_path / "run").dir
    template_set = ("--set", "deepspeed.template=zero2")
    checkpoint = run_dir / "checkpoints" / f"step{STOP_STEP:08d}"
    (optimizer_file,) = checkpoint.glob("zero_pp_rank_0_*optim_states.pt")
    torch.save({}, optimizer_file)
    proc = subprocess.run(two_ranks("torchrun", "-m", "pipeline.train", *train_args(config, run_dir, *template_set)),
                          cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: --resume = ")]
    assert proc.returncode != 0 and len(errors) == 2, log_tail(proc.stdout + proc.stderr)
    assert "DeepSpeed's ds_to_universal could not convert it for another world size" in errors[0]
    assert errors[0] == errors[1]
    assert sorted(p.name for p in checkpoint.iterdir() if "universal" in p.name) == ["universal.error"]


@pytest.mark.multiprocess
def test_zero3_on_two_ranks_resumes_exactly_and_its_replica_report_gathers(config: Path, tmp_path: Path,
                                                                           straight_w2: Run) -> None:
    """ZeRO stage 3 with every parameter partitioned, 2 ranks through torchrun: the straight run has the ZeRO-0
    run's losses to float rounding; stopped at step 7 and resumed across the stage boundary it ends bit-identical
    to its own straight run; the replica report hashes the gathered parameters (the exported model's, not the empty
    placeholders a rank holds between steps); the checkpoint is refused on 1 rank with one line."""
    import torch
    from transformers import AutoModelForCausalLM

    zero3 = ("--set", "deepspeed.overrides.zero_optimization.stage=3",
             "--set", "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0")
    straight = Run(tmp_path / "straight", torchrun_train(config, tmp_path / "straight", *zero3))
    assert "ZeRO stage 3" in straight.output, log_tail(straight.output)
    assert straight.losses() == pytest.approx(straight_w2.losses(), rel=1e-5)

    stopped = tmp_path / "run"
    torchrun_train(config, stopped, "--stop-at-step", str(STOP_STEP), *zero3)
    refused = run_cli(["train", *train_args(config, stopped, *zero3)], env=process_env())
    assert refused.returncode == 2, log_tail(refused.stdout + refused.stderr)
    assert refused.stderr.splitlines()[-1] == (
        f"error: --resume = '{stopped}/checkpoints/step{STOP_STEP:08d}': a ZeRO-3 checkpoint resumes only on the "
        "world size that saved it (2; this run has 1): DeepSpeed's universal conversion does not bring its optimizer "
        "state back exactly; launch 2 ranks")

    resumed = Run(stopped, torchrun_train(config, stopped, *zero3))
    assert_each_step_once(resumed)
    assert_same_training(resumed, straight)
    exported = AutoModelForCausalLM.from_pretrained(resumed.dir / "final")
    weights = hashlib.sha256()
    for tensor in exported.state_dict().values():
        weights.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    assert resumed.replicas()["params_sha256"] == [weights.hexdigest()] * 2


def test_stopped_run_says_where_it_stopped(stopped_w1: Run) -> None:
    """``--stop-at-step 7`` exits 0 after saving a checkpoint named by the steps done, and says so, in the log and
    in a ``kind: stop`` line (what ``compare`` reads)."""
    assert f"stopped before step {STOP_STEP} of {TOTAL_STEPS}" in stopped_w1.output, log_tail(stopped_w1.output)
    assert latest_checkpoint(stopped_w1.dir) == f"step{STOP_STEP:08d}"
    assert stopped_w1.records()[-1] == {"kind": "stop", "step": STOP_STEP, "tokens": STOP_STEP * TOKENS_PER_STEP,
                                        "reason": "requested"}


def test_kill_9_during_training_then_resume_is_exact(config: Path, tmp_path: Path, straight_w1: Run) -> None:
    """SIGKILL to the process group once a step past the first checkpoint is logged; ``--resume auto`` restarts at
    the last complete checkpoint, logs each step exactly once and ends bit-identical to the straight run.

    The killed run goes through a wrapper that sleeps 0.25 s after each metrics line (no computation changes), so
    the poll below always catches the run mid-way instead of racing a 15-step run that takes under a second."""
    run_dir = tmp_path / "run"
    wrapper = write_wrapper(tmp_path / "slow_train.py", """\
        from pipeline.metrics import RunLogger

        _log = RunLogger.log


        def slow_log(self, record):
            _log(self, record)
            time.sleep(0.25)


        RunLogger.log = slow_log
        """)
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(wrapper), *train_args(config, run_dir)], cwd=REPO_ROOT,
                                env=process_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + PROCESS_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None:
                if max(logged_train_steps(run_dir / "metrics.jsonl"), default=-1) >= CHECKPOINT_EVERY:
                    break
                time.sleep(0.02)
            still_running = proc.poll() is None
            if still_running:
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert still_running, f"the run ended (status {proc.returncode}) before it was killed:\n" \
                          f"{log_tail(log_path.read_text())}"
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    checkpoint_step = steps_of(latest_checkpoint(run_dir))
    assert checkpoint_step >= CHECKPOINT_EVERY and checkpoint_step % CHECKPOINT_EVERY == 0
    logged = [r["step"] for r in Run(run_dir).train_rows()]
    assert max(logged) >= checkpoint_step, "no step after the checkpoint was logged before the kill"

    resumed = Run(run_dir, cli_train(config, run_dir, "--resume", "auto"))
    assert "resumed from" in resumed.output and f"at step {checkpoint_step} " in resumed.output, \
        log_tail(resumed.output)
    assert_each_step_once(resumed)
    assert_same_training(resumed, straight_w1)


def test_kill_9_during_a_checkpoint_save_keeps_the_previous_checkpoint(config: Path, tmp_path: Path,
                                                                        straight_w1: Run) -> None:
    """SIGKILL inside the second save, after DeepSpeed wrote ``step00000008.partial`` and before the rename:
    ``latest`` still names the first checkpoint and the partial directory is left behind. ``--resume auto``
    removes it, restarts at step 4 and ends bit-identical to the straight run."""
    run_dir = tmp_path / "run"
    wrapper = write_wrapper(tmp_path / "die_in_save.py", """\
        from pipeline.checkpoint import Checkpointer

        _commit = Checkpointer._commit
        commits = []


        def commit_or_die(self, partial, final, update_latest=True):
            if update_latest:  # periodic checkpoints only, not `best`
                commits.append(final)
            if len(commits) == 2 and update_latest:  # the second save: files written, the rename has not happened
                os.kill(os.getpid(), signal.SIGKILL)
            _commit(self, partial, final, update_latest)


        Checkpointer._commit = commit_or_die
        """)
    proc = subprocess.run([sys.executable, str(wrapper), *train_args(config, run_dir)], cwd=REPO_ROOT,
                          env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, f"exit status {proc.returncode}\n{log_tail(proc.stdout)}"
    checkpoints = run_dir / "checkpoints"
    first, second = f"step{CHECKPOINT_EVERY:08d}", f"step{2 * CHECKPOINT_EVERY:08d}"
    assert latest_checkpoint(run_dir) == first
    partial = checkpoints / f"{second}.partial"
    assert partial.is_dir() and (partial / "rank0.pt").is_file(), sorted(p.name for p in checkpoints.iterdir())
    assert not (checkpoints / second).exists()

    resumed = Run(run_dir, cli_train(config, run_dir, "--resume", "auto"))
    assert f"at step {CHECKPOINT_EVERY} " in resumed.output, log_tail(resumed.output)
    assert not list(checkpoints.glob("*.partial"))
    assert_each_step_once(resumed)
    assert_same_training(resumed, straight_w1)


def test_resume_with_a_changed_later_stage_lr_is_reported_and_used(config: Path, tmp_path: Path,
                                                                    stopped_w1: Run) -> None:
    """Resuming at step 7 with a new peak LR for stage 2 (which starts at step 10) logs the changed field, runs to
    the end, and trains stage 2 with the new plan's LR while the steps before the stop keep the old ones."""
    change = "curriculum.stages.2.lr=1.0e-3"
    run = copy_run(stopped_w1, tmp_path / "run")
    output = cli_train(config, run.dir, "--resume", "auto", "--set", change)
    assert "resuming with a changed hyperparameter: curriculum.stages.2.lr" in output, log_tail(output)
    assert (run.dir / "summary.json").is_file()
    assert_each_step_once(run)
    old_plan, new_plan = plan_steps(config, 1), plan_steps(config, 1, change)
    rows = run.train_rows()
    assert [r["lr"] for r in rows[:STOP_STEP]] == pytest.approx([s["lr"] for s in old_plan[:STOP_STEP]], rel=1e-12)
    assert [r["lr"] for r in rows[10:]] == pytest.approx([s["lr"] for s in new_plan[10:]], rel=1e-12)
    assert max(r["lr"] for r in rows[10:]) == pytest.approx(1.0e-3, rel=1e-12)


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "data.dir=/nonexistent"], "error: data.dir = '/nonexistent': does not exist"),
    (["--set", "data.dir={tmp}"], "error: data.dir = '{tmp}': has no manifest.json"),
    (["--stop-at-step", "0"], "error: --stop-at-step = 0: must be in 1 .. 15"),
    (["--resume", "/nonexistent"], "error: --resume = '/nonexistent': must be auto, none,"),
], ids=["data-dir-missing", "data-dir-without-manifest", "stop-at-step-0", "resume-missing-path"])
def test_train_errors_exit_2_with_one_line(args: list[str], expected: str, config: Path, tmp_path: Path) -> None:
    """Bad ``train`` input exits with status 2 and exactly one ``error:`` line on stderr, naming the field and the
    value, and no traceback."""
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    args = [arg.format(tmp=empty_dir) for arg in args]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *train_args(config, tmp_path / "run"),
                           *args], cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 2, f"exit status {proc.returncode}\n{log_tail(proc.stdout + proc.stderr)}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected.format(tmp=empty_dir)), proc.stderr
    assert "Traceback" not in proc.stderr
