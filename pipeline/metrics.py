"""Run outputs on rank 0: metrics.jsonl and its CSV twin, TensorBoard, wandb (offline), the plot and summary.json.

One JSONL line per logged step (``kind: train``) and per evaluation (``kind: eval``). Fields of a train line:
``step, tokens, stage, seq_len, global_batch, lr, grad_clip, loss, grad_norm, tok_per_s, mfu, elapsed_s,
train_s``; ``tokens`` counts tokens trained up to and including this step, from the batches actually trained.
``tok_per_s`` is this step's tokens over its wall time (from the end of the previous step to this step's loss);
``mfu`` is ``flops_per_token(seq_len) * tok_per_s / (world_size * peak_flops)`` (see
``pipeline.model.flops_per_token``), empty where the peak is unknown (CPU). ``elapsed_s`` is the run's wall time
so far (start-up, compilation, evaluations and checkpoints included, summed over resumed segments), ``train_s``
the part of it spent in training steps. An eval line has ``eval_loss, eval_ppl`` and the seconds it took,
``eval_s``. ``kind: compile`` lines list the compiled graphs and the warm-up time, and report anything compiled or
given up after the warm-up; ``kind: guard`` lines are spike-guard events (``pipeline.guard``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.rundir import RunDir, final_train_loss, read_records

CSV_FIELDS = ["kind", "step", "tokens", "stage", "seq_len", "global_batch", "lr", "grad_clip", "loss", "grad_norm",
              "tok_per_s", "mfu", "elapsed_s", "eval_loss", "eval_ppl", "train_s", "eval_s"]


class RunLogger:
    """Writes every metric sink; create it on rank 0 only."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, wandb_settings: Optional[dict[str, Any]],
                 keep_guard_events: int = 0) -> None:
        self.run_dir = run_dir
        self.jsonl_path = RunDir(run_dir).metrics
        self.csv_path = RunDir(run_dir).metrics_csv
        self._drop_lines_from(resume_step, keep=lambda r: r["kind"] == "guard" and r["events"] <= keep_guard_events)
        self._open()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=resume_step or None)
        self._wandb = None
        if wandb_settings is not None:
            import wandb

            self._wandb = wandb.init(dir=str(run_dir), resume="allow", id=wandb_settings.pop("id"),
                                     **wandb_settings)

    def _open(self) -> None:
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()

    def rewind(self, step: int) -> None:
        """After a rollback to ``step``: forget the train and eval lines from there on (those steps run again);
        the guard lines that explain the rollback stay."""
        self._jsonl.close()
        self._csv_file.close()
        self._drop_lines_from(step, keep=lambda r: r["kind"] == "guard")
        self._open()

    def _drop_lines_from(self, step: int, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Forget what was logged at or after ``step`` (it will be logged again), except the lines ``keep`` keeps;
        a last line torn by a kill is dropped too. Both files are replaced atomically."""
        if not self.jsonl_path.exists():
            return
        kept = [r for r in read_records(self.jsonl_path) if r["step"] < step or keep(r)]
        _replace(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        _replace(self.csv_path, buffer.getvalue())

    def log(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv.writerow(record)
        self._csv_file.flush()
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "kind") and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        if self._wandb is not None:
            self._wandb.log({f"{record['kind']}/{k}": v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_settings(config: Any, run_dir: Path) -> Optional[dict[str, Any]]:
    """``wandb.init`` arguments for an offline (or online) run that resumes into the same wandb run id."""
    if not config.run.wandb.enabled:
        return None
    import hashlib

    run_id = f"{config.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
    return {"project": config.run.wandb.project, "name": config.name, "id": run_id, "mode": config.run.wandb.mode,
            "config": config.model_dump(mode="json")}


class Progress:
    """What a person watching a run sees: a progress bar on a terminal; in a file (SLURM output, a sweep's
    train.log, ``> log 2>&1``), one plain line every ``run.log_every`` steps instead."""

    def __init__(self, config: Any, schedule: Any, start_step: int, enabled: bool) -> None:
        import sys

        from tqdm import tqdm

        self.total = schedule.total_steps
        self.every = config.run.log_every
        self.enabled = enabled
        self.bar = (tqdm(total=self.total, initial=start_step, dynamic_ncols=True, desc=config.name)
                    if enabled and sys.stdout.isatty() else None)
        self._start: Optional[tuple[int, float]] = None  # (step, train_s) of the first step seen, for the ETA

    def update(self, record: dict[str, Any], events: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stage=record["stage"], seq=record["seq_len"], loss=f"{record['loss']:.3f}",
                                 tok_s=f"{record['tok_per_s']:,.0f}", events=events, refresh=False)
            return
        step = record["step"]
        if self._start is None:
            self._start = (step, record["train_s"])
        if step % self.every and step != self.total - 1:
            return
        done, spent = step - self._start[0], record["train_s"] - self._start[1]
        eta = spent / done * (self.total - 1 - step) if done > 0 else None
        norm = record["grad_norm"]
        print(f"step {step}/{self.total} stage {record['stage']} seq_len {record['seq_len']} "
              f"loss {record['loss']:.4f} lr {record['lr']:.3e} grad_norm {'-' if norm is None else f'{norm:.3g}'} "
              f"tok/s {record['tok_per_s']:,.0f} ETA {'-' if eta is None else _duration(eta)}"
              + (f" guard events {events}" if events else ""), flush=True)

    def rewind(self, step: int) -> None:
        if self.bar is not None:
            self.bar.reset(total=self.total)
            self.bar.update(step)
        self._start = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_records(RunDir(run_dir).metrics)


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(run_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """summary.json from metrics.jsonl: tokens, time, the first and the last step's loss, the final train loss (the
    run directory's definition, ``pipeline.rundir.final_train_loss``: what runs are compared by), the last
    evaluation, and per-stage throughput."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    stages: dict[int, list[dict[str, Any]]] = {}
    for r in train:
        stages.setdefault(r["stage"], []).append(r)
    # the first step of a stage pays for new shapes (allocation, kernel selection): leave it out of the medians,
    # unless it is the stage's only step
    timed = {index: rows[1:] or rows for index, rows in stages.items()}
    summary = {
        **extra,
        "steps": train[-1]["step"] + 1 if train else 0,
        "tokens": train[-1]["tokens"] if train else 0,
        "elapsed_s": train[-1]["elapsed_s"] if train else 0.0,
        "train_s": train[-1].get("train_s") if train else None,
        "eval_s": sum(r.get("eval_s") or 0.0 for r in evals),
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "final_train_loss": final_train_loss(train),
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_eval_ppl": evals[-1]["eval_ppl"] if evals else None,
        "stages": [
            {
                "stage": index,
                "seq_len": rows[0]["seq_len"],
                "steps": len(rows),
                "mean_loss_last_10": _mean([r["loss"] for r in rows[-10:]]),
                "median_tok_per_s": _median([r["tok_per_s"] for r in timed[index]]),
                "median_mfu": _median([r["mfu"] for r in timed[index] if r["mfu"] is not None]),
            }
            for index, rows in sorted(stages.items())
        ],
    }
    RunDir(run_dir).summary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_run(run_dir: Path) -> Path:
    """training.png: loss vs tokens coloured by stage (eval loss as black dots), LR vs step, seq_len vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_lr, ax_len) = plt.subplots(3, 1, figsize=(9, 10))
    for stage in sorted({r["stage"] for r in train}):
        rows = [r for r in train if r["stage"] == stage]
        ax_loss.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1,
                     label=f"stage {stage} (seq {rows[0]['seq_len']})")
    if evals:
        ax_loss.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "ko", ms=4,
                     label="eval (full length)")
    ax_loss.set(xlabel="tokens", ylabel="loss", title="loss vs tokens, by stage")
    ax_loss.legend(fontsize=8)
    steps = [r["step"] for r in train]
    ax_lr.plot(steps, [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="learning rate")
    ax_len.step(steps, [r["seq_len"] for r in train], where="post")
    ax_len.set(xlabel="step", ylabel="seq_len")
    fig.tight_layout()
    out = RunDir(run_dir).plot
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
