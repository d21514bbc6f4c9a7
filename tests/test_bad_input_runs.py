"""Bad input around run directories: nothing an earlier run wrote is lost, and every refusal is one line.

The classes: data loss (a broken ``checkpoints/latest``, a fresh start into a directory that holds a run, a
failing command rewriting config.json), resume (a torn last metrics line, another model shape, a checkpoint past
the plan's end), output paths that are files or cannot be made, a sweep directory whose manifest is damaged, and
``diagnose`` on a directory it cannot write into. Each refusal exits with status 2 and one ``error:`` line on
stderr, and leaves the directory byte-identical (every file's sha256 before and after).

One tiny run, stopped at step 7 of 15 (checkpoints at 4 and 7, seven metrics lines), is made once and copied.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from conftest import REPO_ROOT, TINY_LLAMA_YAML, Run, process_env

CONFIG_YAML = """\
name: bad-input-runs
""" + TINY_LLAMA_YAML + """\
curriculum:
  base_lr: 3.0e-3
  lr_scaling: {{rule: none}}
  stages:
    - {{until_step: 5, seq_len: 32, global_batch: 8, micro_batch: 4, warmup_steps: 2}}
    - {{until_step: 10, seq_len: 64, global_batch: 4, micro_batch: 2, warmup_steps: 1}}
    - {{until_step: 15, seq_len: 128, global_batch: 2, micro_batch: 1, warmup_steps: 1}}
run:
  eval_every: 0
  eval_batches: 1
  eval_batch: 2
  checkpoint_every: 4
  tensorboard: false
  export: false
  keep_best: false
"""
STOP = 7
TIMEOUT_S = 300


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO_ROOT, env=process_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (and every empty directory) with its sha256."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*")) if p.is_file() or not any(p.iterdir())}


def assert_refused(result: subprocess.CompletedProcess[str], starts: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert len(errors) == 1 and errors[0].startswith(starts), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def config(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "runs.yaml"
    path.write_text(CONFIG_YAML.format(data_dir=data_dir))
    return path


@pytest.fixture(scope="module")
def stopped(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    result = cli("train", "--config", str(config), "--output-dir", str(run_dir), "--stop-at-step", str(STOP))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture
def run_dir(stopped: Path, tmp_path: Path) -> Path:
    """A fresh copy of the stopped run."""
    return Path(shutil.copytree(stopped, tmp_path / "run"))


def refused(config: Path, run_dir: Path, *args: str, starts: str, output: Optional[Path] = None) -> None:
    """``train`` into ``run_dir`` with ``args``: refused, and ``run_dir`` byte-identical afterwards."""
    before = fingerprint(run_dir)
    assert_refused(cli("train", "--config", str(config), "--output-dir", str(output or run_dir), *args), starts)
    assert fingerprint(run_dir) == before


# --------------------------------------------------------------------------------------------------- data loss


def test_a_latest_naming_a_missing_checkpoint_with_none_left_is_an_error(config: Path, run_dir: Path) -> None:
    """The metrics of steps 0-6 stay: no silent start from step 0."""
    shutil.rmtree(run_dir / "checkpoints" / "step00000004")
    shutil.rmtree(run_dir / "checkpoints" / "step00000007")
    refused(config, run_dir, starts="error: --resume = 'auto': ")


def test_a_latest_naming_a_missing_checkpoint_falls_back_to_the_newest_complete_one(config: Path,
                                                                                  run_dir: Path) -> None:
    """``latest`` names step 7, which is gone: resumed from step 4, saying so; steps 0-3 keep their lines and every
    step is logged once at the end."""
    shutil.rmtree(run_dir / "checkpoints" / "step00000007")
    result = cli("train", "--config", str(config), "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "names step00000007, which is not there: resuming from the newest complete checkpoint, step00000004" \
           in result.stdout
    assert [r["step"] for r in Run(run_dir).train_rows()] == list(range(15))


@pytest.mark.parametrize("resume", ["none", "auto"])
def test_a_fresh_start_into_a_directory_that_holds_a_run_is_refused(config: Path, run_dir: Path,
                                                                    resume: str) -> None:
    """``--resume none``, or ``auto`` with the checkpoints gone: starting at step 0 would rewrite the metrics."""
    if resume == "auto":
        shutil.rmtree(run_dir / "checkpoints")
    refused(config, run_dir, "--resume", resume, starts=f"error: --output-dir = '{run_dir}': holds a run (8 metrics "
                                                        "lines) and no checkpoint to resume from")


@pytest.mark.parametrize(("sets", "starts"), [
    (["data.dir=/no/such/data"], "error: data.dir = '/no/such/data': does not exist"),
    (["model.overrides.hidden_size=5"], "error: model.overrides.num_attention_heads = 4: must divide hidden_size 5"),
    (["curriculum.stages.0.seq_len=30"], "error: curriculum.stages.0.seq_len = 30:"),
], ids=["bad-data-dir", "bad-override", "bad-seq-len"])
def test_a_failing_train_leaves_the_run_directory_as_it_was(config: Path, run_dir: Path, sets: list[str],
                                                           starts: str) -> None:
    """config.json, metrics and checkpoints are untouched when the command fails on its input."""
    refused(config, run_dir, *[arg for item in sets for arg in ("--set", item)], starts=starts)


# --------------------------------------------------------------------------------------------------- resume


def test_a_torn_last_metrics_line_is_dropped_on_resume(config: Path, run_dir: Path) -> None:
    """A kill in the middle of writing a line leaves half of it: resume drops it and logs each step once."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "tok')
    result = cli("train", "--config", str(config), "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["step"] for r in Run(run_dir).train_rows()] == list(range(15))


@pytest.mark.parametrize(("sets", "starts"), [
    (["model.overrides.num_hidden_layers=3"], "error: model.overrides.num_hidden_layers = 3: the checkpoint "),
    (["model.overrides.intermediate_size=256"], "error: model.overrides.intermediate_size = 256: the checkpoint "),
    (["model.arch=gpt2"], "error: model.arch = 'gpt2': the checkpoint "),
    (["curriculum.stages.2.seq_len=256"], "error: curriculum (the longest seq_len) = 256: the checkpoint "),
], ids=["layers", "width", "arch", "positions"])
def test_resuming_with_another_model_shape_names_the_field(config: Path, run_dir: Path, sets: list[str],
                                                         starts: str) -> None:
    refused(config, run_dir, *[arg for item in sets for arg in ("--set", item)], starts=starts)


def test_a_checkpoint_past_the_plan_is_refused(config: Path, run_dir: Path) -> None:
    """Step 7 resumed into a plan of 6 steps."""
    refused(config, run_dir, "--set", "curriculum.stages.2.until_step=6", "--set", "curriculum.stages.1.until_step=5",
            "--set", "curriculum.stages.0.until_step=3", "--set", "curriculum.stages.0.warmup_steps=1",
            starts="error: --resume = ")


@pytest.mark.parametrize(("sets", "starts"), [
    (["deepspeed.template=zero2"], "error: deepspeed.template = 'zero2': gives ZeRO stage 2; the checkpoint "),
    (["deepspeed.overrides.zero_optimization.stage=1"],
     "error: deepspeed.overrides.zero_optimization.stage = 1: gives ZeRO stage 1; the checkpoint "),
], ids=["template", "override"])
def test_resuming_under_another_zero_stage_is_refused(config: Path, run_dir: Path, sets: list[str],
                                                      starts: str) -> None:
    """The run's ZeRO-0 checkpoint under stage 2 or 1: DeepSpeed would hand the stage's optimizer a state it did not
    save (a traceback deep in torch's load_state_dict)."""
    refused(config, run_dir, *[arg for item in sets for arg in ("--set", item)], starts=starts)


def test_an_explicit_resume_path_that_is_not_a_checkpoint(config: Path, run_dir: Path, tmp_path: Path) -> None:
    refused(config, run_dir, "--resume", str(tmp_path / "nowhere"), starts="error: --resume = ")


# --------------------------------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("command", ["train", "lr-find", "sweep"])
def test_an_output_directory_that_is_a_file_is_refused(config: Path, tmp_path: Path, command: str) -> None:
    target = tmp_path / "not-a-directory"
    target.write_text("keep me\n")
    result = cli(command, "--config", str(config), "--output-dir", str(target))
    assert_refused(result, f"error: --output-dir = '{target}': is a file")
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize("command", ["train", "lr-find", "sweep"])
def test_an_output_directory_below_a_file_is_refused_before_any_work(config: Path, tmp_path: Path,
                                                                    command: str) -> None:
    """``--output-dir FILE/sub`` cannot be made: one line naming the file, before anything runs (no output at all;
    train built its engine and lr-find ran every ramp before mkdir failed with a traceback)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    result = cli(command, "--config", str(config), "--output-dir", str(a_file / "sub"))
    assert_refused(result, f"error: --output-dir = '{a_file / 'sub'}': {a_file} is a file; give a directory")
    assert result.stdout == "" and a_file.read_text() == "keep me\n"


def test_an_output_directory_that_cannot_be_written_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A directory this process may not write into (``os.access`` says so here: tests run as root, whom no mode
    stops) is refused as an output directory, and so is a new directory below it."""
    from curriculum.errors import ConfigError
    from pipeline.commands import output_directory

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError) as refused_itself:
        output_directory("--output-dir", tmp_path)
    assert str(refused_itself.value) == (f"--output-dir = '{tmp_path}': is not writable; give a directory you can "
                                         "write to")
    with pytest.raises(ConfigError) as refused_below:
        output_directory("--output-dir", tmp_path / "new" / "run")
    assert str(refused_below.value) == (f"--output-dir = '{tmp_path / 'new' / 'run'}': {tmp_path} is not writable; "
                                        "give a directory you can write to")


# --------------------------------------------------------------------------------------------------- sweep state


@pytest.mark.parametrize("content", ['{"lrs": [0.001], "runs": ', '[1, 2, 3]',
                                     '{"lrs": [], "runs": {"lr_1.00e-03": {"lr": "high", "launches": 0}}}',
                                     '\udcff'.encode("utf-8", "surrogateescape").decode("latin-1")],
                         ids=["torn", "a-list", "wrong-field", "not-utf8"])
def test_a_damaged_sweep_manifest_is_one_error(config: Path, tmp_path: Path, content: str) -> None:
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    manifest = sweep_dir / "sweep_manifest.json"
    manifest.write_bytes(content.encode("latin-1"))
    before = fingerprint(sweep_dir)
    assert_refused(cli("sweep", "--config", str(config), "--lrs", "1e-3", "--output-dir", str(sweep_dir)),
                   f"error: --output-dir = '{sweep_dir}': sweep_manifest.json is damaged")
    assert fingerprint(sweep_dir) == before


# --------------------------------------------------------------------------------------------------- diagnose


def test_diagnose_on_a_directory_it_cannot_write_into(run_dir: Path) -> None:
    """diagnose.json is a directory there (a stand-in for a read-only directory: tests run as root)."""
    (run_dir / "diagnose.json").mkdir()
    assert_refused(cli("diagnose", str(run_dir)), f"error: run_dir = '{run_dir}': cannot write diagnose.json")


@pytest.mark.parametrize(("line", "starts"), [
    ('{"kind": "train", "step": 7, "stage": 1, "seq_len": 64, "loss": "low", "grad_norm": 1, "tok_per_s": 1}',
     "error: "),
    ('{"kind": "train", "step": "seven", "stage": 1, "seq_len": 64, "loss": 5, "grad_norm": 1, "tok_per_s": 1}',
     "error: "),
    ('{"kind": "eval", "step": 7, "eval_loss": null}', "error: "),
    ('[1, 2]', "error: "),
], ids=["loss-a-string", "step-a-string", "eval-loss-null", "not-an-object"])
def test_diagnose_on_metrics_values_a_run_does_not_write(run_dir: Path, line: str, starts: str) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    before = fingerprint(run_dir)
    result = cli("diagnose", str(run_dir))
    assert_refused(result, starts)
    assert "metrics.jsonl:9" in result.stderr  # after the stopped run's 7 train lines and its stop line
    assert fingerprint(run_dir) == before
