"""``curriculum-pretrain bench``: throughput of every stage shape through the real pipeline, against the loop a
careful engineer writes by hand; and the same figures read from a real ``train`` run.

    curriculum-pretrain bench --config X [--steps 20 --warmup 5] [--no-baseline] [--profile]
    curriculum-pretrain bench --from-train RUN_DIR [--against BENCH_JSON | --against REFERENCE_RUN_DIR]

For each distinct (micro-batch, seq_len) of the curriculum, with that stage's gradient accumulation:

- **pipeline**: the engine ``train`` builds, its warm-up (every compiled graph built first, timed), then
  ``--warmup`` and ``--steps`` timed steps of ``Engine.train_step`` on batches from the prefetcher, timed as
  ``train`` times them: from one step's synchronisation to the next.
- **baseline** (same process, model config, shapes and batches): ``transformers`` with its stock SDPA attention,
  fp32 weights under ``torch.autocast`` bf16, the loss inside ``torch.compile``, ``torch.optim.AdamW(fused=True)``,
  gradient clipping at 1.0 and the loss read once per step.

Reported per shape: median tok/s, MFU (``flops_per_token`` of ``pipeline.model`` over the device's peak), median
step time, peak memory (allocated since the shape began, and reserved by the caching allocator: with CUDA graphs
only the latter includes the graphs' memory pool), the first step's extra cost and the pipeline/baseline ratio;
plus the warm-up (compile) time, the time to the first step and the stage-switch cost (near 0 once the warm-up
built every graph). JSON.

``--from-train`` reports, from a run directory's metrics: per stage median tok/s (of the job and per GPU) and MFU,
the compile/warm-up time, the evaluation time, the first process's start-up before its first step (imports,
engine, model, data), the rest (checkpoint saves, rollbacks, a resumed process's start-up) and the share of the wall
time that is not training steps. With ``--against BENCH_JSON`` it sets each stage beside the bench figure of the
same shape; with ``--against`` another run directory (the same recipe on fewer GPUs, say) it gives each stage's
scaling efficiency: this run's tok/s per GPU over the reference run's, stage by stage (stages matched by their
seq_len and global batch).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

from curriculum.errors import ConfigError
from curriculum.schedule import Stage, build_schedule

PROCESS_START = time.perf_counter()


HELP = "tok/s, MFU and memory of every stage shape, against a hand-written baseline loop"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import add_config_arguments, finite_float

    add_config_arguments(parser, required=False)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage shape (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the hand-written baseline loop")
    parser.add_argument("--memory-fraction", type=finite_float, default=None,
                        help="cap this process's GPU memory (e.g. 0.17 of a 141 GB H200 = a 24 GB card)")
    parser.add_argument("--output", default=None, help="JSON path (default runs/<name>-bench.json)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of the longest stage: GPU time by kernel kind, the kernels that "
                             "take longest with their launches, and the time no kernel runs with its longest gaps "
                             "(torch.profiler)")
    parser.add_argument("--from-train", default=None, metavar="RUN_DIR",
                        help="report the figures of a train run directory instead of measuring")
    parser.add_argument("--against", default=None, metavar="BENCH_JSON|RUN_DIR",
                        help="with --from-train: a bench JSON to compare each stage's tok/s with, or a reference run "
                             "directory for each stage's scaling efficiency (tok/s per GPU over the reference's)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from pipeline.commands import load_config_from_args, output_file

    if args.from_train is not None:
        run_dir = Path(args.from_train)
        output = output_file("--output", args.output or run_dir / "bench-from-train.json")
        return from_train(run_dir, Path(args.against) if args.against else None, output)
    if args.config is None:
        raise ConfigError("--config", None, "required (or --from-train RUN_DIR)")
    if args.against is not None:
        raise ConfigError("--against", args.against, "only with --from-train")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps" if args.steps < 1 else "--warmup", args.steps if args.steps < 1 else args.warmup,
                          "steps must be >= 1 and warmup >= 0")
    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        raise ConfigError("--memory-fraction", args.memory_fraction, "must be in (0, 1]")
    config = load_config_from_args(args)
    return bench(config, args, output_file("--output", args.output or Path("runs") / f"{config.name}-bench.json"))


def bench(config: Any, args: argparse.Namespace, out: Path) -> int:
    import torch

    from pipeline.batches import Prefetcher, load_run_data
    from pipeline.ds_config import derive_ds_config
    from pipeline.engine import (build_engine, close_processes, device_name, device_precision,
                                 first_stage_per_shape, init_processes, peak_flops)

    processes = init_processes(config)
    device, log = processes.device, processes.log
    if args.memory_fraction is not None:
        if device.type != "cuda":
            raise ConfigError("--memory-fraction", args.memory_fraction, "needs a CUDA device")
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    schedule = build_schedule(config, processes.world_size)
    data = load_run_data(config, schedule, processes.rank, processes.world_size, device)
    precision = device_precision(config, device)
    engine = build_engine(config, schedule, derive_ds_config(config, schedule, precision), data.manifest, processes)
    loader = Prefetcher(data.sampler, schedule, processes.rank, device)
    peak = config.run.peak_flops or peak_flops(device)
    monitor = engine.monitor
    warmup = engine.warm_up(schedule, lambda stage, cursor: loader.load(stage, -1, cursor), data.eval_batches) \
        if monitor is not None else {}
    if warmup and monitor is not None:
        log(f"warm-up: {len(monitor.graphs)} graphs in {engine.warmup_s:.1f} s" + monitor.describe_caches())
    engine.ds.train()
    rows: list[dict[str, Any]] = []
    first_step_at = None
    for stage in first_stage_per_shape(schedule):
        engine.enter_stage(stage)
        engine.set_lr(stage.peak_lr)
        _reset_peak_memory(device)
        prefetcher = Prefetcher(data.sampler, schedule, processes.rank, device, fixed_stage=stage)
        losses: list[float] = []
        shape_start = time.perf_counter()
        times = _timed_steps(lambda step: losses.append(engine.train_step(
            prefetcher.get(step, step * stage.samples_per_step))[0].loss), args.warmup + args.steps)
        first_step_at = first_step_at or shape_start + times[0] - PROCESS_START
        row = _row(stage, times[args.warmup:], engine, peak, device)
        # the first step of a shape beyond a steady one: what entering the stage costs (compiling, allocating)
        row["first_step_s"], row["switch_cost_s"] = times[0], max(0.0, times[0] - row["step_time_s"])
        row["losses"] = losses  # every step's, warm-up included: variants of one config must agree
        if args.baseline:
            row["baseline"] = _baseline(engine, stage, prefetcher, args.warmup, args.steps, peak, device)
            row["ratio"] = row["tok_per_s"] / row["baseline"]["tok_per_s"]
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the baseline's model and optimizer are gone; give their memory back
        prefetcher.close()
        rows.append(row)
        log(_format_row(row))
    profile = None
    if args.profile:
        stage = first_stage_per_shape(schedule)[-1]  # the longest stage: the one a run spends most time in
        engine.enter_stage(stage)
        batch = loader.load(stage, 0, 0)  # on the device before the profile, as train's read-ahead has it
        if batch.ready is not None:
            batch.ready.synchronize()
        profile = profile_step(lambda: engine.train_step(batch), device)
        log(f"profile of one step at seq_len {stage.seq_len} (GPU time by kernel kind): "
            + ", ".join(f"{kind} {ms:.1f} ms ({100 * ms / profile['total_ms']:.0f} %)"
                        for kind, ms in profile["by_kind_ms"].items())
            + (f"; no kernel running for {profile['idle_ms']:.1f} of the kernels' {profile['span_ms']:.1f} ms"
               if profile["span_ms"] else ""))
    loader.close()
    report = {
        "config": config.name, "device": device_name(device), "world_size": processes.world_size,
        "precision": precision, "optimizer": engine.optimizer_name,
        "kernels": {"fused_cross_entropy": engine.kernels.fused_cross_entropy, "liger": engine.kernels.liger,
                    "apex": engine.kernels.apex, "compile": engine.kernels.compile,
                    "cuda_graphs": engine.kernels.cuda_graphs,
                    "coordinate_descent_tuning": engine.kernels.coordinate_descent_tuning,
                    "fp8_lm_head": engine.kernels.fp8_lm_head,
                    "logits_gradient_in_forward": engine.kernels.logits_gradient_in_forward,
                    "fused_mlp": engine.kernels.fused_mlp},
        "memory_fraction": args.memory_fraction, "steps": args.steps, "warmup": args.warmup,
        "warmup_s": engine.warmup_s, "warmup_by_shape_s": warmup, "time_to_first_step_s": first_step_at,
        "stage_switch_cost_s": sum(row["switch_cost_s"] for row in rows[1:]),
        "graphs": monitor.graphs if monitor is not None else [],
        "compile_caches": monitor.compile_caches if monitor is not None else None,
        "shapes": rows, "profile": profile, "torch": torch.__version__,
    }
    if processes.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {out}")
    close_processes()
    return 0


def _reset_peak_memory(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _timed_steps(step: Callable[[int], Any], count: int) -> list[float]:
    """Seconds per step, each from the previous step's end (its synchronisation) to its own, as ``train`` times
    them. A step must synchronise with the device before it returns."""
    times, mark = [], time.perf_counter()
    for i in range(count):
        step(i)
        now = time.perf_counter()
        times.append(now - mark)
        mark = now
    return times


def _row(stage: Stage, times: list[float], engine: Any, peak: Optional[float], device: Any) -> dict[str, Any]:
    import torch

    step_time = statistics.median(times)
    tok_per_s = stage.tokens_per_step / step_time
    return {
        "stage": stage.index, "seq_len": stage.seq_len, "micro_batch": stage.micro_batch,
        "grad_accum": stage.grad_accum, "global_batch": stage.global_batch, "tokens_per_step": stage.tokens_per_step,
        "step_time_s": step_time, "tok_per_s": tok_per_s, "mfu": engine.mfu(stage.seq_len, tok_per_s, peak),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        # what the caching allocator holds: with CUDA graphs their memory pool, allocated during the warm-up (before
        # the peak was reset) and so missing from the allocated peak, is in it
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
    }


def _baseline(engine: Any, stage: Stage, prefetcher: Any, warmup: int, steps: int, peak: Optional[float],
              device: Any) -> dict[str, Any]:
    """The hand-written loop (see the module docstring) on the same shapes and batches."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # a copy: from_config sets the attention implementation on the config it is given
    model = AutoModelForCausalLM.from_config(copy.deepcopy(engine.lm.config), attn_implementation="sdpa").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    on_cuda = device.type == "cuda"

    @torch.compile
    def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=on_cuda):
            logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def step(index: int) -> None:
        micro_batches = prefetcher.get(index, index * stage.samples_per_step).micro_batches
        for inputs, labels in micro_batches:
            loss = loss_of(inputs, labels) / len(micro_batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loop logs the loss: one synchronisation per step

    _reset_peak_memory(device)
    times = _timed_steps(step, warmup + steps)[warmup:]
    row = _row(stage, times, engine, peak, device)
    return {k: row[k] for k in ("step_time_s", "tok_per_s", "mfu", "peak_memory_gib", "peak_reserved_gib")}


def _format_row(row: dict[str, Any]) -> str:
    text = (f"seq_len {row['seq_len']:>5} ({row['micro_batch']} x {row['grad_accum']}): "
            f"{row['tok_per_s']:>10,.0f} tok/s"
            f"  step {row['step_time_s'] * 1000:8.1f} ms"
            + (f"  MFU {100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "")
            + (f"  peak {row['peak_memory_gib']:.1f} GiB ({row['peak_reserved_gib']:.1f} reserved)"
               if row["peak_memory_gib"] is not None else ""))
    if "baseline" in row:
        text += f"  | baseline {row['baseline']['tok_per_s']:,.0f} tok/s, ratio {row['ratio']:.2f}"
    return text


# --------------------------------------------------------------------------------------------------- profile

KERNEL_KINDS = (  # substrings of CUDA kernel names, first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "sm90", "matmul", "cublas", "nvjet")),
    ("optimizer", ("adam", "multi_tensor")),
    # before copies: Inductor names a fused kernel after its ops, often with a "_to_copy" (a cast) among them
    ("fused elementwise (triton)", ("triton",)),
    ("copy / cast", ("memcpy", "memset", "copy", "cast")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other elementwise")


def kernel_gaps(kernels: list[tuple[float, float, str]]) -> tuple[float, list[tuple[float, float, str, str]]]:
    """The span of kernels' ``(start, end, name)`` (first start to last end) and its gaps, in which no kernel ran
    (overlapping kernels count once), each as ``(offset from the first start, length, the kernel that ended last
    before it, the kernel after it)``, longest first."""
    if not kernels:
        return 0.0, []
    ordered = sorted(kernels)
    first, (_, run_end, last) = ordered[0][0], ordered[0]
    gaps = []
    for start, end, name in ordered[1:]:
        if start > run_end:
            gaps.append((run_end - first, start - run_end, last, name))
        if end > run_end:
            run_end, last = end, name
    return run_end - first, sorted(gaps, key=lambda gap: -gap[1])


def profile_step(step: Callable[[], Any], device: Any) -> dict[str, Any]:
    """GPU time of one training step by kernel kind, the 30 kernels that take longest (with their launches per
    step), and the time within the step's span of kernels in which the GPU ran none, with its 10 longest gaps
    (torch.profiler). ``step`` runs twice (the first time unprofiled) on a batch already on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # nothing left to compile or allocate in the profiled step
    with profile(activities=activities) as prof:
        step()
    # kernels and copies only: the GPU-side spans torch.compile annotates ("## Call CompiledFxGraph ... ##") cover
    # whole graphs
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not e.is_user_annotation]
    by_kind: dict[str, float] = {}
    top: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in kernels:
        by_kind[kernel_kind(event.name)] = by_kind.get(kernel_kind(event.name), 0.0) + event.device_time / 1000
        top[event.name] = top.get(event.name, 0.0) + event.device_time / 1000
        calls[event.name] = calls.get(event.name, 0) + 1
    span_us, gaps = kernel_gaps([(event.time_range.start, event.time_range.end, event.name) for event in kernels])
    top_names = sorted(top, key=lambda name: -top[name])[:30]
    return {"total_ms": sum(by_kind.values()), "span_ms": span_us / 1000,
            "idle_ms": sum(length for _, length, _, _ in gaps) / 1000,
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": {name: top[name] for name in top_names},
            "top_kernels_calls": {name: calls[name] for name in top_names},
            "longest_gaps": [{"at_ms": at / 1000, "ms": length / 1000, "previous_kernel": previous,
                              "next_kernel": following} for at, length, previous, following in gaps[:10]]}


# --------------------------------------------------------------------------------------------------- --from-train


def from_train(run_dir: Path, against: Optional[Path], output: Path) -> int:
    """Per-stage throughput; compile, evaluation and start-up time and the non-training share of a train run's wall
    time."""
    report = train_report(run_dir, against)
    for line in format_train_report(report):
        print(line)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


def train_report(run_dir: Path, against: Optional[Path], flag: str = "--from-train") -> dict[str, Any]:
    """The figures of one train run directory (``flag`` names it in errors); ``against`` a bench JSON or a reference
    run directory."""
    from pipeline.rundir import RunDir, eval_rows, read_checked, stage_throughput, train_rows

    paths = RunDir(run_dir)
    if not paths.metrics.is_file():
        raise ConfigError(flag, str(run_dir), "holds no metrics.jsonl; give a train run directory")
    records = read_checked(paths.metrics)
    train, evals = train_rows(records), eval_rows(records)
    if not train:
        raise ConfigError(flag, str(run_dir), "metrics.jsonl has no train lines yet")
    fallback = None if all("world_size" in r for r in train) else paths.world_size()
    sizes = list(dict.fromkeys(r.get("world_size", fallback) for r in train))  # in the order the run had them
    if None in sizes:
        raise ConfigError(flag, str(run_dir), "its train lines do not give their world size and its ds_config.json "
                                              "does not either")
    stages = stage_throughput(train, fallback)
    reference = None
    if against is not None and against.is_dir():
        reference = train_report(against, None, "--against")
        by_shape = {(s["seq_len"], s["global_batch"]): s for s in reference["stages"]}
        for stage in stages:
            if (match := by_shape.get((stage["seq_len"], stage["global_batch"]))) is not None:
                stage["reference_tok_per_s_per_gpu"] = match["median_tok_per_s_per_gpu"]
                stage["scaling_efficiency"] = stage["median_tok_per_s_per_gpu"] / match["median_tok_per_s_per_gpu"]
    elif against is not None:
        bench_rows = _bench_rows(against)
        for stage in stages:
            if (match := bench_rows.get((stage["seq_len"], stage["global_batch"]))) is not None:
                stage["bench_tok_per_s"] = match["tok_per_s"]
                stage["vs_bench"] = stage["median_tok_per_s"] / match["tok_per_s"]
    wall = max(r["elapsed_s"] for r in (train[-1], *evals[-1:]) if "elapsed_s" in r)  # the last evaluation included
    train_s = train[-1].get("train_s")
    eval_s = sum(r.get("eval_s") or 0.0 for r in evals)
    warmups = [r for r in records if r.get("kind") == "compile" and "warmup_s" in r]  # one per process (resumes)
    warmup_s = sum(r["warmup_s"] for r in warmups)
    # before the first step: the first process's start-up (imports, the engine, the model, the data) and warm-up
    first_warmup_s = sum(r["warmup_s"] for r in warmups if r["step"] <= train[0]["step"])
    startup_s = other_s = not_training = None  # runs older than the train_s field: no split
    if train_s is not None:
        startup_s = train[0]["elapsed_s"] - (train[0].get("train_s") or 0.0) - first_warmup_s
        other_s = wall - train_s - warmup_s - eval_s - startup_s
        not_training = 1 - train_s / wall
    return {"run_dir": str(run_dir), "world_sizes": sizes, "stages": stages, "wall_s": wall, "train_s": train_s,
            "warmup_s": warmup_s, "eval_s": eval_s, "evaluations": len(evals), "startup_s": startup_s,
            "other_s": other_s, "not_training_share": not_training,
            "surprises": [r["surprise"] for r in records if r.get("kind") == "compile" and "surprise" in r],
            "against": str(against) if against else None,
            "reference_world_sizes": reference["world_sizes"] if reference else None}


def _bench_rows(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    try:
        report = json.loads(path.read_text())
        return {(row["seq_len"], row["global_batch"]): row for row in report["shapes"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError("--against", str(path), f"not a bench JSON ({err})") from None


def format_train_report(report: dict[str, Any]) -> list[str]:
    def gpus(sizes: list[int]) -> str:
        return " then ".join(map(str, sizes)) + (" GPU" if sizes == [1] else " GPUs")

    lines = [f"{report['run_dir']} ({gpus(report['world_sizes'])}): per stage (median over its steps after the "
             "first)"]
    for s in report["stages"]:
        line = f"  stage {s['stage']} seq_len {s['seq_len']:>5} batch {s['global_batch']:>5}: " \
               f"{s['median_tok_per_s']:>10,.0f} tok/s"
        if s["world_size"] != 1:
            line += f" ({s['median_tok_per_s_per_gpu']:,.0f} per GPU)"
        if s["median_mfu"] is not None:
            line += f"  MFU {100 * s['median_mfu']:5.1f}%"
        if "vs_bench" in s:
            line += f"  bench {s['bench_tok_per_s']:,.0f} tok/s: {100 * (s['vs_bench'] - 1):+.1f}%"
        if "scaling_efficiency" in s:
            line += (f"  per GPU {100 * s['scaling_efficiency']:.1f}% of the reference's "
                     f"{s['reference_tok_per_s_per_gpu']:,.0f} ({gpus(report['reference_world_sizes'])})")
        lines.append(line)
    share = report["not_training_share"]
    rest = ""
    if share is not None:
        other = round(report["other_s"], 1) + 0.0  # + 0.0: a rounding's -0.0 reads 0.0
        rest = (f", start-up {report['startup_s']:.1f} s, other (checkpoint saves, rollbacks, resumed processes' "
                f"start-up) {other:.1f} s")
    lines.append(f"wall {report['wall_s']:.1f} s: training steps {report['train_s'] or 0:.1f} s, compile + warm-up "
                 f"{report['warmup_s']:.1f} s, {report['evaluations']} evaluations {report['eval_s']:.1f} s{rest}; "
                 f"not training: {'-' if share is None else f'{100 * share:.1f} %'}")
    lines += [f"torch.compile after the warm-up: {surprise}" for surprise in report["surprises"]]
    return lines
