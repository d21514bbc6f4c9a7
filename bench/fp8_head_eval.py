"""Held-out loss of finished runs' exported models through the bf16 output layer and through the FP8 one
(``kernels.fp8_lm_head``), on the run's own evaluation set: whether a gap between an FP8-trained run and its bf16
twin is in the trained weights or in how the loss is measured (docs/BENCHMARKS.md, "The output layer in FP8"):

    PYTHONPATH=. python3 bench/fp8_head_eval.py OUT.json RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished ``train`` run with ``run.export: true``, trained with ``run.precision: bf16-autocast``
(the GPU default); its model runs as ``train`` evaluates it, fp32 weights under bf16 autocast, but eager, on the GPU
where there is one (on a CPU the FP8 matmuls run slowly). On the runs in docs/BENCHMARKS.md the bf16 figure matched
the run's own final held-out loss within 0.0001.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from curriculum.schedule import build_schedule
from pipeline.batches import load_run_data
from pipeline.export import run_config
from pipeline.kernels import CausalLMWithLoss
from pipeline.rundir import RunDir


def held_out_losses(run_path: str, device: torch.device) -> dict[str, float]:
    """The run's final model's mean held-out loss with each output layer, over its ``run.eval_batches``."""
    run_dir = RunDir(run_path)
    config = run_config(run_dir)
    batches = load_run_data(config, build_schedule(config), rank=0, world_size=1, device=device).eval_batches
    lm = AutoModelForCausalLM.from_pretrained(run_dir.final, torch_dtype=torch.float32).to(device).eval()
    losses = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        module, total, rows = CausalLMWithLoss(lm, fused_cross_entropy=False, fp8_lm_head=fp8), 0.0, 0
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            for inputs, labels in batches:
                total += module(inputs, labels).double().item() * inputs.shape[0]
                rows += inputs.shape[0]
        losses[name] = total / rows
    return losses


def main(out_path: str, run_paths: list[str]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {}
    for path in run_paths:
        report[path] = held_out_losses(path, device)
        print(path, json.dumps(report[path]), flush=True)
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
