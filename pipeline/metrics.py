"""Run outputs on rank 0: metrics.jsonl and its CSV twin, TensorBoard, wandb (offline), the plot and summary.json.

One JSONL line per logged step (``kind: train``) and per evaluation (``kind: eval``). Fields of a train line:
``step, tokens, stage, seq_len, global_batch, lr, grad_clip, loss, grad_norm, tok_per_s, mfu, elapsed_s,
train_s, world_size`` (the CSV leaves out ``world_size``); ``tokens`` counts tokens trained up to and including
this step, from the batches actually trained.
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

from pipeline.rundir import RunDir, final_train_loss, read_records, stage_throughput

CSV_FIELDS = ["kind", "step", "tokens", "stage", "seq_len", "global_batch", "lr", "grad_clip", "loss", "grad_norm",
              "tok_per_s", "mfu", "elapsed_s", "eval_loss", "eval_ppl", "train_s", "eval_s"]


class RunLogger:
    """Writes every metric sink; create it on rank 0 only.

    TensorBoard gets every scalar at its step and, given the run's ``description`` (``describe_run``), the run
    config as text (tag ``config/text_summary``, at the step the run starts or resumes from) and the hparams
    plugin's summaries: a few hyperparameters with ``eval/eval_loss`` as the metric, whose last value (the final
    eval loss, once the run has ended) the hparams table shows. A resumed run opens the directory with
    ``purge_step``: TensorBoard drops what the earlier segment logged from that step on, and of the hparams written
    again keeps the first. wandb (``wandb_settings``) gets every line with ``tokens`` as its step metric."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, wandb_settings: Optional[dict[str, Any]],
                 keep_guard_events: int = 0, description: Optional[dict[str, Any]] = None) -> None:
        self.run_dir = run_dir
        self.jsonl_path = RunDir(run_dir).metrics
        self.csv_path = RunDir(run_dir).metrics_csv
        self._drop_lines_from(resume_step, keep=lambda r: r["kind"] == "guard" and r["events"] <= keep_guard_events)
        self._open()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=resume_step or None)
            if description is not None:
                _describe_to_tensorboard(self._tb, description, resume_step)
        self._wandb = None
        if wandb_settings is not None:
            import wandb

            self._wandb = wandb.init(dir=str(run_dir), resume="allow", id=wandb_settings.pop("id"),
                                     **wandb_settings)
            self._wandb.define_metric("tokens")
            self._wandb.define_metric("*", step_metric="tokens")  # guard lines, which have none, take the last

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
        if record["kind"] == "stop":  # a reason, no metric: the files only
            return
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "kind") and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        if self._wandb is not None:
            tokens = {"tokens": record["tokens"]} if "tokens" in record else {}
            self._wandb.log({**tokens, **{f"{record['kind']}/{k}": v for k, v in scalars.items()}},
                            step=record["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _describe_to_tensorboard(writer: Any, description: dict[str, Any], step: int) -> None:
    """The config as text and the hparams summaries, with ``eval/eval_loss`` as the metric, at ``step``."""
    from torch.utils.tensorboard.summary import hparams

    # four-space indent: a code block in the text plugin's markdown
    writer.add_text("config", "    " + description["config"].replace("\n", "\n    "), step)
    experiment, session_start, _ = hparams(description["hparams"], {"eval/eval_loss": None})
    for summary in (experiment, session_start):
        writer.file_writer.add_summary(summary, step)


def describe_run(config: Any, schedule: Any) -> dict[str, Any]:
    """What ``RunLogger`` writes to TensorBoard besides the scalars: the config as YAML text, and the hparams."""
    import yaml

    lengths = dict.fromkeys(stage.seq_len for stage in schedule.stages)  # each once, in order: 64,128,256
    return {"config": yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
            "hparams": {"base_lr": config.curriculum.base_lr, "seq_lens": ",".join(map(str, lengths)),
                        "total_steps": schedule.total_steps, "total_tokens": schedule.total_tokens}}


def wandb_settings(config: Any, run_dir: Path) -> Optional[dict[str, Any]]:
    """``wandb.init`` arguments for an offline (or online) run that resumes into the same wandb run id."""
    if not config.run.wandb.enabled:
        return None
    import hashlib

    settings = config.run.wandb
    run_id = f"{config.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
    return {"project": settings.project, "name": settings.name or config.name, "group": settings.group,
            "id": run_id, "mode": settings.mode, "config": config.model_dump(mode="json")}


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
        "stages": stage_throughput(train),
    }
    RunDir(run_dir).summary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_run(run_dir: Path) -> Path:
    """training.png (``training_figure``) from the run's metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = training_figure(read_metrics(run_dir))
    out = RunDir(run_dir).plot
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def training_figure(records: list[dict[str, Any]]) -> Any:
    """Four panels over one token axis: loss coloured by stage with the evaluations as black dots, LR, seq_len, and
    the gradient norm (log scale) under its clip (dashed). A dotted vertical line marks each stage's start on every
    panel.

    A line's ``tokens`` counts the tokens up to and including its step, so a step covers
    ``(tokens - global_batch x seq_len, tokens]``: stage 1 of tiny-cpu (2,048 tokens per step) starts at 122,880
    tokens, after step 59, and the step lines of seq_len and clip change there. (With ``run.log_every`` above 1 a
    stage's line is drawn before its first logged step.)"""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from curriculum.plan import human_count

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_lr, ax_len, ax_norm) = plt.subplots(4, 1, figsize=(9, 12), sharex=True)
    stage_starts = []
    for stage in sorted({r["stage"] for r in train}):
        rows = [r for r in train if r["stage"] == stage]
        first = rows[0]
        stage_starts.append(first["tokens"] - first["global_batch"] * first["seq_len"])
        ax_loss.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1,
                     label=f"stage {stage} (seq {first['seq_len']})")
    if evals:
        ax_loss.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "ko", ms=4,
                     label="eval (full length)")
    ax_loss.set(ylabel="loss", title="loss vs tokens, by stage")
    ax_loss.legend(fontsize=8)
    tokens = [r["tokens"] for r in train]
    ax_lr.plot(tokens, [r["lr"] for r in train])
    ax_lr.set(ylabel="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_len.step(tokens, [r["seq_len"] for r in train], where="pre")
    ax_len.set(ylabel="seq_len")
    normed = [r for r in train if r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0]
    ax_norm.plot([r["tokens"] for r in normed], [r["grad_norm"] for r in normed], lw=1, label="gradient norm")
    ax_norm.step(tokens, [r["grad_clip"] for r in train], where="pre", ls="--", color="black", lw=1,
                 label="grad_clip")
    if train:
        ax_norm.set_yscale("log")
    ax_norm.set(ylabel="gradient norm", xlabel="tokens")
    ax_norm.legend(fontsize=8)
    for ax in (ax_loss, ax_lr, ax_len, ax_norm):
        for start in stage_starts:
            if start > 0:
                ax.axvline(start, color="grey", ls=":", lw=1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_count(x, ".4g")))  # 150K, 1.25M, 4.5B
        ax.tick_params(labelbottom=True)  # every panel keeps its own token labels
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
