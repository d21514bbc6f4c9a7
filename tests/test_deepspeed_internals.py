"""The DeepSpeed pin in setup.py, and the DeepSpeed internals ``pipeline/engine.py`` depends on (its docstring lists
them), on real engines: each exists and takes the values the engine writes.

Six engines on the CPU, built in one process of their own (gloo, one rank) by the project's ``build_engine`` from
``derive_ds_config``: fp32 (ZeRO stage 0), ZeRO stages 2 and 3, DeepSpeed's bf16 mode, fp32 under bf16 autocast, and
fp32 with DeepSpeed's throughput timer turned on in the overrides. Each enters a stage with clip 0.5 and trains three
steps of two micro-batches (10-30 s in all on 2 cores).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import REPO_ROOT, process_env
from packaging.requirements import Requirement

from pipeline.cli import setup_arguments

ENGINES = """\
import hashlib
import json

import torch
from deepspeed.accelerator import get_accelerator

from curriculum.loading import validate_config
from curriculum.schedule import build_schedule
from pipeline.batches import StepBatch
from pipeline.ds_config import derive_ds_config
from pipeline.engine import build_engine, init_processes, loading_universal

# every device synchronisation DeepSpeed asks for (on the CPU its accelerator's is a no-op, so count the calls)
accelerator = get_accelerator()
device_syncs = []
accelerator.synchronize = lambda *args, **kwargs: device_syncs.append(1)

configs = {}
for label, precision, zero_stage in [("fp32", "fp32", 0), ("zero2", "fp32", 2), ("zero3", "fp32", 3),
                                     ("bf16", "bf16", 0), ("bf16-autocast", "bf16-autocast", 0),
                                     ("fp32-timer-on", "fp32", 0)]:
    configs[label] = precision, validate_config({
        "model": {"arch": "llama", "preset": "tiny", "overrides": {
            "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_key_value_heads": 2}},
        # 4 sequences of 16 tokens per step: 2 micro-batches of 2
        "curriculum": {"stages": [{"until_step": 1, "seq_len": 16, "global_batch": 4, "micro_batch": 2,
                                   "grad_clip": 0.5}]},
        # ZeRO-3: every parameter partitioned, however small (by default those under 100K elements are not)
        "deepspeed": {"overrides": {"zero_optimization": {"stage": zero_stage} if zero_stage < 3 else
                                    {"stage": 3, "stage3_param_persistence_threshold": 0},
                                    # the others get the derived config's timer setting
                                    **({"timers": {"throughput": {"enabled": True}}} if label == "fp32-timer-on"
                                       else {})}},
        "kernels": {"compile": False}})
processes = init_processes(configs["fp32"][1])
found = {}
for label, (precision, config) in configs.items():
    schedule = build_schedule(config)
    engine = build_engine(config, schedule, derive_ds_config(config, schedule, precision),
                          {"tokenizer": {"vocab_size": 64, "eot_id": 0}}, processes)
    stage = schedule.stages[0]
    engine.enter_stage(stage)
    engine.set_lr(1e-3)
    rows = torch.randint(0, 64, (stage.grad_accum, stage.micro_batch, stage.seq_len + 1),
                         generator=torch.Generator().manual_seed(0))
    batch = StepBatch(step=0, cursor=0, micro_batches=[(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows],
                      digest=b"", tokens=stage.global_batch * stage.seq_len)
    device_syncs.clear()
    for _ in range(3):  # DeepSpeed's throughput timer starts timing (and synchronising) at the third step
        values, _ = engine.train_step(batch)
    ds = engine.ds
    found[label] = {
        "optimizer": type(ds.optimizer).__name__,
        "gradient_clipping": ds._config.gradient_clipping,
        "clip_grad": getattr(ds.optimizer, "clip_grad", None),
        "norm_follows": engine.norm_follows,
        "grad_norm": values.grad_norm,
        "get_global_grad_norm": callable(ds.get_global_grad_norm),
        "set_gradient_accumulation_boundary": callable(ds.set_gradient_accumulation_boundary),
        "enable_backward_allreduce": ds.enable_backward_allreduce,
        "torch_autocast_enabled": ds._config.torch_autocast_enabled,
        "load_universal_checkpoint": ds._config.load_universal_checkpoint,
        "reads_load_universal": ds.load_universal_checkpoint(),
        # after a step ZeRO-3 leaves each rank's module with empty placeholders: params_sha256 gathers first
        "module_sizes": sorted({tuple(t.shape) == (0,) for t in ds.module.state_dict().values()}),
        "params_sha256_of_nothing": engine.params_sha256() == hashlib.sha256().hexdigest(),
        "device_syncs": len(device_syncs),
    }
    with loading_universal(ds):
        found[label]["reads_load_universal_inside"] = ds.load_universal_checkpoint()
    found[label]["reads_load_universal_after"] = ds.load_universal_checkpoint()
print("ENGINES " + json.dumps(found))
"""


def test_the_installed_deepspeed_is_inside_the_pinned_range() -> None:
    (pin,) = [Requirement(r) for r in setup_arguments(REPO_ROOT / "setup.py")["install_requires"]
              if Requirement(r).name == "deepspeed"]
    assert pin.specifier.contains(importlib.metadata.version("deepspeed")), (
        f"deepspeed {importlib.metadata.version('deepspeed')} is outside setup.py's pin {pin}")
    assert any(spec.operator == "<" for spec in pin.specifier), f"{pin} has no upper bound"


@pytest.fixture(scope="module")
def engines() -> dict[str, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-c", ENGINES], cwd=REPO_ROOT, env=process_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ENGINES "))
    return json.loads(line.removeprefix("ENGINES "))


def test_every_engine_has_the_internals_the_pipeline_uses(engines: dict[str, dict[str, Any]]) -> None:
    for label, found in engines.items():
        assert found["get_global_grad_norm"] and found["set_gradient_accumulation_boundary"], label
        assert isinstance(found["enable_backward_allreduce"], bool), label
        assert found["grad_norm"] is not None and found["grad_norm"] > 0, label
        assert found["params_sha256_of_nothing"] is False, label
        # a load reads the flag from the config each time: on inside loading_universal only
        assert (found["load_universal_checkpoint"], found["reads_load_universal"], found["reads_load_universal_inside"],
                found["reads_load_universal_after"]) == (False, False, True, False), label


@pytest.mark.parametrize(("label", "clipping", "clip_grad", "autocast"), [
    ("fp32", 0.0, None, False),  # the engine clips itself, with the norm it computed before the update
    ("zero2", 0.5, 0.5, False),  # the ZeRO optimizer clips with its own copy of the clip
    ("zero3", 0.5, 0.5, False),  # so does ZeRO-3's
    ("bf16", 0.5, 0.5, False),  # so does DeepSpeed's bf16 (on the CPU: fp16-unfused) optimizer wrapper
    ("bf16-autocast", 0.0, None, True),
])
def test_the_engine_writes_the_stage_clip_where_deepspeed_reads_it(engines: dict[str, dict[str, Any]], label: str,
                                                                    clipping: float, clip_grad: Any,
                                                                    autocast: bool) -> None:
    found = engines[label]
    assert (found["gradient_clipping"], found["clip_grad"], found["torch_autocast_enabled"]) == (clipping, clip_grad,
                                                                                                 autocast), found
    assert found["norm_follows"] == (label in ("zero2", "zero3", "bf16")), found  # the norm from get_global_grad_norm()


def test_zero3_leaves_placeholders_in_the_module_after_a_step(engines: dict[str, dict[str, Any]]) -> None:
    """What ``Engine.params_sha256`` gathers around: under ZeRO-3 every tensor of the module's state_dict is an
    empty placeholder after a step (elsewhere none is), and the hash is still of the parameters."""
    assert engines["zero3"]["module_sizes"] == [True]
    assert all(found["module_sizes"] == [False] for label, found in engines.items() if label != "zero3")


def test_deepspeed_never_synchronises_the_device_in_a_step(engines: dict[str, dict[str, Any]]) -> None:
    """With the derived config DeepSpeed never calls its accelerator's ``synchronize()`` in a step (on the CPU, with
    the default template): its throughput timer, on by default, would from the third step on, at every micro-batch's
    forward and step, and the CPU could not queue the next micro-batch while the device runs this one; the engine
    whose overrides turn the timer on shows it, 4 times in its third step. (Host reads of values, such as the loop's
    one ``.tolist()`` or the bf16 and ZeRO optimizers' overflow checks, are not counted here.)"""
    assert {label: found["device_syncs"] for label, found in engines.items()} == {
        **dict.fromkeys(engines, 0), "fp32-timer-on": 4}


def test_one_rank_without_zero_skips_the_gradient_all_reduce(engines: dict[str, dict[str, Any]]) -> None:
    assert engines["fp32"]["enable_backward_allreduce"] is False
    assert engines["bf16-autocast"]["enable_backward_allreduce"] is False
