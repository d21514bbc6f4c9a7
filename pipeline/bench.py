"""``curriculum-pretrain bench``: throughput of every stage shape through the real pipeline, against a baseline.

For each distinct (micro-batch, seq_len) of the curriculum, with that stage's gradient accumulation:

- **pipeline**: the DeepSpeed engine with the config's kernels, the sampler drawing real batches, and the same
  forward/backward/step as ``train``; ``--warmup`` steps, then ``--steps`` timed steps (CUDA-synchronised).
- **baseline** (in the same process, same model config and shapes): a plain ``transformers`` model in bf16 with
  SDPA, ``torch.compile`` and ``torch.optim.AdamW(fused=True)``, the loop a careful engineer writes by hand.

Reported per shape: median tok/s, MFU (``flops_per_token`` of ``pipeline.model`` over the device's peak), median
step time, peak memory, and the pipeline/baseline ratio; plus the time to the first step and the stage-switch
cost (the first step of each shape minus a steady step: compilation and allocation). Written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from curriculum.errors import ConfigError
from curriculum.schedule import Stage, build_schedule
from pipeline.cli import load_config_from_args

PROCESS_START = time.perf_counter()


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps" if args.steps < 1 else "--warmup", args.steps if args.steps < 1 else args.warmup,
                          "steps must be >= 1 and warmup >= 0")
    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        raise ConfigError("--memory-fraction", args.memory_fraction, "must be in (0, 1]")
    config = load_config_from_args(args)
    from pipeline.train import build_engine, enter_stage, forward_backward, init_processes, peak_flops, use_bf16

    rank, world_size, device, log = init_processes()
    import torch

    from pipeline.batches import TokenSampler
    from pipeline.data import load_tokens, read_manifest
    from pipeline.ds_config import derive_ds_config
    from pipeline.model import matmul_params

    if args.memory_fraction is not None:
        if device.type != "cuda":
            raise ConfigError("--memory-fraction", args.memory_fraction, "needs a CUDA device")
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    schedule = build_schedule(config, world_size)
    manifest = read_manifest(config.data.dir)
    sampler = TokenSampler(load_tokens(config.data.dir, "train"), schedule.max_seq_len, config.run.seed)
    bf16 = use_bf16(config, device)
    engine, model, optimizer_name, kernels = build_engine(config, schedule, derive_ds_config(config, schedule, bf16),
                                                          manifest, device, log)
    n_matmul, n_layer, d_model = matmul_params(model), model.config.num_hidden_layers, model.config.hidden_size
    peak = config.run.peak_flops or peak_flops(device)
    # the first stage of each distinct (micro-batch, seq_len), in order
    shapes = list({(s.micro_batch, s.seq_len): s for s in reversed(schedule.stages)}.values())[::-1]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows, cursor, first_step_at = [], 0, None
    for stage in shapes:
        enter_stage(engine, stage)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            micro_batches = sampler.step_micro_batches(stage, cursor, rank, schedule.mode)
            cursor += stage.samples_per_step
            forward_backward(engine, micro_batches, device)
            engine.step()
            sync()
            times.append(time.perf_counter() - start)
            first_step_at = first_step_at or time.perf_counter() - PROCESS_START
        row = _row(stage, times[args.warmup:], times[0], n_matmul, n_layer, d_model, peak, world_size, device)
        if args.baseline:
            row["baseline"] = _baseline(config, model.config, stage, sampler, schedule.mode, rank, args, device,
                                        n_matmul, n_layer, d_model, peak, world_size)
            row["ratio"] = row["tok_per_s"] / row["baseline"]["tok_per_s"]
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the baseline's model and optimizer are gone; give their memory back
        rows.append(row)
        log(_format_row(row))
    profile = None
    if args.profile:
        stage = shapes[-1]  # the longest stage: the one the run spends most of its time in

        def one_step() -> None:
            nonlocal cursor
            micro_batches = sampler.step_micro_batches(stage, cursor, rank, schedule.mode)
            cursor += stage.samples_per_step
            forward_backward(engine, micro_batches, device)
            engine.step()
            sync()

        profile = profile_step(one_step, device)
        log(f"profile of one step at seq_len {stage.seq_len} (GPU time by kernel kind): " +
            ", ".join(f"{kind} {ms:.1f} ms ({100 * ms / profile['total_ms']:.0f} %)"
                      for kind, ms in profile["by_kind_ms"].items()))

    report = {
        "config": config.name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "world_size": world_size, "precision": "bf16" if bf16 else "fp32", "optimizer": optimizer_name,
        "kernels": {"liger": kernels.liger, "apex": kernels.apex, "compile": kernels.compile},
        "memory_fraction": args.memory_fraction, "steps": args.steps, "warmup": args.warmup,
        "time_to_first_step_s": first_step_at, "shapes": rows, "profile": profile,
        "stage_switch_cost_s": sum(r["switch_cost_s"] for r in rows[1:]),
        "torch": torch.__version__,
    }
    if rank == 0:
        out = Path(args.output or Path("runs") / f"{config.name}-bench.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"time to first step {first_step_at:.1f} s; stage switches (first step of each later shape minus a "
            f"steady step) {report['stage_switch_cost_s']:.2f} s in total; wrote {out}")
    return 0


KERNEL_KINDS = (  # substrings of CUDA kernel names, first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "sm90", "matmul", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copy / cast", ("memcpy", "memset", "copy", "cast", "to_copy")),
    ("fused elementwise (triton)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other elementwise")


def profile_step(step: Any, device: Any) -> dict[str, Any]:
    """GPU time of one training step by kernel kind, and the 15 kernels that take longest (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # nothing left to compile or allocate in the profiled step
    with profile(activities=activities) as prof:
        step()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_kind: dict[str, float] = {}
    for event in kernels:
        by_kind[kernel_kind(event.name)] = by_kind.get(kernel_kind(event.name), 0.0) + event.device_time / 1000
    top: dict[str, float] = {}
    for event in kernels:
        top[event.name] = top.get(event.name, 0.0) + event.device_time / 1000
    return {"total_ms": sum(by_kind.values()),
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15])}


def _row(stage: Stage, times: list[float], first: float, n_matmul: int, n_layer: int, d_model: int, peak: Any,
         world_size: int, device: Any) -> dict[str, Any]:
    import torch

    from pipeline.model import flops_per_token

    step_time = statistics.median(times)
    tok_per_s = stage.tokens_per_step / step_time
    return {
        "stage": stage.index, "seq_len": stage.seq_len, "micro_batch": stage.micro_batch,
        "grad_accum": stage.grad_accum, "global_batch": stage.global_batch, "tokens_per_step": stage.tokens_per_step,
        "step_time_s": step_time, "tok_per_s": tok_per_s,
        "mfu": flops_per_token(n_matmul, n_layer, d_model, stage.seq_len) * tok_per_s / (world_size * peak)
        if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "first_step_s": first, "switch_cost_s": max(0.0, first - step_time),
    }


def _baseline(config: Any, hf_config: Any, stage: Stage, sampler: Any, mode: str, rank: int, args: argparse.Namespace,
              device: Any, n_matmul: int, n_layer: int, d_model: int, peak: Any, world_size: int) -> dict[str, Any]:
    """The hand-written loop: transformers model, bf16, SDPA, torch.compile, fused AdamW, same shapes."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.run.seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    compiled = torch.compile(model)

    def step(micro_batches: list[tuple[Any, Any]]) -> None:
        for inputs, labels in micro_batches:
            logits = compiled(input_ids=inputs.to(device)).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten()) / len(micro_batches)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(sampler.step_micro_batches(stage, i * stage.samples_per_step, rank, mode))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = _row(stage, times[args.warmup:], times[0], n_matmul, n_layer, d_model, peak, world_size, device)
    return {k: row[k] for k in ("step_time_s", "tok_per_s", "mfu", "peak_memory_gib", "first_step_s")}


def _format_row(row: dict[str, Any]) -> str:
    text = (f"seq_len {row['seq_len']:>5} ({row['micro_batch']} x {row['grad_accum']}): {row['tok_per_s']:>10,.0f} tok/s"
            f"  step {row['step_time_s'] * 1000:8.1f} ms"
            + (f"  MFU {100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "")
            + (f"  peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""))
    if "baseline" in row:
        text += f"  | baseline {row['baseline']['tok_per_s']:,.0f} tok/s, ratio {row['ratio']:.2f}"
    return text
