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
from curriculum.loading import load_config
from curriculum.schedule import Schedule, Stage, build_schedule
from pipeline.cli import add_train_arguments, run_reporting_errors


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.sets)
    return train(config, output_dir=args.output_dir, resume=args.resume, stop_at_step=args.stop_at_step)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline.train", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args)


def train(config: Config, output_dir: Optional[str] = None, resume: str = "auto",
          stop_at_step: Optional[int] = None) -> int:
    import torch

    from pipeline.environment import prepare_environment

    notes = prepare_environment(os.environ, torch.cuda.is_available())

    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F
    from tqdm import tqdm

    from pipeline.batches import TokenSampler, eval_batches
    from pipeline.checkpoint import Checkpointer, resolve_resume
    from pipeline.data import load_tokens, read_manifest
    from pipeline.ds_config import cpu_offload, derive_ds_config
    from pipeline.metrics import RunLogger, plot_run, write_summary
    from pipeline.model import build_model, flops_per_token, matmul_params

    # ---------------------------------------------------------------------------------------- processes
    on_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    log = _rank0_printer(rank)
    for note in notes:
        log(note)

    # ---------------------------------------------------------------------------------------- plan
    schedule = build_schedule(config, world_size)
    if stop_at_step is not None and not 0 < stop_at_step <= schedule.total_steps:
        raise ConfigError("--stop-at-step", stop_at_step, f"must be in 1 .. {schedule.total_steps}")
    bf16 = config.run.precision == "bf16" or (
        config.run.precision == "auto" and on_cuda and torch.cuda.is_bf16_supported())
    run_dir = Path(output_dir or config.run.output_dir or Path("runs") / config.name)
    ds_config = derive_ds_config(config, schedule, bf16)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    # ---------------------------------------------------------------------------------------- data
    manifest = read_manifest(config.data.dir)
    eot_id = manifest["tokenizer"]["eot_id"]
    sampler = TokenSampler(load_tokens(config.data.dir, "train"), schedule.max_seq_len, config.run.seed)
    # evaluation at the full length, never at the curriculum's current length
    val_batches = eval_batches(load_tokens(config.data.dir, "val"), schedule.max_seq_len, config.run.eval_batch,
                               config.run.eval_batches, rank, world_size)

    # ---------------------------------------------------------------------------------------- model + engine
    torch.manual_seed(config.run.seed)  # identical initial weights on every rank
    model = build_model(config.model, manifest["tokenizer"]["vocab_size"], schedule.max_seq_len, eot_id)
    n_matmul = matmul_params(model)
    n_layer, d_model = model.config.num_hidden_layers, model.config.hidden_size
    optimizer, optimizer_name = _build_optimizer(model, config, on_cuda, cpu_offload(ds_config))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    peak_flops = config.run.peak_flops or _peak_flops(on_cuda)
    log(f"model: {config.model.arch} {config.model.preset}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters ({n_matmul:,} in matmuls); optimizer {optimizer_name}; "
        f"{'bf16' if bf16 else 'fp32'} on {device.type} x {world_size}; ZeRO stage "
        f"{ds_config['zero_optimization'].get('stage', 0)}")

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
        logger = RunLogger(run_dir, start_step, config.run.tensorboard, wandb_settings)

    stop_requested = _install_stop_handler()

    def save(steps_done: int) -> None:
        checkpointer.save(engine, steps_done,
                          client_state={"step": steps_done, "tokens": tokens, "cursor": cursor, "elapsed_s": elapsed,
                                        "curriculum": config.curriculum.model_dump(mode="json")},
                          rank_state={"data_sha256": data_sha256})

    def evaluate(step: int) -> None:
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, batches]
        with torch.no_grad():
            for inputs, labels in val_batches:
                logits = engine(input_ids=inputs.to(device)).logits
                total[0] += F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten())
                total[1] += 1
        dist.all_reduce(total)
        engine.train()
        eval_loss = (total[0] / total[1]).item()
        if logger is not None:
            logger.log({"kind": "eval", "step": step, "tokens": tokens, "seq_len": schedule.max_seq_len,
                        "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "elapsed_s": elapsed})
            log(f"step {step}: eval loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 50.0)):.1f}) "
                           f"at seq_len {schedule.max_seq_len}")

    # ---------------------------------------------------------------------------------------- the loop
    end_step = stop_at_step if stop_at_step is not None else schedule.total_steps
    progress = tqdm(total=schedule.total_steps, initial=start_step, disable=rank != 0, dynamic_ncols=True,
                    desc=config.name)
    engine.train()
    elapsed, run_start = elapsed_before, time.perf_counter()
    last_saved, stage = start_step if resume_path is not None else -1, None
    for step in range(start_step, end_step):
        step_start = time.perf_counter()
        if stage is None or step == stage.end_step:
            stage = schedule.stage_at(step)
            _enter_stage(engine, stage)
            log(f"step {step}: stage {stage.index}, seq_len {stage.seq_len}, "
                           f"{stage.micro_batch} x {stage.grad_accum} x {world_size} = {stage.global_batch} "
                           f"sequences, peak LR {stage.peak_lr:.2e}, clip {stage.grad_clip:g}")
        lr = schedule.lr_at(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

        micro_batches = sampler.step_micro_batches(stage, cursor, rank, schedule.mode)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        step_tokens = 0
        grad_norm = None
        step_hash = hashlib.sha256(data_sha256.encode())
        for i, (inputs, labels) in enumerate(micro_batches):
            boundary = i == len(micro_batches) - 1
            engine.set_gradient_accumulation_boundary(boundary)
            logits = engine(input_ids=inputs.to(device, non_blocking=True)).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device, non_blocking=True).flatten())
            engine.backward(loss)
            if boundary and not hasattr(engine.optimizer, "_global_grad_norm"):
                grad_norm = _grad_norm(engine.module)  # fp32 without ZeRO: DeepSpeed clips but keeps no norm
            engine.step()  # DeepSpeed updates only at the accumulation boundary
            step_loss += loss.detach()
            step_tokens += inputs.numel()
            step_hash.update(inputs.numpy().tobytes())
        data_sha256 = step_hash.hexdigest()

        # one all-reduce per step: mean loss over ranks, tokens trained, and whether any rank must stop
        totals = torch.tensor([0.0, float(step_tokens), float(stop_requested())], dtype=torch.float64,
                              device=device)
        totals[0] = step_loss / len(micro_batches)
        dist.all_reduce(totals)
        step_tokens = int(totals[1].item())
        tokens += step_tokens
        cursor += stage.samples_per_step
        step_time = time.perf_counter() - step_start
        elapsed = elapsed_before + time.perf_counter() - run_start
        loss_value = totals[0].item() / world_size
        tok_per_s = step_tokens / step_time
        grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
        grad_norm = float(grad_norm) if grad_norm is not None else None
        mfu = (flops_per_token(n_matmul, n_layer, d_model, stage.seq_len) * tok_per_s / (world_size * peak_flops)
               if peak_flops else None)
        progress.update(1)
        progress.set_postfix(stage=stage.index, seq=stage.seq_len, loss=f"{loss_value:.3f}",
                             tok_s=f"{tok_per_s:,.0f}", refresh=False)
        if logger is not None and (step % config.run.log_every == 0 or step == schedule.total_steps - 1):
            logger.log({"kind": "train", "step": step, "tokens": tokens, "stage": stage.index,
                        "seq_len": stage.seq_len, "global_batch": stage.global_batch, "lr": lr,
                        "grad_clip": stage.grad_clip, "loss": loss_value, "grad_norm": grad_norm,
                        "tok_per_s": tok_per_s, "mfu": mfu, "elapsed_s": elapsed})

        steps_done = step + 1
        if config.run.eval_every and steps_done % config.run.eval_every == 0 and steps_done < schedule.total_steps:
            evaluate(step)
        stopping = totals[2].item() > 0
        if (config.run.checkpoint_every and steps_done % config.run.checkpoint_every == 0) or stopping:
            save(steps_done)
            last_saved = steps_done
        if stopping:
            log(f"stop requested (signal): checkpoint saved at step {steps_done}; resume with --resume auto")
            break
    progress.close()

    # ---------------------------------------------------------------------------------------- the end
    steps_done = start_step if stage is None else step + 1
    if steps_done < schedule.total_steps:  # stopped early (--stop-at-step or a signal)
        if last_saved != steps_done:
            save(steps_done)
        log(f"stopped before step {steps_done} of {schedule.total_steps}; checkpoint in {checkpointer.directory}")
        if logger is not None:
            logger.close()
        dist.destroy_process_group()
        return 0
    evaluate(schedule.total_steps - 1)
    if last_saved != steps_done:
        save(steps_done)
    replicas = _replica_report(engine.module, data_sha256, world_size)
    if not replicas["params_identical"]:
        log("WARNING: parameters differ between data-parallel ranks (see summary.json: replicas)")
    if rank == 0:
        assert logger is not None
        logger.close()
        if config.run.export:
            _export(engine.module, run_dir / "final", Path(config.data.dir) / "tokenizer.json",
                    manifest["tokenizer"]["eot_token"])
        summary = write_summary(run_dir, {"name": config.name, "world_size": world_size,
                                          "precision": "bf16" if bf16 else "fp32", "device": device.type,
                                          "optimizer": optimizer_name, "replicas": replicas})
        plot = plot_run(run_dir)
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']:.0f} s; "
              f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, eval loss "
              f"{summary['final_eval_loss']:.3f} at seq_len {schedule.max_seq_len}\n"
              f"  metrics: {run_dir / 'metrics.jsonl'} (and .csv, tensorboard/)\n  plot:    {plot}\n"
              f"  summary: {run_dir / 'summary.json'}\n  model:   {run_dir / 'final'}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


# -------------------------------------------------------------------------------------------- helpers


def _enter_stage(engine: Any, stage: Stage) -> None:
    """At a step boundary: the stage's micro-batch, gradient accumulation and clip."""
    engine.set_train_micro_batch_size(stage.micro_batch)
    engine.set_train_batch_size(stage.global_batch)  # grad_accum = global / (micro x world)
    engine._config.gradient_clipping = stage.grad_clip  # read by the fp32 path at each step
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO and bf16 optimizers keep their own copy
        engine.optimizer.clip_grad = stage.grad_clip


def _replica_report(module: Any, data_sha256: str, world_size: int) -> dict[str, Any]:
    """Every rank's parameter hash and data fingerprint: data-parallel replicas must hold identical parameters
    after training on different data."""
    import torch
    import torch.distributed as dist

    params = hashlib.sha256()
    for tensor in module.state_dict().values():
        params.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, {"params_sha256": params.hexdigest(), "data_sha256": data_sha256})
    return {"params_sha256": [g["params_sha256"] for g in gathered],
            "data_sha256": [g["data_sha256"] for g in gathered],
            "params_identical": len({g["params_sha256"] for g in gathered}) == 1}


def _grad_norm(module: Any) -> float:
    """Global L2 norm of the (already data-parallel averaged) gradients."""
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item()


def _build_optimizer(model: Any, config: Config, on_cuda: bool, offload: bool) -> tuple[Any, str]:
    """AdamW with weight decay on matrices only (biases and norm weights are not decayed)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.optimizer.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = {"lr": 0.0, "betas": config.optimizer.betas, "eps": config.optimizer.eps}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs), "DeepSpeedCPUAdam (ZeRO-Offload)"
    if on_cuda:
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


def _peak_flops(on_cuda: bool) -> Optional[float]:
    if not on_cuda:
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
