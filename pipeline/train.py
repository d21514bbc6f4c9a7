"""``curriculum-pretrain train``: curriculum pretraining on the DeepSpeed engine; the loop reads top to bottom in
``train()``.

Launch any of these ways (each rank runs the same code):

    curriculum-pretrain train --config tiny-cpu                     # one process
    deepspeed --num_gpus 8 --module pipeline.train --config X       # DeepSpeed launcher, one node
    torchrun --nproc_per_node 8 -m pipeline.train --config X        # torchrun

Every optimizer step asks the pure schedule for (stage, LR); at a stage boundary the engine takes the stage's
clip, micro-batch and gradient accumulation; the prefetcher has the step's rows ready on the device; the engine
runs forward/backward with one host synchronisation (the mean loss over ranks), the spike guard gives its verdict
and the update is applied or not. Evaluation is always at the full sequence length. Checkpoints hold a
``RunState`` (step, tokens, data cursor, time, guard, RNG states); a resumed run continues exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.schedule import Schedule, build_schedule

PROCESS_START = time.perf_counter()


HELP = "run curriculum pretraining on the DeepSpeed engine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="run directory (default run.output_dir or runs/<name>)")
    parser.add_argument("--resume", default="auto",
                        help="auto (the run directory's latest checkpoint if any), none, or a checkpoint path")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="save a checkpoint and exit before this step, as a preempted job would "
                             "(resume later with --resume auto)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from pipeline.commands import load_config_from_args
    from pipeline.peers import failures_reported

    config = load_config_from_args(args)
    with failures_reported():  # a dead rank: one line and exit status 3, not a traceback or a hang
        return train(config, output_dir=args.output_dir, resume=args.resume, stop_at_step=args.stop_at_step)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pipeline.commands import OneLineParser, run_reporting_errors

    parser = OneLineParser(prog="pipeline.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_reporting_errors(run, parser.parse_args(argv))


def train(config: Config, output_dir: Optional[str] = None, resume: str = "auto",
          stop_at_step: Optional[int] = None) -> int:
    from pipeline import peers
    from pipeline.batches import Prefetcher, load_run_data
    from pipeline.checkpoint import Checkpointer, RunState, complete_checkpoints, resolve_resume, tag_for
    from pipeline.commands import output_directory
    from pipeline.ds_config import derive_ds_config, zero_stage
    from pipeline.engine import build_engine, close_processes, device_precision, init_processes, peak_flops
    from pipeline.environment import bytecode_note
    from pipeline.guard import SpikeGuard
    from pipeline.metrics import Progress
    from pipeline.model import model_config_dict
    from pipeline.rundir import RunDir

    startup = _Phases()  # where the time before the first step goes, in the log
    # ------------------------------------------------------------------ plan, data, checkpoint: checked before writing
    run_dir = RunDir(output_directory("--output-dir",
                                      output_dir or config.run.output_dir or Path("runs") / config.name))
    processes = init_processes(config)
    startup.done("processes")
    rank, world_size, log = processes.rank, processes.world_size, processes.log
    schedule = build_schedule(config, world_size)
    end_step = schedule.total_steps if stop_at_step is None else stop_at_step
    if not 0 < end_step <= schedule.total_steps:
        raise ConfigError("--stop-at-step", stop_at_step, f"must be in 1 .. {schedule.total_steps}")
    if schedule.cut_from is not None:
        log(f"run.max_steps: the plan is cut at step {schedule.total_steps} of {schedule.cut_from}")
    data = load_run_data(config, schedule, rank, world_size, processes.device)
    ds_config = derive_ds_config(config, schedule, device_precision(config, processes.device))
    tokenizer = data.manifest["tokenizer"]
    model_fields = model_config_dict(config.model, tokenizer["vocab_size"], schedule.max_seq_len, tokenizer["eot_id"])
    checkpointer = Checkpointer(run_dir.checkpoints, config.run.keep_checkpoints, rank, world_size)
    resume_path = resolve_resume(resume, checkpointer, log)
    zero = zero_stage(ds_config)
    _check_resume(run_dir, resume_path, config, schedule, model_fields, zero)
    startup.done("data and checks")

    # ------------------------------------------------------------------ the engine, compiled graphs, the run state
    engine = build_engine(config, schedule, ds_config, data.manifest, processes)
    prefetcher = Prefetcher(data.sampler, schedule, rank, processes.device)
    log(engine.describe())
    startup.done("engine")
    if engine.monitor is not None and config.kernels.compile_warmup:
        shapes = engine.warm_up(schedule, lambda stage, cursor: prefetcher.load(stage, -1, cursor), data.eval_batches)
        log(f"compiled and warmed up {len(engine.monitor.graphs)} graphs before step 0 in {engine.warmup_s:.1f} s: "
            + ", ".join(f"{shape} {seconds:.1f} s" for shape, seconds in shapes.items())
            + engine.monitor.describe_caches())
        startup.done("compile warm-up")
    state = RunState(curriculum=config.curriculum.model_dump(mode="json"), model=model_fields, world_size=world_size,
                     zero_stage=zero)
    if resume_path is not None:
        state = _restore(checkpointer, engine, resume_path, config, model_fields, log)
    guard = SpikeGuard(config.guard)
    if state.guard:
        guard.load_state_dict(state.guard)
    peers.follow(lambda: state.step, checkpointer.latest)  # what a dead peer's error line names
    logger = (_open_outputs(run_dir, config, schedule, ds_config, state, engine, guard, resume_path) if rank == 0
              else None)
    progress = Progress(config, schedule, state.step, enabled=rank == 0)
    stop_requested = _install_stop_handler()
    startup.done("resume and outputs")
    log(startup.line())
    if note := bytecode_note():
        log(note)
    device_peak = config.run.peak_flops or peak_flops(processes.device)
    run_start = time.perf_counter()
    elapsed_before = state.elapsed_s + (run_start - PROCESS_START)  # this segment's start-up and compilation count

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - run_start

    def save(latest: bool = True, best: bool = False) -> None:
        """``step<state.step>``, named by ``latest`` (and older ones pruned) or saved for ``best`` only; ``best``
        then names it. A step that ``latest`` already names is not saved again."""
        nonlocal last_saved
        if last_saved != state.step:
            state.elapsed_s, state.guard = elapsed(), guard.state_dict()
            if config.guard.action == "rollback":  # lets a rollback prove it restored exactly this state
                state.params_sha256 = engine.params_sha256()
            checkpointer.save_state(engine.ds, state, latest)
            if latest:
                last_saved = state.step
        if best:
            checkpointer.mark_best(checkpointer.directory / tag_for(state.step))

    def evaluate() -> tuple[bool, bool]:
        """Evaluate at the full length: whether to save the state as ``best`` (the lowest eval loss so far, with
        ``run.keep_best``), and whether the eval loss rose so far above the lowest that the run must stop."""
        start = time.perf_counter()
        eval_loss = engine.evaluate(data.eval_batches)
        record = {"kind": "eval", "step": state.step - 1, "tokens": state.tokens, "seq_len": schedule.max_seq_len,
                  "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
                  "eval_s": time.perf_counter() - start, "train_s": state.train_s, "elapsed_s": elapsed()}
        if logger is not None:
            logger.log(record)
        log(f"step {state.step - 1}: eval loss {eval_loss:.4f} (ppl {record['eval_ppl']:.1f}) at seq_len "
            f"{schedule.max_seq_len}")
        lowest = state.best_eval_loss
        rose = guard.held_out_rose(eval_loss, lowest)
        if rose:
            how = (f"more than {100 * config.guard.eval_rise:g}% above the lowest so far, {lowest:.4f}"
                   if math.isfinite(eval_loss) else "not finite")
            log(f"step {state.step - 1}: eval loss {eval_loss:.4f} is {how} (guard.eval_rise): the run is diverging")
        state.best_eval_loss = min(lowest, eval_loss)
        return config.run.keep_best and eval_loss < lowest, rose

    # ------------------------------------------------------------------ the loop: steps state.step .. end_step - 1
    engine.ds.train()
    first_step, stage = state.step, None
    halted: Optional[str] = None  # why the guard stopped the run: guard.max_events or guard.eval_rise
    # the step whose checkpoint `latest` names, when that is this state (else the end saves one)
    last_saved = state.step if resume_path is not None and resume_path == checkpointer.latest() else -1
    mark = time.perf_counter()
    while state.step < end_step:
        step = state.step
        if stage is None or not stage.start_step <= step < stage.end_step:
            stage = schedule.stage_at(step)
            engine.enter_stage(stage)
            log(f"step {step}: stage {stage.index}, seq_len {stage.seq_len}, {stage.micro_batch} x "
                f"{stage.grad_accum} x {world_size} = {stage.global_batch} sequences, peak LR {stage.peak_lr:.2e}, "
                f"clip {stage.grad_clip:g}")
        engine.set_lr(schedule.lr_at(step) * guard.lr_factor(step))
        batch = prefetcher.get(step, state.cursor)
        values, verdict = engine.train_step(batch, stop_requested(),
                                            _guarded_update(guard, engine, schedule, step, stage.index))
        # a step's time runs from the previous step's synchronisation to its own (bookkeeping included)
        step_time, mark = time.perf_counter() - mark, time.perf_counter()
        lr = engine.lr  # the LR the update used (a spike verdict before the update may have scaled it)
        if verdict.spike is not None:
            if _handle_spike(verdict, step, stage, values, guard, checkpointer, engine, state, logger, log):
                progress.rewind(state.step)  # rolled back to the last checkpoint: its steps run again
                stage, mark = None, time.perf_counter()
                continue
            halted = "guard.max_events" if verdict.stop else None
            if halted and not verdict.update_applies:  # the update was dropped: this step is not done
                break

        # the step is done
        step_tokens = batch.tokens * world_size  # every rank trains the same shape
        state.data_sha256 = hashlib.sha256(state.data_sha256.encode() + batch.digest).hexdigest()
        state.step, state.tokens = step + 1, state.tokens + step_tokens
        state.cursor, state.train_s = state.cursor + stage.samples_per_step, state.train_s + step_time
        record = {"kind": "train", "step": step, "tokens": state.tokens, "stage": stage.index,
                  "seq_len": stage.seq_len, "global_batch": stage.global_batch, "lr": lr,
                  "grad_clip": stage.grad_clip, "loss": values.loss, "grad_norm": values.grad_norm,
                  "tok_per_s": step_tokens / step_time,
                  "mfu": engine.mfu(stage.seq_len, step_tokens / step_time, device_peak),
                  "elapsed_s": elapsed(), "train_s": state.train_s, "world_size": world_size}
        if logger is not None and (step % config.run.log_every == 0 or step == schedule.total_steps - 1):
            logger.log(record)
        progress.update(record, guard.events)
        _report_compile_surprises(engine, step, logger, log)
        if halted:
            break
        paused = time.perf_counter()
        every, every_tokens = config.run.eval_every, config.run.eval_every_tokens
        due = (state.tokens // every_tokens > (state.tokens - step_tokens) // every_tokens if every_tokens
               else every > 0 and state.step % every == 0)
        improved, diverging = evaluate() if due and state.step < schedule.total_steps else (False, False)
        periodic = (config.run.checkpoint_every > 0 and state.step % config.run.checkpoint_every == 0) or values.stop
        if periodic or improved:
            save(latest=periodic, best=improved)
        if diverging:
            halted = "guard.eval_rise"
            break
        if values.stop:
            log(f"stop requested (signal): checkpoint saved at step {state.step}; resume with --resume auto")
            break
        mark += time.perf_counter() - paused  # evaluations and checkpoints are not step time
    progress.close()
    prefetcher.close()

    # ------------------------------------------------------------------ the end
    # evaluated at the full length after the last step
    # (a rise there is logged, not stopped on: the run has ended)
    improved = state.step == schedule.total_steps and first_step < schedule.total_steps and evaluate()[0]
    if halted != "guard.eval_rise":  # a diverging state is not saved as `latest` over the good ones before it
        save(best=improved)
    stop = halted or ("requested" if state.step < schedule.total_steps else None)  # why it stopped early
    if halted == "guard.max_events":
        log(f"error: stopped after {guard.events} spike events (guard.max_events = {config.guard.max_events}); the "
            f"last good state is checkpointed at step {state.step}. Lower the LR (see `curriculum-pretrain diagnose "
            f"{run_dir}`) and resume with --resume auto")
    elif halted == "guard.eval_rise":
        saved = ", ".join(path.name for path in complete_checkpoints(checkpointer.directory)) or "none"
        best = checkpointer.best() if config.run.keep_best else None
        log(f"error: stopped at step {state.step}: the eval loss rose more than {100 * config.guard.eval_rise:g}% "
            f"above its lowest or was not finite (guard.eval_rise). Lower the LR and resume from a checkpoint "
            f"before the rise: --resume {checkpointer.directory}/<step> (checkpoints: {saved}"
            + (f"; the lowest eval loss: {best.name})" if best is not None else ")"))
    elif stop is not None:  # --stop-at-step or a signal
        log(f"stopped before step {state.step} of {schedule.total_steps}; checkpoint in {checkpointer.directory}")
    else:
        replicas = engine.replica_report(state.data_sha256)
        if not replicas["params_identical"]:
            log("WARNING: parameters differ between data-parallel ranks (see summary.json: replicas)")
        if logger is not None:
            _write_outputs(config, schedule, engine, run_dir, checkpointer.latest(), replicas, guard.events,
                           elapsed())
    if logger is not None:
        if stop is not None:  # for compare; a resume drops this line
            logger.log({"kind": "stop", "step": state.step, "tokens": state.tokens, "reason": stop})
        logger.close()
    close_processes()
    return 1 if halted else 0


def _restore(checkpointer: Any, engine: Any, path: Path, config: Config, model_fields: dict[str, Any],
             log: Callable[[str], None]) -> Any:
    """The engine, optimizer and RNG from ``path``, and the run state saved with them; a changed curriculum is
    allowed (a new LR for a later stage) and each change is logged."""
    from pipeline.checkpoint import saved_world_size

    state = checkpointer.load_state(engine.ds, path)
    log(f"resumed from {path} at step {state.step} ({state.tokens:,} tokens, data cursor {state.cursor})")
    if (saved := saved_world_size(path)) != checkpointer.world_size:
        log(f"the checkpoint was saved by {saved} rank{'s' if saved > 1 else ''}, resumed on "
            f"{checkpointer.world_size}: same data order and schedule, the optimizer state carried over, every rank "
            "on rank 0's RNG state")
    now = config.curriculum.model_dump(mode="json")
    for change in _changed_fields(state.curriculum, now, "curriculum"):
        log(f"resuming with a changed hyperparameter: {change}")
    state.curriculum, state.model, state.world_size, state.zero_stage = (now, model_fields, checkpointer.world_size,
                                                                         engine.zero_stage)
    return state


class _Phases:
    """The process's seconds before its first step, phase by phase; the first phase is the imports and the config
    read since this module was imported."""

    def __init__(self) -> None:
        self.mark = time.perf_counter()
        self.seconds = {"imports and config": self.mark - PROCESS_START}

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase], self.mark = now - self.mark, now

    def line(self) -> str:
        return (f"{sum(self.seconds.values()):.1f} s before the first step (compile warm-up included): "
                + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items()))


def _open_outputs(run_dir: Any, config: Config, schedule: Schedule, ds_config: dict[str, Any], state: Any,
                  engine: Any, guard: Any, resume_path: Optional[Path]) -> Any:
    """Rank 0, once everything is checked: config.json, ds_config.json, a copy of the data's tokenizer.json (what
    ``export`` builds the tokenizer from) and the metrics sinks (which drop what was logged from the resumed step
    on; the guard line of an event the checkpoint already counts, the one that stopped a run, is kept), with the
    compile line of the warm-up."""
    from pipeline.data import TOKENIZER_FILE
    from pipeline.metrics import RunLogger, describe_run, wandb_settings

    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.config.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    run_dir.ds_config.write_text(json.dumps(ds_config, indent=2) + "\n")
    if (tokenizer := Path(config.data.dir) / TOKENIZER_FILE).is_file():
        shutil.copyfile(tokenizer, run_dir.tokenizer)
    logger = RunLogger(run_dir.path, state.step, config.run.tensorboard, wandb_settings(config, run_dir.path),
                       keep_guard_events=guard.events if resume_path is not None else 0,
                       description=describe_run(config, schedule))
    if (monitor := engine.monitor) is not None:
        caches = {} if monitor.compile_caches is None else {"compile_caches": monitor.compile_caches}
        logger.log({"kind": "compile", "step": state.step, "graphs": monitor.graphs, "warmup_s": engine.warmup_s,
                    "graph_breaks": monitor.graph_breaks(), **caches})
    return logger


def _handle_spike(verdict: Any, step: int, stage: Any, values: Any, guard: Any, checkpointer: Any, engine: Any,
                  state: Any, logger: Any, log: Callable[[str], None]) -> bool:
    """Log the guard's event and carry out a rollback; True when the run went back to the last checkpoint."""
    event = _event_line(step, stage, values, verdict, guard)
    log(_event_message(event, guard.config.max_events))
    latest = checkpointer.latest() if verdict.action == "rollback" and not verdict.stop else None
    if verdict.action == "rollback" and latest is None:
        event["action"] = ("stop (guard.max_events reached)" if verdict.stop
                           else "skip (no checkpoint to roll back to yet)")
    if latest is not None:
        _roll_back(checkpointer, engine, latest, state, state.cursor + stage.samples_per_step, event)
        if logger is not None:
            logger.rewind(state.step)
    if logger is not None:
        logger.log(event)
    return latest is not None


def _report_compile_surprises(engine: Any, step: int, logger: Any, log: Callable[[str], None]) -> None:
    """A graph built after the warm-up, or dynamo giving up, in the log and as a ``kind: compile`` line."""
    for surprise in engine.monitor.surprises() if engine.monitor is not None else []:
        log(f"step {step}: torch.compile: {surprise}")
        if logger is not None:
            logger.log({"kind": "compile", "step": step, "surprise": surprise})


def _check_resume(run_dir: Any, resume_path: Optional[Path], config: Config, schedule: Schedule,
                  model_fields: dict[str, Any], zero_stage: int) -> None:
    """What a run must not do to what an earlier one wrote: start from step 0 in a directory that holds a run (its
    metrics would be overwritten), or load a checkpoint of another model shape, past this plan's end, of another
    ZeRO stage or one that cannot move to this world size. Checked before anything is built or written."""
    from pipeline.checkpoint import Checkpointer, check_world_size
    from pipeline.rundir import read_records

    if resume_path is None:
        lines = len(read_records(run_dir.metrics))
        if lines or run_dir.summary.exists():
            raise ConfigError("--output-dir", str(run_dir), f"holds a run ({lines} metrics lines) and no checkpoint "
                              "to resume from: train into another --output-dir, or remove this one to start over")
        return
    check_world_size(resume_path, schedule.world_size)
    saved = Checkpointer.peek(resume_path)
    if saved is None:
        return
    if saved.step > schedule.total_steps:
        raise ConfigError("--resume", str(resume_path),
                          f"checkpoint is at step {saved.step}, past this config's {schedule.total_steps} steps")
    if saved.zero_stage is not None and saved.zero_stage != zero_stage:
        overridden = "stage" in config.deepspeed.overrides.get("zero_optimization", {})
        raise ConfigError("deepspeed.overrides.zero_optimization.stage" if overridden else "deepspeed.template",
                          zero_stage if overridden else config.deepspeed.template,
                          f"gives ZeRO stage {zero_stage}; the checkpoint {resume_path} was saved under stage "
                          f"{saved.zero_stage}, whose files DeepSpeed lays out differently: resume with stage "
                          f"{saved.zero_stage}, or train into another --output-dir")
    changed = sorted((key != "model_type", key) for key in set(saved.model) | set(model_fields)
                     if saved.model.get(key) != model_fields.get(key))
    if not saved.model or not changed:
        return
    key = changed[0][1]
    old, new = saved.model.get(key), model_fields.get(key)
    field, value = (("model.arch", config.model.arch) if key == "model_type"
                    else (f"model.overrides.{key}", new) if key in config.model.overrides
                    else ("data.dir", config.data.dir) if key == "vocab_size"
                    else ("curriculum (the longest seq_len)", new) if key in ("max_position_embeddings", "n_positions")
                    else ("model.preset", config.model.preset))
    raise ConfigError(field, value, f"the checkpoint {resume_path} is of a model with {key} = {old!r} (this config "
                      f"gives {new!r}); resume with the same model, or train into another --output-dir")


def _guarded_update(guard: Any, engine: Any, schedule: Schedule, step: int, stage: int) -> Callable[[Any], Any]:
    """The spike guard between the step's synchronisation and its update (``Engine.train_step``'s ``decide``)."""

    def decide(values: Any, after_update: bool = False) -> Any:
        if after_update:
            return guard.after_update(step, stage, values.loss, values.grad_norm)
        verdict = guard.before_update(step, stage, values.loss, values.grad_norm, norm_follows=engine.norm_follows)
        if verdict.action == "scale_lr":  # this step's update is applied at the lower LR
            engine.set_lr(schedule.lr_at(step) * guard.lr_factor(step))
        return verdict

    return decide


def _roll_back(checkpointer: Any, engine: Any, checkpoint: Path, state: Any, skip_to: int,
               event: dict[str, Any]) -> None:
    """Back to ``checkpoint`` and past the data of the steps since, the spike's included: the weights, optimizer
    and RNG come from the checkpoint, the data cursor moves to ``skip_to``; the guard keeps its events, and the
    time spent stays spent."""
    restored = checkpointer.load_state(engine.ds, checkpoint)
    event.update(restored_from=checkpoint.name, restored_step=restored.step,
                 skipped_samples=skip_to - restored.cursor, params_sha256=engine.params_sha256(),
                 checkpoint_params_sha256=restored.params_sha256)
    state.step, state.tokens, state.data_sha256, state.cursor = (restored.step, restored.tokens,
                                                                 restored.data_sha256, skip_to)


def _write_outputs(config: Config, schedule: Schedule, engine: Any, run_dir: Any, checkpoint: Path,
                   replicas: dict[str, Any], guard_events: int, elapsed_s: float) -> None:
    """Rank 0 at the end of a run: the model exported from the last checkpoint (as ``export`` would), summary.json,
    training.png and the closing lines."""
    from pipeline.export import export_checkpoint
    from pipeline.metrics import plot_run, write_summary

    if config.run.export:
        export_checkpoint(run_dir, checkpoint, run_dir.final)
    summary = write_summary(run_dir.path, {"name": config.name, "world_size": engine.processes.world_size,
                                      "precision": engine.precision, "device": engine.device.type,
                                      "optimizer": engine.optimizer_name, "replicas": replicas,
                                      "guard_events": guard_events, "warmup_s": engine.warmup_s,
                                      "peak_memory_gib": engine.peak_memory_gib(), "wall_s": elapsed_s})
    plot = plot_run(run_dir.path)
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']:.0f} s; "
          f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, eval loss "
          f"{summary['final_eval_loss']:.3f} at seq_len {schedule.max_seq_len}"
          + (f"; {guard_events} spike events" if guard_events else "") + "\n"
          f"  metrics: {run_dir.metrics} (and .csv{', tensorboard/' if config.run.tensorboard else ''})\n"
          f"  plot:    {plot}\n  summary: {run_dir.summary}"
          + (f"\n  model:   {run_dir.final}" if config.run.export else ""))


def _event_line(step: int, stage: Any, values: Any, verdict: Any, guard: Any) -> dict[str, Any]:
    spike = verdict.spike
    return {"kind": "guard", "step": step, "stage": stage.index, "seq_len": stage.seq_len, "loss": values.loss,
            "grad_norm": values.grad_norm, "reason": spike.reason, "value": spike.value,
            "running_average": spike.running_average, "action": verdict.action, "events": guard.events,
            "new_level": verdict.new_level}


NEW_LEVEL_NOTE = " (a new level of the gradient norm: its history restarts here)"


def _event_message(event: dict[str, Any], max_events: int) -> str:
    average = event["running_average"]
    return (f"step {event['step']}: {event['reason']} ({event['value']:.4g} vs running average "
            f"{average if average is None else f'{average:.4g}'}) in stage {event['stage']} (seq_len "
            f"{event['seq_len']}): {event['action']}{NEW_LEVEL_NOTE if event['new_level'] else ''} "
            f"[event {event['events']} of at most {max_events}]")


def _changed_fields(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new))
                for change in _changed_fields(old.get(key), new.get(key), f"{path}.{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [change for i, (a, b) in enumerate(zip(old, new)) for change in _changed_fields(a, b, f"{path}.{i}")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _install_stop_handler() -> Callable[[], bool]:
    """SIGTERM/SIGUSR1 (schedulers send them before preemption): finish the step, checkpoint, exit."""
    requested = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        requested["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
    return lambda: requested["stop"]


if __name__ == "__main__":
    sys.exit(main())
