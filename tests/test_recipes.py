"""Every shipped recipe parses and plans; the ``plan`` CLI's JSON and table (and ``--max-steps``), ``recipes`` and
``--version``; ``curriculum`` stays torch-free."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, run_cli

from curriculum.errors import ConfigError
from curriculum.loading import load_config, recipe_names, resolve_config_path
from curriculum.schedule import build_schedule
from pipeline.cli import commands, setup_arguments

RECIPES = recipe_names()

STAGE_KEYS = {"index", "start_step", "end_step", "seq_len", "global_batch", "tokens_per_step", "peak_lr", "rule_lr",
              "warmup_steps", "grad_clip"}
STEP_KEYS = {"step", "seq_len", "global_batch", "lr", "grad_clip"}


def test_the_shipped_recipes_are_listed() -> None:
    """recipe_names() finds the YAML files that ship in curriculum/recipes."""
    assert {"seed003", "tiny-cpu", "gpt2-124m-curriculum", "gpt2-124m-baseline", "gpt2-124m-seq-warmup",
            "gpt2-124m-seq-warmup-baseline", "gpt2-124m-seq-warmup-stable"} <= set(RECIPES)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_plans(name: str, world_size: int) -> None:
    """Each recipe validates and resolves on 1 and 2 ranks (every shipped global batch is even)."""
    config = load_config(name, environ={})
    schedule = build_schedule(config, world_size)
    assert schedule.total_steps > 0 and schedule.total_tokens > 0
    assert schedule.stages[0].start_step == 0
    for stage in schedule.stages:
        assert stage.micro_batch * stage.grad_accum * world_size == stage.global_batch
        assert stage.seq_len <= schedule.max_seq_len


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_by_name_and_by_path(name: str) -> None:
    """A recipe loads by its name and by the path of its YAML file, to the same config."""
    path = resources.files("curriculum.recipes") / f"{name}.yaml"
    assert resolve_config_path(name) == resolve_config_path(str(path))
    assert load_config(name, environ={}) == load_config(str(path), environ={})


def test_seed003_lrs() -> None:
    """seed003: peak LRs 11.3/7.0/3.5/1.5/0.7 x 6e-4; rule LRs 6e-4 * sqrt(b / 32) * min(2048 / L, 4)."""
    schedule = build_schedule(load_config("seed003", environ={}))
    assert [s.peak_lr for s in schedule.stages] == pytest.approx([m * 6e-4 for m in (11.3, 7.0, 3.5, 1.5, 0.7)],
                                                                 rel=1e-12)
    batches_and_lengths = [(256, 64), (128, 128), (64, 256), (32, 512), (16, 1024)]
    assert [(s.global_batch, s.seq_len) for s in schedule.stages] == batches_and_lengths
    assert [s.rule_lr for s in schedule.stages] == pytest.approx(
        [6e-4 * math.sqrt(b / 32) * min(2048 / length, 4) for b, length in batches_and_lengths], rel=1e-12)


# --------------------------------------------------------------------------------------------------- plan CLI


@pytest.mark.parametrize("world_size", ["1", "2"])
@pytest.mark.parametrize("name", RECIPES)
def test_plan_json_keys(name: str, world_size: str) -> None:
    """`plan --json` prints stages with the documented keys, total_steps and total_tokens."""
    result = run_cli(["plan", "--config", name, "--json", "--world-size", world_size])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {"stages", "total_steps", "total_tokens"} <= set(plan)
    assert plan["stages"] and all(STAGE_KEYS <= set(stage) for stage in plan["stages"])
    assert [stage["index"] for stage in plan["stages"]] == list(range(len(plan["stages"])))
    assert plan["stages"][-1]["end_step"] == plan["total_steps"]
    assert "steps" not in plan


def test_plan_json_per_step() -> None:
    """`--per-step` adds one entry per step 0 .. total - 1 with step, seq_len, global_batch, lr, grad_clip."""
    result = run_cli(["plan", "--config", "tiny-cpu", "--json", "--per-step"])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    steps = plan["steps"]
    assert [entry["step"] for entry in steps] == list(range(plan["total_steps"]))
    assert all(set(entry) == STEP_KEYS for entry in steps)
    # tiny-cpu: 64 tokens for steps 0-59, 128 for 60-119, 256 for 120-199
    assert (steps[0]["seq_len"], steps[59]["seq_len"], steps[60]["seq_len"], steps[199]["seq_len"]) == (64, 64, 128,
                                                                                                        256)
    # step 0: sqrt rule 2e-3 * sqrt(32 / 32) = 2e-3, warmup 20: 2e-3 / 20 = 1e-4
    assert steps[0]["lr"] == pytest.approx(1e-4, rel=1e-12)


def test_plan_table_shows_both_lr_columns() -> None:
    """The seed003 table has a peak LR and a rule LR column, a row per stage and the totals line."""
    result = run_cli(["plan", "--config", "seed003"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("stage"))
    assert "peak LR" in header and "rule LR" in header
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == 5
    # stage 0: peak 6.78e-3 (set as a multiple of base_lr), rule 6e-4 * sqrt(8) * 4 = 6.79e-3
    assert "6.78e-03 (x)" in rows[0] and "6.79e-03" in rows[0]
    # stage 4: peak 0.7 x 6e-4 = 4.2e-4, rule 6e-4 * sqrt(0.5) * 2 = 8.49e-4
    assert "4.20e-04 (x)" in rows[4] and "8.49e-04" in rows[4]
    # * marks peak / rule outside [0.5, 2]: 6.78/6.79 = 1.0, 4.2/4.8 = 0.88, 2.1/3.39 = 0.62, 0.9/2.4 = 0.38,
    # 0.42/0.849 = 0.495
    assert ["e-04 *" in row or "e-03 *" in row for row in rows] == [False, False, False, True, True]
    assert "total: 10,000 steps, 163,840,000 tokens" in result.stdout


def test_plan_table_stars_a_hand_set_lr_far_from_the_rule() -> None:
    """A hand-set LR more than 2x from the rule is starred: 1e-2 vs 6e-4 * sqrt(256/32) * 4 = 6.79e-3 is not,
    1.5e-2 is (1.5e-2 / 6.79e-3 = 2.2)."""
    within = run_cli(["plan", "--config", "seed003", "--set", "curriculum.stages.0.lr_mult=null",
                      "--set", "curriculum.stages.0.lr=1e-2"])
    beyond = run_cli(["plan", "--config", "seed003", "--set", "curriculum.stages.0.lr_mult=null",
                      "--set", "curriculum.stages.0.lr=1.5e-2"])
    row = [line for line in within.stdout.splitlines() if line.startswith("0 ")][0]
    assert "6.79e-03 *" not in row
    row = [line for line in beyond.stdout.splitlines() if line.startswith("0 ")][0]
    assert "6.79e-03 *" in row


# --------------------------------------------------------------------------------------------------- ds-config


def test_ds_config_for_a_recipe() -> None:
    """`ds-config` fills batch, micro-batch, accumulation and clip from the first stage; bf16 per run.precision."""
    result = run_cli(["ds-config", "--config", "seed003", "--world-size", "2"])
    assert result.returncode == 0, result.stderr
    ds = json.loads(result.stdout)
    # stage 0: 256 sequences = 128 micro x 1 accum x 2 ranks, clip 5.0
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"]) == (256, 128, 1, 5.0)
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize(("precision", "flag", "enabled", "autocast"), [
    ("auto", [], False, False), ("auto", ["--bf16"], False, True), ("fp32", ["--bf16"], False, False),
    ("bf16", [], True, False), ("bf16-autocast", [], False, True),
])
def test_ds_config_bf16_follows_run_precision(precision: str, flag: list[str], enabled: bool, autocast: bool) -> None:
    """--bf16 decides only run.precision auto (as on a bf16-capable GPU: fp32 weights under bf16 autocast);
    fp32, bf16 (DeepSpeed's bf16 weights) and bf16-autocast are what the config says."""
    result = run_cli(["ds-config", "--config", "tiny-cpu", "--set", f"run.precision={precision}", *flag])
    assert result.returncode == 0, result.stderr
    ds = json.loads(result.stdout)
    assert ds["bf16"] == {"enabled": enabled}
    assert ds.get("torch_autocast") == ({"enabled": True, "dtype": "bfloat16"} if autocast else None)


@pytest.mark.parametrize(("settings", "timers"), [
    ([], {"throughput": {"enabled": False}}),
    (["deepspeed.overrides.timers.throughput.enabled=true"], {"throughput": {"enabled": True}}),
    (["deepspeed.overrides.timers.throughput.synchronized=false"], {"throughput": {"synchronized": False}}),
])
def test_deepspeeds_throughput_timer_is_off_unless_set_up(settings: list[str], timers: dict) -> None:
    """The timer synchronises the device at every micro-batch: off by default; a user who sets it up (on, or
    timed without synchronising) gets what they wrote."""
    result = run_cli(["ds-config", "--config", "tiny-cpu", *(arg for s in settings for arg in ("--set", s))])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timers"] == timers


# --------------------------------------------------------------------------------------------------- no torch


@pytest.mark.parametrize("module", ["curriculum", "curriculum.schedule", "curriculum.loading", "curriculum.plan",
                                    "curriculum.config"])
def test_curriculum_does_not_import_torch(module: str) -> None:
    """The curriculum package (and the plan command's imports) load without torch."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_plan_command_does_not_import_torch() -> None:
    """`plan` runs without importing torch (subcommand modules load lazily)."""
    code = ("import sys; from pipeline.cli import main; rc = main(['plan', '--config', 'tiny-cpu']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_plan_lists_the_shapes_a_compiled_run_builds() -> None:
    """`plan` names the distinct (micro-batch x seq_len) training shapes and counts the graphs with evaluation, with
    dynamic shapes (one training graph) and without (one per shape); `--json` lists them."""
    result = run_cli(["plan", "--config", "gpt2-124m-curriculum"])
    assert result.returncode == 0, result.stderr
    assert ("shapes: 4 training (micro-batch x seq_len: 512x128, 256x256, 128x512, 64x1024); kernels.compile builds "
            "5 graphs with evaluation (2 with kernels.dynamic_shapes: auto)") in result.stdout
    dynamic = run_cli(["plan", "--config", "gpt2-124m-seq-warmup"])  # a recipe with dynamic_shapes: auto
    assert dynamic.returncode == 0, dynamic.stderr
    assert "kernels.compile builds 2 graphs with evaluation (5 with kernels.dynamic_shapes: false)" in dynamic.stdout
    plan = json.loads(run_cli(["plan", "--config", "gpt2-124m-curriculum", "--json"]).stdout)
    assert plan["shapes"] == [{"micro_batch": 512, "seq_len": 128}, {"micro_batch": 256, "seq_len": 256},
                              {"micro_batch": 128, "seq_len": 512}, {"micro_batch": 64, "seq_len": 1024}]


# --------------------------------------------------------------------------------------------------- recipes


def columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_recipes_lists_each_shipped_recipe_on_one_line() -> None:
    """`recipes`: one line per shipped YAML file, with its model, stage count, seq_len range, steps and tokens as
    `plan` resolves them; the recipes as shipped, whatever CPT_* variables say."""
    result = run_cli(["recipes"], env={"CPT_RUN__MAX_STEPS": "3", "CPT_CURRICULUM__BASE_LR": "1.0"})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert [columns(line)[0] for line in lines] == RECIPES
    for name, line in zip(RECIPES, lines):
        config = load_config(name, environ={})
        schedule = build_schedule(config)
        lengths = sorted({stage.seq_len for stage in schedule.stages})
        _, model, stages, seq_lens, steps, tokens = columns(line)
        assert model == f"{config.model.arch} {config.model.preset}"
        assert stages.split()[0] == str(len(schedule.stages))
        assert seq_lens == f"seq_len {lengths[0]}" + (f"-{lengths[-1]}" if len(lengths) > 1 else "")
        assert steps == f"{schedule.total_steps:,} steps"
        assert tokens.endswith(" tokens")
    by_name = {columns(line)[0]: columns(line)[1:] for line in lines}
    # tiny-cpu: 200 steps of 2,048 tokens; the baseline: 10,000 steps of 512 x 1024 = 5,242,880,000 tokens
    assert by_name["tiny-cpu"] == ["llama tiny", "3 stages", "seq_len 64-256", "200 steps", "409.60K tokens"]
    assert by_name["gpt2-124m-baseline"] == ["gpt2 124m", "1 stage", "seq_len 1024", "10,000 steps", "5.24B tokens"]


def test_recipes_and_version_do_not_import_torch() -> None:
    code = ("import sys; from pipeline.cli import main, package_version; assert main(['recipes']) == 0; "
            "package_version(); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------- --version


def test_version_is_setup_pys() -> None:
    """`--version` prints the distribution's name and the version setup.py gives (read from it in a checkout)."""
    result = run_cli(["--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"curriculum-pretrain {setup_arguments(REPO_ROOT / 'setup.py')['version']}\n"


def test_version_outside_a_checkout_comes_from_the_installed_metadata(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """Installed (no setup.py beside the packages): the distribution's metadata."""
    import importlib.metadata

    from pipeline import cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "pipeline" / "cli.py"))
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "9.8.7" if name == "curriculum-pretrain" else pytest.fail(name))
    assert cli.package_version() == "9.8.7"


# --------------------------------------------------------------------------------------------------- --max-steps


def test_every_command_that_takes_a_config_takes_max_steps() -> None:
    """--max-steps comes with --config (pipeline.commands.add_config_arguments), on every command."""
    taking_config = []
    for name, (_, add_arguments, _) in commands().items():
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        if "--config" in parser._option_string_actions:
            taking_config.append(name)
            assert "--max-steps" in parser._option_string_actions, name
    assert taking_config == ["plan", "ds-config", "train", "doctor", "lr-find", "sweep", "bench"]


@pytest.mark.parametrize(("args", "env"), [
    (["--max-steps", "90"], {}),
    (["--set", "run.max_steps=90"], {}),
    ([], {"CPT_RUN__MAX_STEPS": "90"}),
    (["--max-steps", "90"], {"CPT_RUN__MAX_STEPS": "150"}),  # --max-steps is the last override
])
def test_plan_shows_the_cut(args: list[str], env: dict[str, str]) -> None:
    """tiny-cpu (stages 0-59, 60-119, 120-199) cut at 90: stage 0 whole, stage 1 over steps 60-89, stage 2 gone."""
    result = run_cli(["plan", "--config", "tiny-cpu", *args], env=env)
    assert result.returncode == 0, result.stderr
    rows = [columns(line) for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert [row[1] for row in rows] == ["0-59", "60-89"]
    assert "total: 90 steps, 184,320 tokens" in result.stdout  # 90 x 2,048
    assert "cut at step 90 of 200 by run.max_steps" in result.stdout
    plan = json.loads(run_cli(["plan", "--config", "tiny-cpu", "--json", *args], env=env).stdout)
    assert (plan["total_steps"], plan["cut_from"], plan["stages"][-1]["end_step"]) == (90, 200, 90)


def test_plan_without_a_cut() -> None:
    """--max-steps at or past the end: the full plan, no cut line, cut_from null."""
    result = run_cli(["plan", "--config", "tiny-cpu", "--max-steps", "200"])
    assert "total: 200 steps" in result.stdout and "cut at" not in result.stdout
    assert json.loads(run_cli(["plan", "--config", "tiny-cpu", "--json"]).stdout)["cut_from"] is None


@pytest.mark.parametrize(("args", "env", "line"), [
    (["--max-steps", "0"], {}, "error: run.max_steps = 0: Input should be greater than 0"),
    (["--max-steps", "-5"], {"CPT_RUN__MAX_STEPS": "7"}, "error: run.max_steps = -5: Input should be greater than 0"),
    ([], {"CPT_RUN__MAX_STEPS": "0"}, "error: run.max_steps = 0: Input should be greater than 0 (set by "
                                      "CPT_RUN__MAX_STEPS)"),
    (["--max-steps", "ten"], {}, "error: run.max_steps = 'ten': Input should be a valid integer, unable to parse "
                                 "string as an integer"),
])
def test_a_bad_max_steps_is_one_error_line(args: list[str], env: dict[str, str], line: str) -> None:
    """0, negative or not a number: exit 2 and one line, naming the variable only when it set the value."""
    result = run_cli(["plan", "--config", "tiny-cpu", *args], env=env)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", line + "\n")


@pytest.mark.parametrize("source", ["--set", "environment"])
def test_a_token_interval_replaces_a_recipes_step_interval(source: str) -> None:
    """``run.eval_every_tokens`` on a recipe that sets ``eval_every`` (tiny-cpu: 50), by ``--set`` or by a ``CPT_``
    variable: the step interval becomes 0, in the config and in what a run writes to its config.json, which reads
    back to the same run settings; a bad token interval is still an error of its own."""
    by_set = source == "--set"
    sets = ["run.eval_every_tokens=4096"] if by_set else []
    environ = {} if by_set else {"CPT_RUN__EVAL_EVERY_TOKENS": "4096"}
    assert load_config("tiny-cpu", environ={}).run.eval_every == 50
    config = load_config("tiny-cpu", sets, environ=environ)
    assert (config.run.eval_every, config.run.eval_every_tokens) == (0, 4096)
    written = config.model_dump(mode="json")
    assert written["run"]["eval_every"] == 0 and type(config).model_validate(written).run == config.run
    with pytest.raises(ConfigError, match="must be a number, not true"):
        load_config("tiny-cpu", ["run.eval_every_tokens=true"], environ={})


def test_the_stable_recipe_has_its_baselines_lr_at_every_token() -> None:
    """gpt2-124m-seq-warmup-stable is the curriculum whose LR is the baseline's token for token (scaled to its own
    peak): at the first token of each of its steps the LR is, within 0.1 % of the peak, what the baseline's schedule
    gives there (linear between the baseline's steps), through the short stages, the warmup to the peak at 26.2 M
    tokens and the cosine after it; and both runs train the same tokens."""
    stable = build_schedule(load_config("gpt2-124m-seq-warmup-stable", environ={}))
    baseline = build_schedule(load_config("gpt2-124m-seq-warmup-baseline", environ={}))
    assert stable.total_tokens == baseline.total_tokens
    scale = stable.stages[-1].peak_lr / baseline.stages[-1].peak_lr  # 3.4e-3 / 2.4e-3
    per_step = baseline.tokens_before(1)
    worst = 0.0
    for step in range(stable.total_steps):
        at = stable.tokens_before(step) / per_step  # where this step starts, in the baseline's steps
        low = min(int(at), baseline.total_steps - 1)
        high = min(low + 1, baseline.total_steps - 1)
        expected = scale * (baseline.lr_at(low) + (at - low) * (baseline.lr_at(high) - baseline.lr_at(low)))
        worst = max(worst, abs(stable.lr_at(step) - expected) / stable.stages[-1].peak_lr)
    assert worst < 1e-3, worst
    assert [stage.seq_len for stage in stable.stages] == [256, 512, 768, 1024]


@pytest.mark.parametrize(("recipe", "study", "tuned"), [
    ("gpt2-124m-seq-warmup", "length-warmup",
     ["curriculum.base_lr=1.7e-3", *(f"curriculum.stages.{i}.lr_mult={m}" for i, m in enumerate((0.25, 0.5, 0.75))),
      *(f"curriculum.stages.{i}.warmup_steps={w}" for i, w in enumerate((152, 152, 152, 172))),
      "kernels.dynamic_shapes=auto"]),  # measured with and without; the recipe compiles one graph
    ("gpt2-124m-seq-warmup-stable", "length-warmup",  # the baseline's LR per token
     ["curriculum.base_lr=3.4e-3",
      *(f"curriculum.stages.{i}.lr_mult={m}" for i, m in enumerate((0.0475, 0.1425, 0.285))),
      *(f"curriculum.stages.{i}.warmup_steps={w}" for i, w in enumerate((152, 152, 152, 572))),
      "kernels.dynamic_shapes=auto"]),
    ("gpt2-124m-seq-warmup-baseline", "baseline",
     ["curriculum.base_lr=2.4e-3", "curriculum.stages.0.warmup_steps=800"]),
])
def test_the_seq_warmup_recipes_are_the_measured_runs(recipe: str, study: str, tuned: list[str]) -> None:
    """docs/RESULTS.md measured these recipes as the GPU study's configs at 4x the tokens (bench/longer.py) with the
    tuned peak LR and warmup and an evaluation every 1,048,576 tokens (the curriculum also with dynamic shapes): the
    same plan step for step (stages, LRs, warmups, clips) and the same settings otherwise, but for the name and the
    export a recipe makes at its end."""
    spec = importlib.util.spec_from_file_location("longer", REPO_ROOT / "bench" / "longer.py")
    longer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(longer)
    path = REPO_ROOT / "bench" / "study-gpu" / f"{study}.yaml"
    sets = [*longer.longer_sets(yaml.safe_load(path.read_text()), 4), *tuned, "run.eval_every_tokens=1048576"]
    measured, shipped = load_config(str(path), sets, environ={}), load_config(recipe, environ={})

    def plan(config: Any) -> Any:  # lr_source says how the LR was written (lr_mult 1.0 or left out), not what it is
        schedule = build_schedule(config)
        stages = tuple(dataclasses.replace(stage, lr_source="") for stage in schedule.stages)
        return dataclasses.replace(schedule, stages=stages)

    def settings(config: Any) -> dict[str, Any]:
        dumped = config.model_dump()
        del dumped["name"], dumped["run"]["export"], dumped["curriculum"]["stages"]
        return dumped

    assert plan(shipped) == plan(measured)
    assert settings(shipped) == settings(measured)
    assert (shipped.run.export, measured.run.export) == (True, False)
