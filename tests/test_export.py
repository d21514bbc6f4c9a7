"""``export``: a run's checkpoint as a ``save_pretrained`` directory, and ``checkpoints/best`` as a pointer.

One tiny run trains 8 steps, steps counted from 0:

    stage  steps  seq_len  global batch  peak LR
    0      0-3    32       4             3e-3
    1      4-7    64       2             1.0    (far too high: every later evaluation is worse)

Evaluations after steps 2, 5 and 7, checkpoints every 4 steps and at the end, keeping 1. The evaluation after step 2
is the best, so step00000003 is saved for ``best`` only; the periodic saves at 4 and 8 would prune it but for the
pointer. The run leaves exactly ``step00000003`` (best) and ``step00000008`` (latest).

Exported models are checked against the run itself: their loss on the run's evaluation batch is the eval loss the
run logged at that step, and their weights are the module's weights in the checkpoint file. A second run trains
under ZeRO-2 on the CPU (gloo, torch AdamW); a ZeRO-3 checkpoint is made by a DeepSpeed engine directly (the
trainer's own ZeRO-3 runs export at their end: tests/test_train.py). ``TRANSFORMERS4_PATH`` names a directory
holding transformers 4.x (``pip install --target DIR transformers==4.46.3``, as the README test command does) that a
second interpreter puts ahead of this environment's transformers 5 to load an export with (not a ``CPT_*``
variable: those override the run config).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, TINY_LLAMA_YAML, process_env

CONFIG_YAML = """\
name: tiny-export
""" + TINY_LLAMA_YAML + """\
curriculum:
  base_lr: 3.0e-3
  lr_scaling: {{rule: none}}
  stages:
    - {{until_step: 4, seq_len: 32, global_batch: 4, micro_batch: 2, warmup_steps: 1}}
    - {{until_step: 8, seq_len: 64, global_batch: 2, micro_batch: 1, warmup_steps: 1, lr: 1.0}}
guard:
  enabled: false
run:
  seed: 1234
  eval_every: 3
  eval_batches: 1
  eval_batch: 2
  checkpoint_every: 4
  keep_checkpoints: 1
  tensorboard: false
"""
MAX_SEQ_LEN = 64
EVAL_BATCH = 2
BEST, LATEST = "step00000003", "step00000008"
ROPE_THETA = 20000.0
TIMEOUT_S = 300
EXPORTED_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json"]
TRANSFORMERS4_PATH = os.environ.get("TRANSFORMERS4_PATH")

LOAD_AND_RUN = """\
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tokenizer("def add(a, b):\\n    return a + b\\n", return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({"transformers": transformers.__version__, "model_max_length": tokenizer.model_max_length,
                  "eos_token": tokenizer.eos_token, "ids": ids[0].tolist(), "logits": logits[0].tolist()}))
"""
"""Loads an exported directory with the Auto classes of whatever transformers runs it; prints the token ids and
logits of one line of Python."""

ZERO3_CHECKPOINT = """\
import json, os, sys
from pathlib import Path

import deepspeed, torch
from tokenizers import Tokenizer

from curriculum.loading import validate_config
from curriculum.schedule import build_schedule
from pipeline.data import EOT_TOKEN, id_bound
from pipeline.environment import free_port
from pipeline.kernels import CausalLMWithLoss
from pipeline.model import build_model

run_dir = Path(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
deepspeed.init_distributed(dist_backend="gloo")
config = validate_config(json.loads((run_dir / "config.json").read_text()))
tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
lm = build_model(config.model, id_bound(tokenizer), build_schedule(config).max_seq_len,
                 tokenizer.token_to_id(EOT_TOKEN))
module = CausalLMWithLoss(lm, fused_cross_entropy=False)
engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2), config={
    "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
rows = torch.randint(0, id_bound(tokenizer), (2, 33))
engine.backward(engine(rows[:, :-1], rows[:, 1:]))
engine.step()  # one update: the weights saved are not the initial ones
engine.save_checkpoint(str(run_dir / "checkpoints"), tag="step00000001")  # DeepSpeed writes `latest` too
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    torch.save({key: value.clone() for key, value in lm.state_dict().items()}, run_dir / "gathered.pt")
"""
"""A ZeRO-3 checkpoint of one update in ``RUN_DIR/checkpoints``, for the model of ``RUN_DIR``'s config, and the
weights gathered from the engine's partitions in ``RUN_DIR/gathered.pt``."""


def run_process(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=process_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {args}\n{proc.stdout[-4000:]}"
    return proc.stdout


def export(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``curriculum-pretrain export RUN_DIR ARGS`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(run_dir), *args], cwd=REPO_ROOT,
                          env=process_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def exported(run_dir: Path, output: Path, *args: str) -> Path:
    result = export(run_dir, "--output", str(output), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"to {output}: fp32 weights, tokenizer with model_max_length {MAX_SEQ_LEN}" in result.stdout
    return output


def eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "eval"]


def eval_loss(model_dir: Path, data_dir: Path) -> float:
    """The loss of an exported model on the run's evaluation batch, as ``Engine.evaluate`` computes it."""
    from transformers import AutoModelForCausalLM

    from pipeline.batches import eval_batches
    from pipeline.data import load_tokens

    ((inputs, labels),) = eval_batches(load_tokens(data_dir, "val"), MAX_SEQ_LEN, EVAL_BATCH, 1, 0, 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).item()


def assert_weights(model_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    """The exported model holds exactly ``expected``, in fp32."""
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert sorted(weights) == sorted(expected)
    for key, tensor in expected.items():
        assert weights[key].dtype == torch.float32, key
        assert torch.equal(weights[key], tensor.float()), key


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The transformers model's weights as the engine saved them (ZeRO 0-2: the module in one file)."""
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {key.removeprefix("lm."): tensor for key, tensor in module.items()}


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def assert_one_error_line(result: subprocess.CompletedProcess[str], starts: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(errors) == 1 and errors[0].startswith(starts), result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def config(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny-export.yaml"
    path.write_text(CONFIG_YAML.format(data_dir=data_dir))
    return path


@pytest.fixture(scope="module")
def run(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RoPE theta 20,000, not the 10,000 transformers 4.x assumes when config.json does not say."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    run_process("-m", "pipeline.cli", "train", "--config", str(config), "--output-dir", str(run_dir),
                "--set", f"model.overrides.rope_theta={ROPE_THETA}")
    return run_dir


@pytest.fixture(scope="module")
def zero2_run(config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    output = run_process("-m", "pipeline.cli", "train", "--config", str(config), "--output-dir", str(run_dir),
                         "--set", "deepspeed.template=zero2")
    return run_dir, output


# --------------------------------------------------------------------------------------------------- best


def test_best_is_a_pointer_that_pruning_keeps(run: Path) -> None:
    """The best evaluation (after step 2) saved step00000003 for ``best`` only; ``best`` is a file naming it (no
    second copy), and the periodic saves at 4 and 8 with keep_checkpoints 1 pruned step00000004 but not it."""
    losses = {row["step"]: row["eval_loss"] for row in eval_rows(run)}
    assert sorted(losses) == [2, 5, 7]
    assert min(losses, key=losses.get) == 2, losses  # the premise: the LR of stage 1 makes every later one worse
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(("step", "best", "latest"))) == \
        ["best", "latest", BEST, LATEST]
    assert (checkpoints / "best").is_file() and (checkpoints / "best").read_text() == BEST
    assert (checkpoints / "latest").read_text() == LATEST
    assert json.loads((checkpoints / BEST / "run_state.json").read_text())["best_eval_loss"] == losses[2]


# --------------------------------------------------------------------------------------------------- export


def test_export_latest_is_the_final_model(run: Path, data_dir: Path, tmp_path: Path) -> None:
    """``export`` (latest by default) writes the files ``final/`` holds, byte for byte (train exports through the
    same function); its weights are the checkpoint's, its loss on the evaluation batch the run's last eval loss."""
    output = exported(run, tmp_path / "latest")
    assert sorted(p.name for p in output.iterdir()) == EXPORTED_FILES
    assert file_bytes(output) == file_bytes(run / "final")
    assert_weights(output, checkpoint_weights(run / "checkpoints" / LATEST))
    assert eval_loss(output, data_dir) == pytest.approx(eval_rows(run)[-1]["eval_loss"], rel=1e-5)
    assert not list(tmp_path.glob("*.partial"))


def test_export_best_and_a_step(run: Path, data_dir: Path, tmp_path: Path) -> None:
    """``--checkpoint best`` exports the model of the best evaluation (its loss on the evaluation batch is that
    eval loss), loadable with the Auto classes; its tokenizer says the longest stage and uses <|endoftext|>; a step
    number and a tag name the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    best = exported(run, tmp_path / "best", "--checkpoint", "best")
    assert_weights(best, checkpoint_weights(run / "checkpoints" / BEST))
    assert eval_loss(best, data_dir) == pytest.approx(eval_rows(run)[0]["eval_loss"], rel=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(best)
    assert tokenizer.model_max_length == MAX_SEQ_LEN
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(best)
    assert model.config.max_position_embeddings == MAX_SEQ_LEN and model.config.vocab_size == 512
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 512)
    config = json.loads((best / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == ROPE_THETA  # for transformers 4.x
    assert json.loads((best / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    by_step = exported(run, tmp_path / "step", "--checkpoint", "3")
    by_tag = exported(run, tmp_path / "tag", "--checkpoint", BEST)
    assert file_bytes(by_step) == file_bytes(by_tag) == file_bytes(best)


def test_zero2_run_on_cpu_exports(zero2_run: tuple[Path, str], data_dir: Path, tmp_path: Path) -> None:
    """A ZeRO-2 run on the CPU (gloo, torch AdamW: no DeepSpeed op to build) keeps the module's weights in
    mp_rank_00_model_states.pt; its export is the final model: the checkpoint's weights, the last eval loss, the
    files of ``final/``."""
    run_dir, output = zero2_run
    assert "optimizer torch AdamW; fp32 on cpu x 1; ZeRO stage 2;" in output, output
    assert (run_dir / "checkpoints" / LATEST / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    exported_dir = exported(run_dir, tmp_path / "zero2")
    assert_weights(exported_dir, checkpoint_weights(run_dir / "checkpoints" / LATEST))
    assert eval_loss(exported_dir, data_dir) == pytest.approx(eval_rows(run_dir)[-1]["eval_loss"], rel=1e-5)
    assert file_bytes(exported_dir) == file_bytes(run_dir / "final")


def test_zero3_checkpoint_exports(run: Path, tmp_path: Path) -> None:
    """A checkpoint of a ZeRO-3 engine (client torch AdamW, one process on gloo), whose parameters are partitioned
    over the optimizer files: the export holds the weights gathered from the engine."""
    run_dir = tmp_path / "zero3-run"
    run_dir.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(run / name, run_dir / name)
    script = tmp_path / "zero3_checkpoint.py"
    script.write_text(ZERO3_CHECKPOINT)
    run_process(str(script), str(run_dir))
    assert (run_dir / "checkpoints" / "step00000001" / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    assert not (run_dir / "checkpoints" / "step00000001" / "mp_rank_00_model_states.pt").exists()
    output = exported(run_dir, tmp_path / "zero3")
    assert_weights(output, torch.load(run_dir / "gathered.pt", weights_only=True))


def test_a_run_directory_without_its_tokenizer_copy_uses_the_data_directory(run: Path, tmp_path: Path) -> None:
    """Run directories written before train copied tokenizer.json take the tokenizer from ``data.dir``."""
    old_run = tmp_path / "old-run"
    shutil.copytree(run, old_run, ignore=shutil.ignore_patterns("tokenizer.json", "final"))
    output = exported(old_run, tmp_path / "out")
    assert file_bytes(output) == file_bytes(run / "final")


@pytest.mark.skipif(TRANSFORMERS4_PATH is None,
                    reason="set TRANSFORMERS4_PATH to a directory with transformers 4.x (pip install --target)")
def test_the_export_loads_in_transformers_4(run: Path, tmp_path: Path) -> None:
    """transformers 4.x loads the export (tokenizer and model) and computes the logits transformers 5 does."""
    output = exported(run, tmp_path / "best", "--checkpoint", "best")
    loaded = {}
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    for name, first in (("4", [str(Path(TRANSFORMERS4_PATH).resolve())]), ("5", [])):
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(first + inherited)}
        proc = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(output)], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env)
        assert proc.returncode == 0, f"transformers {name}: {proc.stderr[-3000:]}"
        loaded[name] = json.loads(proc.stdout.splitlines()[-1])
    assert loaded["4"]["transformers"].startswith("4.") and loaded["5"]["transformers"].startswith("5.")
    for key in ("model_max_length", "eos_token", "ids"):
        assert loaded["4"][key] == loaded["5"][key], key
    assert loaded["4"]["model_max_length"] == MAX_SEQ_LEN
    torch.testing.assert_close(torch.tensor(loaded["4"]["logits"]), torch.tensor(loaded["5"]["logits"]),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(run: Path, tmp_path: Path) -> None:
    """A run directory without checkpoints, an unknown ``--checkpoint``, a ``best`` naming a checkpoint that is
    gone, an output that is a file or a non-empty directory, and a data directory that is gone when the run
    directory has no tokenizer.json: exit status 2, one ``error:`` line, no output written."""
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(run / "config.json", untrained / "config.json")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    not_empty = tmp_path / "not-empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("keep me")
    best_gone = tmp_path / "best-gone"
    shutil.copytree(run, best_gone, ignore=shutil.ignore_patterns(BEST, "final"))
    data_gone = tmp_path / "data-gone"
    shutil.copytree(run, data_gone, ignore=shutil.ignore_patterns("tokenizer.json", "final"))
    config = json.loads((data_gone / "config.json").read_text())
    config["data"]["dir"] = str(tmp_path / "no-such-data")
    (data_gone / "config.json").write_text(json.dumps(config))
    output = tmp_path / "output"

    cases = [
        (untrained, [], f"error: RUN_DIR = '{untrained}': has no checkpoint"),
        (run, ["--checkpoint", "5"], f"error: --checkpoint = '5': no such checkpoint; give latest, best, a step or "
                                     f"tag of the run's checkpoints ({BEST}, {LATEST})"),
        (run, ["--checkpoint", "final"], "error: --checkpoint = 'final': no such checkpoint"),
        (best_gone, ["--checkpoint", "best"], f"error: --checkpoint = 'best': {best_gone / 'checkpoints' / 'best'} "
                                              f"names {BEST}, which is not there"),
        (tmp_path / "nowhere", [], f"error: RUN_DIR = '{tmp_path / 'nowhere'}': has no config.json"),
        (data_gone, [], f"error: data.dir = '{tmp_path / 'no-such-data'}': does not exist, and {data_gone} has no "
                        "tokenizer.json"),
    ]
    for run_dir, args, starts in cases:
        assert_one_error_line(export(run_dir, "--output", str(output), *args), starts)
        assert not output.exists() and not output.with_name("output.partial").exists(), starts
    assert_one_error_line(export(run, "--output", str(a_file)), f"error: --output = '{a_file}': is a file")
    assert a_file.read_text() == "keep me"
    assert_one_error_line(export(run, "--output", str(not_empty)), f"error: --output = '{not_empty}': is not empty")
    assert [p.name for p in not_empty.iterdir()] == ["keep.txt"]


def test_a_damaged_checkpoint_and_an_output_below_a_file_are_one_line(run: Path, tmp_path: Path) -> None:
    """A checkpoint whose weights file is cut short (a copy interrupted) is one line naming the checkpoint and the
    file, before the model is built, instead of torch's zip-reader RuntimeError; an output path below a file is one
    line before anything is read, instead of a NotADirectoryError when the files are written."""
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("final"))
    latest = damaged / "checkpoints" / LATEST
    weights = latest / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    output = tmp_path / "output"
    assert_one_error_line(export(damaged, "--output", str(output)),
                          f"error: --checkpoint = '{latest}': mp_rank_00_model_states.pt is damaged (not a whole "
                          "torch.save archive: ")
    assert not output.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert_one_error_line(export(run, "--output", str(a_file / "sub")),
                          f"error: --output = '{a_file / 'sub'}': {a_file} is a file; give a directory")
    assert a_file.read_text() == "keep me"
