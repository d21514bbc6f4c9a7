"""Curriculum pretraining on the DeepSpeed engine; the loop reads top to bottom in ``train()``.

Launch any of these ways (each rank runs the same code):

    curriculum-pretrain train --config tiny-cpu                     # one process
    deepspeed --num_gpus 8 --module pipeline.train --config X       # DeepSpeed launcher, one node
    torchrun --nproc_per_node 8 -m pipeline.train --config X        # torchrun

Every optimizer step asks the pure schedule for (stage, LR); at the step boundary it writes the LR into the
optimizer's param groups and the stage's clip, micro-batch and gradient accumulation into the engine, draws the
step's rows at the stage's length from the sampler, and runs forward/backward/step for each micro-batch.
Evaluation is always at the full sequence length. Checkpoints hold the step, tokens, data cursor and RNG states;
a resumed run continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.schedule import Schedule, Stage, build_schedule
from pipeline.cli import add_train_arguments, load_config_from_args, run_reporting_errors


def run(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    return train(config, output_dir=args.output_dir, resume=args.resume, stop_at_step=args.stop_at_step)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline.train", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args)


def init_processes() -> tuple[int, int, Any, Any]:
    """Environment fixes, the process group (NCCL on GPUs, gloo on CPU) and this rank's device.
    Returns ``(rank, world_size, device, log)`` where ``log`` prints on rank 0."""
    import torch

    from pipeline.environment import prepare_environment

    notes = prepare_environment(os.environ, torch.cuda.is_available())
    import deepspeed
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    log = _rank0_printer(rank)
    for note in notes:
        log(note)
    return rank, dist.get_world_size(), device, log


def use_bf16(config: Config, device: Any) -> bool:
    """``run.precision``: ``auto`` is bf16 on a GPU that supports it, fp32 elsewhere."""
    import torch

    return config.run.precision == "bf16" or (
        config.run.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def build_engine(config: Config, schedule: Schedule, ds_config: dict[str, Any], manifest: dict[str, Any],
                 device: Any, log: Any) -> tuple[Any, Any, str, Any]:
    """A freshly initialised model (the same weights on every rank and for every call with the same seed) with
    the kernels the config asks for, wrapped with its loss, its optimizer and the DeepSpeed engine around them.
    Returns ``(engine, model, optimizer_name, kernel_choice)``; ``engine(input_ids, labels)`` is the mean loss."""
    import deepspeed
    import torch

    from pipeline.ds_config import cpu_offload
    from pipeline.kernels import CausalLMWithLoss, choose_kernels, compile_engine, patch_model_classes, swap_apex_norms
    from pipeline.model import build_model

    choice = choose_kernels(config.kernels, config.model.arch, device.type == "cuda")
    for note in choice.notes:
        log(note)
    patch_model_classes(choice, config.model.arch)
    torch.manual_seed(config.run.seed)
    model = build_model(config.model, manifest["tokenizer"]["vocab_size"], schedule.max_seq_len,
                        manifest["tokenizer"]["eot_id"])
    if choice.apex:
        log(f"kernels.apex: {swap_apex_norms(model)} norm layers replaced by apex fused ones")
    module = CausalLMWithLoss(model, fused_cross_entropy=choice.liger)
    optimizer, optimizer_name = _build_optimizer(module, config, choice.fused_adam, cpu_offload(ds_config))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    if choice.compile:
        compile_engine(engine, schedule.distinct_shapes())
    return engine, model, optimizer_name, choice


def train(config: Config, output_dir: Optional[str] = None, resume: str = "auto",
          stop_at_step: Optional[int] = None) -> int:
    rank, world_size, device, log = init_processes()
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from pipeline.batches import TokenSampler, eval_batches
    from pipeline.checkpoint import Checkpointer, resolve_resume
    from pipeline.data import load_tokens, read_manifest
    from pipeline.ds_config import derive_ds_config
    from pipeline.guard import SpikeGuard
    from pipeline.metrics import RunLogger, plot_run, write_summary
    from pipeline.model import flops_per_token, matmul_params

    # ---------------------------------------------------------------------------------------- plan
    schedule = build_schedule(config, world_size)
    if stop_at_step is not None and not 0 < stop_at_step <= schedule.total_steps:
        raise ConfigError("--stop-at-step", stop_at_step, f"must be in 1 .. {schedule.total_steps}")
    bf16 = use_bf16(config, device)
    run_dir = Path(output_dir or config.run.output_dir or Path("runs") / config.name)
    ds_config = derive_ds_config(config, schedule, bf16)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    # ---------------------------------------------------------------------------------------- data
    manifest = read_manifest(config.data.dir)
    sampler = TokenSampler(load_tokens(config.data.dir, "train"), schedule.max_seq_len, config.run.seed)
    # evaluation at the full length, never at the curriculum's current length
    val_batches = eval_batches(load_tokens(config.data.dir, "val"), schedule.max_seq_len, config.run.eval_batch,
                               config.run.eval_batches, rank, world_size)

    # ---------------------------------------------------------------------------------------- model + engine
    engine, model, optimizer_name, kernels = build_engine(config, schedule, ds_config, manifest, device, log)
    n_matmul = matmul_params(model)
    n_layer, d_model = model.config.num_hidden_layers, model.config.hidden_size
    device_peak_flops = config.run.peak_flops or peak_flops(device)
    log(f"model: {config.model.arch} {config.model.preset}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters ({n_matmul:,} in matmuls); optimizer {optimizer_name}; "
        f"{'bf16' if bf16 else 'fp32'} on {device.type} x {world_size}; ZeRO stage "
        f"{ds_config['zero_optimization'].get('stage', 0)}; kernels: liger {kernels.liger}, apex {kernels.apex}, "
        f"compile {kernels.compile}")
    if kernels.compile and config.kernels.compile_warmup:
        from pipeline.kernels import warm_up_shapes

        warmed = warm_up_shapes(engine, schedule.distinct_shapes(), model.config.vocab_size, device)
        log(f"compiled {len(warmed)} stage shapes before step 0 in {sum(warmed.values()):.1f} s: " +
            ", ".join(f"{shape} {seconds:.1f} s" for shape, seconds in warmed.items()))

    # ---------------------------------------------------------------------------------------- resume
    checkpointer = Checkpointer(run_dir / "checkpoints", config.run.keep_checkpoints, rank)
    start_step, tokens, cursor, elapsed_before = 0, 0, 0, 0.0
    # this rank's data fingerprint: a sha256 chain with one link per step, each link hashing the previous link and
    # the step's input batches. The checkpoint stores the link (a sha256 object's running state cannot be saved),
    # so a resumed run ends with the same fingerprint as an uninterrupted one.
    data_sha256 = hashlib.sha256().hexdigest()
    resume_path = resolve_resume(resume, checkpointer)
    if resume_path is not None:
        state, rank_state = checkpointer.load(engine, resume_path)
        data_sha256 = rank_state["data_sha256"]
        start_step, tokens, cursor = state["step"], state["tokens"], state["cursor"]
        elapsed_before = state["elapsed_s"]
        if start_step > schedule.total_steps:
            raise ConfigError("--resume", str(resume_path),
                              f"checkpoint is at step {start_step}, past this config's {schedule.total_steps} steps")
        log(f"resumed from {resume_path} at step {start_step} ({tokens:,} tokens, data cursor {cursor})")
        for change in _changed_fields(state["curriculum"], config.curriculum.model_dump(mode="json"), "curriculum"):
            log(f"resuming with a changed hyperparameter: {change}")

    logger = None
    if rank == 0:
        wandb_settings = None
        if config.run.wandb.enabled:
            run_id = f"{config.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
            wandb_settings = {"project": config.run.wandb.project, "name": config.name, "id": run_id,
                              "mode": config.run.wandb.mode, "config": config.model_dump(mode="json")}
        # the guard line of an event the checkpoint already counts (the one that stopped a run) is kept
        logger = RunLogger(run_dir, start_step, config.run.tensorboard, wandb_settings,
                           keep_guard_events=state["guard"]["events"] if resume_path is not None else 0)

    stop_requested = _install_stop_handler()
    guard = SpikeGuard(config.guard)
    best_eval_loss = math.inf
    if resume_path is not None:
        guard.load_state_dict(state["guard"])
        best_eval_loss = state["best_eval_loss"]

    def save(steps_done: int, name: Optional[str] = None) -> None:
        client_state = {"step": steps_done, "tokens": tokens, "cursor": cursor, "elapsed_s": elapsed,
                        "curriculum": config.curriculum.model_dump(mode="json"), "guard": guard.state_dict(),
                        "best_eval_loss": best_eval_loss}
        if config.guard.action == "rollback":  # lets a rollback prove it restored exactly this state
            client_state["params_sha256"] = _params_sha256(engine.module)
        checkpointer.save(engine, steps_done, client_state=client_state, rank_state={"data_sha256": data_sha256},
                          name=name)

    def evaluate(step: int) -> float:
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, batches]
        with torch.no_grad():
            for inputs, labels in val_batches:
                total[0] += engine(inputs.to(device), labels.to(device)).double()
                total[1] += 1
        dist.all_reduce(total)
        engine.train()
        eval_loss = (total[0] / total[1]).item()
        if logger is not None:
            logger.log({"kind": "eval", "step": step, "tokens": tokens, "seq_len": schedule.max_seq_len,
                        "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "elapsed_s": elapsed})
        log(f"step {step}: eval loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 50.0)):.1f}) "
            f"at seq_len {schedule.max_seq_len}")
        return eval_loss

    # ---------------------------------------------------------------------------------------- the loop
    end_step = stop_at_step if stop_at_step is not None else schedule.total_steps
    progress = tqdm(total=schedule.total_steps, initial=start_step, disable=rank != 0, dynamic_ncols=True,
                    desc=config.name)
    engine.train()
    elapsed, run_start = elapsed_before, time.perf_counter()
    last_saved, stage, halted = start_step if resume_path is not None else -1, None, False
    compiled_shapes: set[tuple[int, int]] = set()  # with kernels.compile: the first step of a new shape compiles
    step = start_step
    while step < end_step:
        step_start = time.perf_counter()
        if stage is None or not stage.start_step <= step < stage.end_step:
            stage = schedule.stage_at(step)
            enter_stage(engine, stage)
            log(f"step {step}: stage {stage.index}, seq_len {stage.seq_len}, "
                f"{stage.micro_batch} x {stage.grad_accum} x {world_size} = {stage.global_batch} "
                f"sequences, peak LR {stage.peak_lr:.2e}, clip {stage.grad_clip:g}")
        lr = schedule.lr_at(step) * guard.lr_factor(step)
        set_lr(engine, lr)

        micro_batches = sampler.step_micro_batches(stage, cursor, rank, schedule.mode)
        step_hash = hashlib.sha256(data_sha256.encode())
        for inputs, _ in micro_batches:
            step_hash.update(inputs.numpy().tobytes())
        step_loss = forward_backward(engine, micro_batches, device)

        # one all-reduce per step, before the update: mean loss over ranks, tokens, whether any rank must stop
        step_tokens = sum(inputs.numel() for inputs, _ in micro_batches)
        totals = torch.tensor([0.0, float(step_tokens), float(stop_requested())], dtype=torch.float64,
                              device=device)
        totals[0] = step_loss
        dist.all_reduce(totals)
        loss_value = totals[0].item() / world_size

        # the guard sees the loss, and (fp32 without ZeRO) the gradient norm, before the update
        grad_norm = None if hasattr(engine.optimizer, "_global_grad_norm") else _grad_norm(engine.module)
        spike = guard.check_loss(stage.index, loss_value) or guard.check_grad_norm(stage.index, grad_norm)
        action = config.guard.action if spike is not None else None
        if spike is not None:
            guard.record(step, action)
            if action == "scale_lr":
                lr = schedule.lr_at(step) * guard.lr_factor(step)
                set_lr(engine, lr)
        # a non-finite loss or gradient is never applied, whatever the action
        if action in ("skip", "rollback") or (spike is not None and spike.reason.startswith("non_finite")):
            _drop_gradients(engine)
        else:
            engine.step()
            if grad_norm is None:  # ZeRO and bf16 optimizers compute the norm inside the step
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                spike = guard.check_grad_norm(stage.index, grad_norm)
                if spike is not None:  # too late to drop this update: scale the LR from the next step, or roll back
                    rollback = config.guard.action == "rollback" or spike.reason == "non_finite_grad_norm"
                    action = "rollback" if rollback else "scale_lr"
                    guard.record(step, action)
        if spike is None:
            guard.accept(loss_value, grad_norm)
        else:
            event = {"kind": "guard", "step": step, "stage": stage.index, "seq_len": stage.seq_len,
                     "loss": loss_value, "grad_norm": grad_norm, "reason": spike.reason, "value": spike.value,
                     "running_average": spike.running_average, "action": action, "events": guard.events}
            log(f"step {step}: {spike.reason} ({spike.value:.4g} vs running average "
                f"{spike.running_average if spike.running_average is None else f'{spike.running_average:.4g}'}) "
                f"in stage {stage.index} (seq_len {stage.seq_len}): {action} "
                f"[event {guard.events} of at most {config.guard.max_events}]")
            latest = checkpointer.latest() if action == "rollback" and not guard.exhausted else None
            if action == "rollback" and latest is None:
                event["action"] = ("stop (guard.max_events reached)" if guard.exhausted
                                   else "skip (no checkpoint to roll back to yet)")
            if latest is not None:
                # back to the last checkpoint, and past the data of the steps since then, spike included
                skip_to = cursor + stage.samples_per_step
                state, rank_state = checkpointer.load(engine, latest)
                event.update(restored_from=latest.name, restored_step=state["step"], skipped_samples=skip_to -
                             state["cursor"], params_sha256=_params_sha256(engine.module),
                             checkpoint_params_sha256=state.get("params_sha256"))
                step, tokens, cursor, data_sha256 = state["step"], state["tokens"], skip_to, rank_state["data_sha256"]
                stage = None
                if logger is not None:
                    logger.rewind(step)
                    logger.log(event)
                progress.reset(total=schedule.total_steps)
                progress.update(step)
                continue
            if logger is not None:
                logger.log(event)
            if guard.exhausted:
                halted = True
                if action != "scale_lr":  # the update was dropped: this step is not done
                    break

        data_sha256 = step_hash.hexdigest()
        step_tokens = int(totals[1].item())
        tokens += step_tokens
        cursor += stage.samples_per_step
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels are done before its time is read
        step_time = time.perf_counter() - step_start
        elapsed = elapsed_before + time.perf_counter() - run_start
        if kernels.compile and (stage.micro_batch, stage.seq_len) not in compiled_shapes:
            compiled_shapes.add((stage.micro_batch, stage.seq_len))
            log(f"step {step}: first step of shape {stage.micro_batch}x{stage.seq_len} (compiles unless warmed up): "
                f"{step_time:.2f} s")
        tok_per_s = step_tokens / step_time
        mfu = (flops_per_token(n_matmul, n_layer, d_model, stage.seq_len) * tok_per_s
               / (world_size * device_peak_flops) if device_peak_flops else None)
        progress.update(1)
        progress.set_postfix(stage=stage.index, seq=stage.seq_len, loss=f"{loss_value:.3f}",
                             tok_s=f"{tok_per_s:,.0f}", events=guard.events, refresh=False)
        if logger is not None and (step % config.run.log_every == 0 or step == schedule.total_steps - 1):
            logger.log({"kind": "train", "step": step, "tokens": tokens, "stage": stage.index,
                        "seq_len": stage.seq_len, "global_batch": stage.global_batch, "lr": lr,
                        "grad_clip": stage.grad_clip, "loss": loss_value, "grad_norm": grad_norm,
                        "tok_per_s": tok_per_s, "mfu": mfu, "elapsed_s": elapsed})

        step += 1
        if halted:
            break
        if config.run.eval_every and step % config.run.eval_every == 0 and step < schedule.total_steps:
            eval_loss = evaluate(step - 1)
            if config.run.keep_best and eval_loss < best_eval_loss:
                best_eval_loss = eval_loss
                save(step, name="best")
        stopping = totals[2].item() > 0
        if (config.run.checkpoint_every and step % config.run.checkpoint_every == 0) or stopping:
            save(step)
            last_saved = step
        if stopping:
            log(f"stop requested (signal): checkpoint saved at step {step}; resume with --resume auto")
            break
    progress.close()

    # ---------------------------------------------------------------------------------------- the end
    steps_done = step
    if steps_done < schedule.total_steps:  # stopped early: --stop-at-step, a signal, or the spike guard
        if last_saved != steps_done:
            save(steps_done)
        if halted:
            log(f"error: stopped after {guard.events} spike events (guard.max_events = {config.guard.max_events}); "
                f"the last good state is checkpointed at step {steps_done}. Lower the LR (see `curriculum-pretrain "
                f"diagnose {run_dir}`) and resume with --resume auto")
        else:
            log(f"stopped before step {steps_done} of {schedule.total_steps}; checkpoint in {checkpointer.directory}")
        if logger is not None:
            logger.close()
        dist.destroy_process_group()
        return 1 if halted else 0
    if start_step < schedule.total_steps:  # a resumed finished run evaluated before its last checkpoint
        eval_loss = evaluate(schedule.total_steps - 1)
        if config.run.keep_best and eval_loss < best_eval_loss:
            best_eval_loss = eval_loss
            save(steps_done, name="best")
    if last_saved != steps_done:
        save(steps_done)
    replicas = _replica_report(engine.module, data_sha256, world_size)
    if not replicas["params_identical"]:
        log("WARNING: parameters differ between data-parallel ranks (see summary.json: replicas)")
    if rank == 0:
        assert logger is not None
        logger.close()
        if config.run.export:
            _export(engine.module.lm, run_dir / "final", Path(config.data.dir) / "tokenizer.json",
                    manifest["tokenizer"]["eot_token"])
        summary = write_summary(run_dir, {"name": config.name, "world_size": world_size,
                                          "precision": "bf16" if bf16 else "fp32", "device": device.type,
                                          "optimizer": optimizer_name, "replicas": replicas,
                                          "guard_events": guard.events})
        plot = plot_run(run_dir)
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']:.0f} s; "
              f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, eval loss "
              f"{summary['final_eval_loss']:.3f} at seq_len {schedule.max_seq_len}"
              + (f"; {guard.events} spike events" if guard.events else "") + "\n"
              f"  metrics: {run_dir / 'metrics.jsonl'} (and .csv, tensorboard/)\n  plot:    {plot}\n"
              f"  summary: {run_dir / 'summary.json'}\n  model:   {run_dir / 'final'}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


# -------------------------------------------------------------------------------------------- helpers


def enter_stage(engine: Any, stage: Stage) -> None:
    """At a step boundary: the stage's micro-batch, gradient accumulation and clip."""
    engine.set_train_micro_batch_size(stage.micro_batch)
    engine.set_train_batch_size(stage.global_batch)  # grad_accum = global / (micro x world)
    engine._config.gradient_clipping = stage.grad_clip  # read by the fp32 path at each step
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO and bf16 optimizers keep their own copy
        engine.optimizer.clip_grad = stage.grad_clip


def forward_backward(engine: Any, micro_batches: list[tuple[Any, Any]], device: Any) -> Any:
    """Forward and backward over one step's micro-batches; DeepSpeed's ``step`` runs after each but the last, so
    the gradients of the step are accumulated and reduced but not yet applied (the caller applies or drops them).
    Returns the mean loss of the micro-batches on this rank, as a float64 tensor."""
    import torch

    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, (inputs, labels) in enumerate(micro_batches):
        boundary = i == len(micro_batches) - 1
        engine.set_gradient_accumulation_boundary(boundary)
        loss = engine(inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        engine.backward(loss)
        if not boundary:
            engine.step()  # no update before the accumulation boundary; keeps DeepSpeed's counters in step
        total += loss.detach()
    return total / len(micro_batches)


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def _drop_gradients(engine: Any) -> None:
    """Discard the accumulated gradients of this step instead of applying them."""
    engine.optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()


def _params_sha256(module: Any) -> str:
    import torch

    params = hashlib.sha256()
    for tensor in module.state_dict().values():
        params.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return params.hexdigest()


def _replica_report(module: Any, data_sha256: str, world_size: int) -> dict[str, Any]:
    """Every rank's parameter hash and data fingerprint: data-parallel replicas must hold identical parameters
    after training on different data."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, {"params_sha256": _params_sha256(module), "data_sha256": data_sha256})
    return {"params_sha256": [g["params_sha256"] for g in gathered],
            "data_sha256": [g["data_sha256"] for g in gathered],
            "params_identical": len({g["params_sha256"] for g in gathered}) == 1}


def _grad_norm(module: Any) -> float:
    """Global L2 norm of the (already data-parallel averaged) gradients."""
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item()


def _build_optimizer(model: Any, config: Config, fused_adam: bool, offload: bool) -> tuple[Any, str]:
    """AdamW with weight decay on matrices only (biases and norm weights are not decayed)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.optimizer.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = {"lr": 0.0, "betas": config.optimizer.betas, "eps": config.optimizer.eps}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs), "DeepSpeedCPUAdam (ZeRO-Offload)"
    if fused_adam:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs), "DeepSpeed FusedAdam"
    return torch.optim.AdamW(groups, **kwargs), "torch AdamW"


PEAK_BF16_FLOPS = {  # dense bf16 tensor-core FLOP/s of one device
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "RTX 3090": 71e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: Any) -> Optional[float]:
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _changed_fields(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new))
                for change in _changed_fields(old.get(key), new.get(key), f"{path}.{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [change for i, (a, b) in enumerate(zip(old, new)) for change in _changed_fields(a, b, f"{path}.{i}")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _install_stop_handler() -> Any:
    """SIGTERM/SIGUSR1 (schedulers send them before preemption): finish the step, checkpoint, exit."""
    requested = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        requested["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
    return lambda: requested["stop"]


def _rank0_printer(rank: int) -> Any:
    """Print on rank 0 without breaking the progress bar."""
    from tqdm import tqdm

    def log(message: str) -> None:
        if rank == 0:
            tqdm.write(message)

    return log


def _export(module: Any, out_dir: Path, tokenizer_file: Path, eot_token: str) -> None:
    """``save_pretrained`` + tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)``."""
    from transformers import PreTrainedTokenizerFast

    module.save_pretrained(out_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eot_token,
                                        bos_token=eot_token, unk_token=eot_token)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    sys.exit(main())
