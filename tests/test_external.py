"""``diagnose`` and ``doctor`` on other tools' files, written by the real libraries.

A session fixture trains a real HF ``Trainer`` on CPU (a GPT-2 of 1 layer, d_model 32, vocabulary 128, built from
its config: no download) for 30 steps on random tokens, logging every step, evaluating and saving every 10 steps,
with TensorBoard on; it writes ``checkpoint-10/20/30`` (each with a ``trainer_state.json``) and a TensorBoard event
file under ``runs/``, but no top-level ``trainer_state.json``. The Trainer logs steps 1-30; ``diagnose`` shows them
as steps 0-29. The spike ``diagnose`` must find is injected into a copy of the Trainer's ``trainer_state.json``
(a loss tripled at the Trainer's step 20): random tokens give a loss too flat to spike by itself. ``TrainingArguments``
JSONs come from ``TrainingArguments.to_json_string()``; where ``doctor`` reports a DeepSpeed problem, transformers'
``HfTrainerDeepSpeedConfig`` or DeepSpeed's own ``DeepSpeedConfig`` is asked to confirm it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from pipeline.cli import main
from pipeline.diagnose import load_records
from pipeline.doctor import model_size
from pipeline.metrics import RunLogger

STEPS = 30
SPIKE_STEP = 20  # the Trainer's step; diagnose's step 19


@dataclass(frozen=True)
class TrainerRun:
    output_dir: Path
    args_json: Path
    """What the run's ``TrainingArguments.to_json_string()`` wrote."""
    log_history: list[dict[str, Any]]
    n_params: int


@pytest.fixture(scope="session")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> TrainerRun:
    """30 steps of a real Trainer on CPU: a few seconds, most of them importing transformers."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    root = tmp_path_factory.mktemp("hf")
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    tokens = torch.randint(0, 128, (48, 32), generator=torch.Generator().manual_seed(0))
    samples = [{"input_ids": row, "labels": row} for row in tokens]
    args = TrainingArguments(output_dir=str(root / "out"), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-3, warmup_steps=3, logging_steps=1, eval_strategy="steps",
                             eval_steps=10, save_steps=10, report_to=["tensorboard"], seed=0, use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=samples, eval_dataset=samples[:8])
    trainer.train()
    args_json = root / "training_args.json"
    args_json.write_text(args.to_json_string())
    return TrainerRun(root / "out", args_json, trainer.state.log_history,
                      sum(p.numel() for p in model.parameters()))


def logged(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of the Trainer's entries that have ``key``."""
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


def by_kind(records: list[dict[str, Any]], kind: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r["kind"] == kind]


def assert_same_curve(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """The same steps and, to float32's precision (TensorBoard's), the same values."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6)


def only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------ diagnose: reading


@pytest.mark.parametrize(("where", "source"), [
    (".", "HF Trainer state checkpoint-30/trainer_state.json"),
    ("checkpoint-30", "HF Trainer state trainer_state.json"),
    ("checkpoint-30/trainer_state.json", "HF Trainer state trainer_state.json"),
    ("runs", "TensorBoard events (1 file;"),
    ("runs/*/events.out.tfevents.*", "TensorBoard events events.out.tfevents."),
], ids=["output dir", "checkpoint dir", "trainer_state.json", "tensorboard dir", "event file"])
def test_each_form_gives_the_logged_steps_and_losses(trainer_run: TrainerRun, where: str, source: str) -> None:
    """Every form of the Trainer's log gives its 30 losses and 3 evaluations, each at the Trainer's step - 1
    (TensorBoard stores float32: equal to 1e-6)."""
    path = next(trainer_run.output_dir.glob(where)) if "*" in where else trainer_run.output_dir / where
    records, read = load_records(path)
    assert read.startswith(source) and "the Trainer's step - 1" in read
    for kind, key, log_key, steps in (("train", "loss", "loss", list(range(STEPS))),
                                      ("train", "grad_norm", "grad_norm", list(range(STEPS))),
                                      ("eval", "eval_loss", "eval_loss", [9, 19, 29])):
        expected = [(step - 1, value) for step, value in logged(trainer_run.log_history, log_key)]
        assert [step for step, _ in expected] == steps
        assert_same_curve(by_kind(records, kind, key), expected)
    train = [r for r in records if r["kind"] == "train"]
    assert {(r["stage"], r["seq_len"], r["grad_clip"]) for r in train} == {(0, None, None)}


def test_newest_checkpoint_is_the_largest_number(trainer_run: TrainerRun, tmp_path: Path) -> None:
    """checkpoint-30 is newer than checkpoint-9, though it sorts first as text."""
    for name, source in (("checkpoint-9", "checkpoint-10"), ("checkpoint-30", "checkpoint-30")):
        (tmp_path / name).mkdir()
        shutil.copy(trainer_run.output_dir / source / "trainer_state.json", tmp_path / name)
    records, read = load_records(tmp_path)
    assert "checkpoint-30/trainer_state.json" in read
    assert len([r for r in records if r["kind"] == "train"]) == STEPS


def test_own_tensorboard_scalars_keep_their_steps_and_stages(tmp_path: Path) -> None:
    """This project's TensorBoard scalars (``RunLogger``) read back as the metrics.jsonl beside them: steps from 0,
    with stage, seq_len, grad_clip and tok/s."""
    logger = RunLogger(tmp_path, 0, tensorboard=True, wandb_settings=None)
    for step in range(24):
        stage = step // 12
        logger.log({"kind": "train", "step": step, "stage": stage, "seq_len": 64 << stage, "loss": 5.0 - 0.1 * step,
                    "grad_norm": 0.5, "grad_clip": 1.0, "tok_per_s": 1000.0 + step, "lr": 1e-3})
    logger.log({"kind": "eval", "step": 23, "eval_loss": 2.75})
    logger.close()
    from_metrics, _ = load_records(tmp_path)
    from_events, read = load_records(tmp_path / "tensorboard")
    assert "steps as logged" in read
    fields = ("kind", "step", "stage", "seq_len", "grad_clip")
    assert [tuple(r.get(f) for f in fields) for r in from_events] == [tuple(r.get(f) for f in fields)
                                                                      for r in from_metrics]
    for key in ("loss", "tok_per_s"):
        assert_same_curve(by_kind(from_events, "train", key), by_kind(from_metrics, "train", key))
    assert by_kind(from_events, "eval", "eval_loss") == [(23, 2.75)]


@pytest.mark.parametrize("first_step", [0, 1])
def test_other_writers_plain_tags(tmp_path: Path, first_step: int) -> None:
    """Plain ``loss`` scalars from torch's SummaryWriter: from step 1 they count as the Trainer's (shifted to 0),
    with a loss at step 0 they count from 0 already (read as logged)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(first_step, first_step + 12):
        writer.add_scalar("loss", 4.0 - 0.1 * step, step)
    writer.close()
    records, read = load_records(tmp_path)
    assert [r["step"] for r in records] == list(range(12))
    assert records[0]["loss"] == pytest.approx(4.0 - 0.1 * first_step)
    assert read.endswith("steps as logged)" if first_step == 0 else "the Trainer's step - 1)")


# ------------------------------------------------------------------------------------------------ diagnose: findings


def test_clean_run_exits_0(trainer_run: TrainerRun, tmp_path: Path) -> None:
    """The Trainer's output directory through the real CLI: its format and step count on the first line, nothing
    found (30 lines are too few for a plateau at the default window of 50, 3 evaluations too few for an eval
    plateau, and there is no throughput or clip to judge), diagnose.json written there."""
    output_dir = shutil.copytree(trainer_run.output_dir, tmp_path / "out")
    result = run_cli(["diagnose", str(output_dir)])
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first == (f"{output_dir}: HF Trainer state checkpoint-30/trainer_state.json (steps from 0: the Trainer's "
                     f"step - 1), 30 train lines in 1 stage(s)")
    assert "no problems found" in result.stdout
    report = json.loads((output_dir / "diagnose.json").read_text())
    assert report["source"].startswith("HF Trainer state") and report["findings"] == []
    [stage] = report["stages"]
    assert stage["steps"] == [0, STEPS - 1] and stage["seq_len"] is None
    assert stage["median_tok_per_s"] is None and stage["clip_share"] is None and stage["median_grad_norm"] > 0


def test_injected_spike_found_at_its_step(trainer_run: TrainerRun, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The Trainer's loss at its step 20 tripled in a copy of its trainer_state.json: one spike, at step 19."""
    state = json.loads((trainer_run.output_dir / "checkpoint-30" / "trainer_state.json").read_text())
    entry = next(e for e in state["log_history"] if e["step"] == SPIKE_STEP and "loss" in e)
    entry["loss"] *= 3
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert main(["diagnose", str(tmp_path / "trainer_state.json"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(f["kind"], f["steps"], f["stage"]) for f in report["findings"]] == [
        ("spike", [SPIKE_STEP - 1, SPIKE_STEP - 1], 0)]
    assert f"at step {SPIKE_STEP - 1} is" in report["findings"][0]["message"]
    assert (tmp_path / "diagnose.json").is_file() and (tmp_path / "diagnose.png").is_file()


def bad_log_paths(trainer_run: TrainerRun, root: Path) -> dict[str, Path]:
    """Paths that hold nothing diagnose can read, each in its own way."""
    state_text = (trainer_run.output_dir / "checkpoint-10" / "trainer_state.json").read_text()
    paths = {"missing": root / "missing", "empty": root / "empty", "corrupt": root / "corrupt" / "trainer_state.json",
             "no entries": root / "no-entries" / "trainer_state.json",
             "model config": trainer_run.output_dir / "checkpoint-10" / "config.json",
             "not events": root / "events" / "events.out.tfevents.1.host"}
    paths["empty"].mkdir()
    for name in ("corrupt", "no entries", "not events"):
        paths[name].parent.mkdir()
    paths["corrupt"].write_text(state_text[: len(state_text) // 2])
    paths["no entries"].write_text(json.dumps({**json.loads(state_text), "log_history": []}))
    paths["not events"].write_bytes(b"not a TFRecord")
    return paths


@pytest.mark.parametrize(("name", "needle"), [
    ("missing", "no such directory or file"),
    ("empty", "holds no metrics.jsonl, no trainer_state.json"),
    ("corrupt", "not valid JSON"),
    ("no entries", "has no training losses (0 log_history entries)"),
    ("model config", "log_history = None"),
    ("not events", "has no training losses (0 scalar tags"),
])
def test_bad_log_exits_2_with_one_line(trainer_run: TrainerRun, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       name: str, needle: str) -> None:
    assert main(["diagnose", str(bad_log_paths(trainer_run, tmp_path)[name])]) == 2
    line = only_line(capsys.readouterr().err)
    assert line.startswith("error: ") and needle in line, line


# ------------------------------------------------------------------------------------------------ doctor


def training_args(tmp_path: Path, **fields: Any) -> Path:
    """``TrainingArguments(**fields).to_json_string()`` in a file (30 steps, batch 4 x 1, LR 6e-4, warmup 3 unless
    ``fields`` say otherwise)."""
    from transformers import TrainingArguments

    fields = {"max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 6e-4, "warmup_steps": 3,
              **fields}
    path = tmp_path / "training_args.json"
    path.write_text(TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                                      **fields).to_json_string())
    return path


def ds_config(tmp_path: Path, **fields: Any) -> Path:
    """A DeepSpeed JSON as the Trainer's documentation writes them ("auto" for what it fills in), with ``fields``."""
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": 2}, **fields}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return path


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    """``doctor ARGS --json`` in this process: the exit status and the findings."""
    capsys.readouterr()  # what the test printed before (DeepSpeed's accelerator guess on import) is not doctor's
    status = main(["doctor", *args, "--json"])
    return status, json.loads(capsys.readouterr().out)["findings"]


def checks(findings: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f["severity"], f["check"]) for f in findings]


def trainer_mismatches(args_json: Path, ds_json: Path, world_size: int = 1) -> list[str]:
    """What transformers itself says of a DeepSpeed JSON for these arguments (it refuses to start when non-empty)."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    fields = json.loads(args_json.read_text())
    args = TrainingArguments(**{key: fields[key] for key in (
        "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_grad_norm",
        "max_steps")}, use_cpu=True, report_to=[])
    hf_ds = HfTrainerDeepSpeedConfig(json.loads(ds_json.read_text()))
    hf_ds.trainer_config_process(args)
    return hf_ds.mismatches


def test_model_config_count_is_the_models(trainer_run: TrainerRun) -> None:
    """--model-config on the Trainer's checkpoint counts the parameters of the model it trained."""
    size = model_size(None, str(trainer_run.output_dir / "checkpoint-30"))
    assert size.n_params == trainer_run.n_params
    assert "gpt2, counted from" in size.source


def test_the_runs_own_arguments_pass(trainer_run: TrainerRun, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The Trainer run's arguments (LR 1e-3 for an 18K model, warmup 3 of 30 steps, clip 1.0): no findings, alone or
    with an all-"auto" DeepSpeed JSON, which transformers also accepts for them."""
    model = ["--model-config", str(trainer_run.output_dir / "checkpoint-30")]
    assert doctor(capsys, "--hf-args", str(trainer_run.args_json), *model) == (0, [])
    ds_json = ds_config(tmp_path)
    assert doctor(capsys, "--hf-args", str(trainer_run.args_json), "--ds-config", str(ds_json), *model) == (0, [])
    assert trainer_mismatches(trainer_run.args_json, ds_json) == []


def test_batch_mismatch_is_an_error_as_the_trainer_finds_it(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """train_batch_size 16 for batch 4 x accumulation 1 x world size 1: an error, and the Trainer's own mismatch;
    at world size 4 the same files agree."""
    args_json, ds_json = training_args(tmp_path), ds_config(tmp_path, train_batch_size=16)
    status, findings = doctor(capsys, "--hf-args", str(args_json), "--ds-config", str(ds_json), "--params", "124e6")
    assert status == 1 and checks(findings) == [("error", "batch-mismatch")]
    assert findings[0]["field"] == "ds_config.json: train_batch_size"
    assert "4 x 1 x 1 = 4" in findings[0]["message"]
    assert [m for m in trainer_mismatches(args_json, ds_json) if "train_batch_size" in m]
    assert doctor(capsys, "--hf-args", str(args_json), "--ds-config", str(ds_json), "--params", "124e6",
                  "--world-size", "4") == (0, [])


def test_deepspeed_alone_batch_rule_as_deepspeed_checks_it(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Without TrainingArguments, DeepSpeed's own rule: 16 != 4 x 2 x 1 is an error, and DeepSpeedConfig refuses
    it; 8 = 4 x 2 x 1 passes both."""
    batch = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}
    status, findings = doctor(capsys, "--ds-config", str(ds_config(tmp_path, **batch, train_batch_size=16)))
    from deepspeed.runtime.config import DeepSpeedConfig  # after doctor, which says which accelerator before importing

    assert status == 1 and checks(findings) == [("error", "batch-mismatch")]
    assert "= 8" in findings[0]["message"]
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        DeepSpeedConfig({**batch, "train_batch_size": 16})
    assert doctor(capsys, "--ds-config", str(ds_config(tmp_path, **batch, train_batch_size=8))) == (0, [])
    DeepSpeedConfig({**batch, "train_batch_size": 8})


def test_lr_ten_times_too_high_for_the_model_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """6e-3 for 124M parameters, where GPT-3 used 6e-4: an error that names the exponent; 6e-4 passes."""
    status, findings = doctor(capsys, "--hf-args", str(training_args(tmp_path, learning_rate=6e-3)),
                              "--params", "124e6")
    assert status == 1 and checks(findings) == [("error", "lr-range")]
    assert findings[0]["field"] == "training_args.json: learning_rate"
    assert "10x too high" in findings[0]["suggestion"]
    assert doctor(capsys, "--hf-args", str(training_args(tmp_path)), "--params", "124e6") == (0, [])


def test_lr_range_without_a_model_size_is_not_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, findings = doctor(capsys, "--hf-args", str(training_args(tmp_path, learning_rate=6e-3)))
    assert status == 0 and checks(findings) == [("warning", "lr-range")]
    assert "not compared" in findings[0]["message"] and "--params" in findings[0]["suggestion"]


@pytest.mark.parametrize(("fields", "expected", "says"), [
    ({"warmup_steps": 40}, ("error", "warmup-too-long"), "longer than training (30 steps)"),
    ({"warmup_steps": 18}, ("warning", "warmup-share"), "60% of training"),
    ({"warmup_steps": 0}, ("warning", "no-warmup"), "no warmup at peak LR 6e-4"),
    ({"warmup_steps": 0, "learning_rate": 5e-5}, None, ""),
], ids=["longer than training", "60% of training", "none at 6e-4", "none at 5e-5"])
def test_warmup(tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any],
                expected: tuple[str, str] | None, says: str) -> None:
    """Warmup against max_steps 30: 40 steps is an error, 18 a warning; none is a warning above 1e-4 only."""
    _, findings = doctor(capsys, "--hf-args", str(training_args(tmp_path, **fields)), "--params", "124e6")
    found = [f for f in findings if "warmup" in f["check"]]
    assert checks(found) == ([expected] if expected else [])
    assert all(says in f["message"] for f in found)


def test_deepspeed_json_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ZeRO stage 4, bf16 with fp16 (DeepSpeedConfig refuses it too) and no gradient_clipping."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = {"train_batch_size": 8, "bf16": {"enabled": True}, "fp16": {"enabled": True}}
    with pytest.raises(AssertionError, match="cannot be simultaneously enabled"):
        DeepSpeedConfig(config)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({**config, "zero_optimization": {"stage": 4}}))
    status, findings = doctor(capsys, "--ds-config", str(ds_json))
    assert status == 1
    assert [(f["severity"], f["check"], f["field"]) for f in findings] == [
        ("error", "ds-config", "ds.json: zero_optimization.stage"), ("error", "ds-config", "ds.json: bf16.enabled"),
        ("warning", "grad-clip", "ds.json: gradient_clipping")]


@pytest.mark.parametrize(("fields", "field", "says", "deepspeed_says"), [
    ({"zero_optimization": {"stage": 2, "stagee": 1}}, "zero_optimization.stagee",
     "zero_optimization.stagee = 1: unknown key; allowed: stage, ", "Extra inputs are not permitted"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "abc"}}, "zero_optimization.reduce_bucket_size",
     "Input should be a valid integer", "valid integer"),
    ({"zero_optimization": 2}, "zero_optimization", "must be a mapping, not int", "must be a mapping"),
    ({"bf16": True}, "bf16", "must be a mapping, not bool", "must be a mapping"),
    ({"zero_optimisation": {"stage": 2}}, "zero_optimisation", "unknown key; allowed: activation_checkpointing, ",
     None),
], ids=["misspelt ZeRO key", "ZeRO value of the wrong type", "ZeRO not a mapping", "bf16 not a mapping",
        "misspelt top-level key"])
def test_what_deepspeed_refuses_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any],
                                           field: str, says: str, deepspeed_says: str | None) -> None:
    """A DeepSpeed JSON with a key or value DeepSpeed's own config classes refuse (a misspelt key, a section that is
    not a mapping) is an error finding naming the key, where doctor found nothing before; DeepSpeedConfig refuses it
    too, and ignores a misspelt top-level key (ZeRO stays off), which is an error here for that reason."""
    config = {"train_batch_size": 8, "gradient_clipping": 1.0, **fields}
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(config))
    status, findings = doctor(capsys, "--ds-config", str(ds_json))
    from deepspeed.runtime.config import DeepSpeedConfig  # after doctor, which says which accelerator before importing

    assert status == 1 and checks(findings) == [("error", "ds-config")]
    assert findings[0]["field"] == f"ds.json: {field}"
    assert says in findings[0]["message"]
    if deepspeed_says is None:
        assert DeepSpeedConfig(config).zero_optimization_stage == 0
    else:
        with pytest.raises(Exception, match=deepspeed_says):
            DeepSpeedConfig(config)


def test_auto_values_without_arguments_are_not_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DeepSpeed JSON meant for the Trainer, checked alone: one warning naming what only the Trainer fills in."""
    status, findings = doctor(capsys, "--ds-config", str(ds_config(tmp_path)))
    assert status == 0 and checks(findings) == [("warning", "ds-config")]
    assert findings[0]["message"].startswith("train_batch_size, train_micro_batch_size_per_gpu, "
                                             "gradient_accumulation_steps, gradient_clipping are \"auto\"")


@pytest.mark.parametrize(("args", "needle"), [
    ([], "error: --config = None: give a run config"),
    (["--config", "tiny-cpu", "--hf-args", "{args}"], "error: --config = 'tiny-cpu': cannot be combined"),
    (["--hf-args", "{ds}"], "holds none of the TrainingArguments fields"),
    (["--hf-args", "{corrupt}"], "not valid JSON"),
    (["--ds-config", "{missing}"], "error: --ds-config = "),
    (["--hf-args", "{args}", "--params", "0"], "error: --params = 0.0: must be a parameter count"),
    (["--config", "tiny-cpu", "--params", "1e6"], "only with --hf-args or --ds-config"),
], ids=["nothing to check", "config and hf-args", "not TrainingArguments", "corrupt", "missing", "params 0",
        "params with config"])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                         needle: str) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"learning_rate": 1e-3,')
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    paths = {"args": training_args(tmp_path), "ds": tmp_path / "ds.json", "corrupt": corrupt,
             "missing": tmp_path / "missing.json"}
    assert main(["doctor", *(arg.format(**paths) for arg in args)]) == 2
    line = only_line(capsys.readouterr().err)
    assert needle in line, line
