"""Run outputs: metrics.jsonl and its CSV twin (also across a resume), summary.json, the plot, and what TensorBoard
reads back (also across a resume) and what wandb is given.

The records are the ones the training loop writes, with made-up values.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Optional

import pytest

from pipeline.metrics import RunLogger, plot_run, read_metrics, write_summary

# the documented columns: every train field, then the eval ones, after ``kind``; then the time split
COLUMNS = ["kind", "step", "tokens", "stage", "seq_len", "global_batch", "lr", "grad_clip", "loss", "grad_norm",
           "tok_per_s", "mfu", "elapsed_s", "eval_loss", "eval_ppl", "train_s", "eval_s"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_record(step: int, stage: int = 0, seq_len: int = 64, tok_per_s: float = 1000.0,
                 mfu: Optional[float] = None, loss: Optional[float] = None) -> dict[str, Any]:
    """A train line as the loop logs it: 8 sequences per step, so ``tokens = (step + 1) x 8 x seq_len``
    (one stage only; the summary tests set tokens themselves where stages change)."""
    return {"kind": "train", "step": step, "tokens": (step + 1) * 8 * seq_len, "stage": stage, "seq_len": seq_len,
            "global_batch": 8, "lr": 1e-3, "grad_clip": 1.0, "loss": 5.0 - 0.1 * step if loss is None else loss,
            "grad_norm": 0.5, "tok_per_s": tok_per_s, "mfu": mfu, "elapsed_s": 0.1 * (step + 1)}


def eval_record(step: int, eval_loss: float) -> dict[str, Any]:
    return {"kind": "eval", "step": step, "tokens": (step + 1) * 8 * 64, "seq_len": 256, "eval_loss": eval_loss,
            "eval_ppl": 2.0 ** eval_loss, "elapsed_s": 0.1 * (step + 1)}


def write_run(run_dir: Path, records: list[dict[str, Any]], resume_step: int = 0) -> None:
    logger = RunLogger(run_dir, resume_step, tensorboard=False, wandb_settings=None)
    for record in records:
        logger.log(record)
    logger.close()


def read_csv(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# --------------------------------------------------------------------------------------------------- RunLogger


def test_jsonl_and_csv_twin(tmp_path: Path) -> None:
    records = [train_record(0, mfu=0.25), train_record(1), eval_record(1, 4.5), train_record(2)]
    write_run(tmp_path, records)
    assert read_metrics(tmp_path) == records  # one JSON line per record, unchanged
    header, rows = read_csv(tmp_path)
    assert header == COLUMNS
    assert [row["kind"] for row in rows] == ["train", "train", "eval", "train"]
    assert rows[0]["step"] == "0" and rows[0]["tokens"] == "512" and rows[0]["mfu"] == "0.25"
    assert rows[1]["mfu"] == ""  # no known peak (CPU): empty, not "None"
    assert rows[0]["eval_loss"] == "" and rows[0]["eval_ppl"] == ""  # train lines leave the eval columns empty
    assert rows[2]["eval_loss"] == "4.5" and rows[2]["stage"] == "" and rows[2]["seq_len"] == "256"
    for record, row in zip(records, rows):
        assert {key: row[key] for key in record} == {key: "" if value is None else str(value)
                                                     for key, value in record.items()}


def test_no_other_sinks_without_tensorboard_or_wandb(tmp_path: Path) -> None:
    write_run(tmp_path, [train_record(0)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]


@pytest.mark.parametrize("resume_step", [0, 2, 3, 5])
def test_resume_drops_lines_at_and_after_the_resumed_step(tmp_path: Path, resume_step: int) -> None:
    """Steps 0..4 were logged (and an eval at step 2); resuming at step k logs k again, so lines >= k go."""
    first_run = [train_record(0), train_record(1), train_record(2), eval_record(2, 4.0), train_record(3),
                 train_record(4)]
    write_run(tmp_path, first_run)
    kept = [r for r in first_run if r["step"] < resume_step]
    logger = RunLogger(tmp_path, resume_step, tensorboard=False, wandb_settings=None)
    assert read_metrics(tmp_path) == kept  # dropped as soon as the logger starts
    header, rows = read_csv(tmp_path)
    assert header == COLUMNS and [(row["kind"], int(row["step"])) for row in rows] == \
        [(r["kind"], r["step"]) for r in kept]
    resumed = [train_record(step, loss=1.0) for step in range(resume_step, 6)]
    for record in resumed:
        logger.log(record)
    logger.close()
    assert read_metrics(tmp_path) == kept + resumed
    header, rows = read_csv(tmp_path)
    assert header == COLUMNS  # one header, not one per run
    assert [(row["kind"], int(row["step"]), float(row["loss"]) if row["loss"] else None) for row in rows] == \
        [(r["kind"], r["step"], r.get("loss")) for r in kept + resumed]


# --------------------------------------------------------------------------------------------------- summary


def test_summary_medians_skip_each_stage_first_step(tmp_path: Path) -> None:
    records = [
        # stage 0 (seq 64): first step slow (new shapes), then 100, 300, 200 -> median 200 (with it: 150)
        train_record(0, stage=0, seq_len=64, tok_per_s=10.0, mfu=0.01),
        train_record(1, stage=0, seq_len=64, tok_per_s=100.0, mfu=0.10),
        train_record(2, stage=0, seq_len=64, tok_per_s=300.0, mfu=0.30),
        train_record(3, stage=0, seq_len=64, tok_per_s=200.0, mfu=0.20),
        eval_record(3, 4.0),
        # stage 1 (seq 128): first step slow again, then 400, 600 -> median 500 (with it: 400)
        train_record(4, stage=1, seq_len=128, tok_per_s=5.0, mfu=0.02),
        train_record(5, stage=1, seq_len=128, tok_per_s=400.0, mfu=0.40),
        train_record(6, stage=1, seq_len=128, tok_per_s=600.0, mfu=0.60),
        eval_record(6, 3.5),
    ]
    write_run(tmp_path, records)
    summary = write_summary(tmp_path, {"name": "unit"})
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["name"] == "unit"
    assert summary["steps"] == 7 and summary["tokens"] == records[-2]["tokens"]
    assert summary["first_loss"] == records[0]["loss"] and summary["final_loss"] == records[-2]["loss"]
    assert summary["final_eval_loss"] == 3.5
    stage0, stage1 = summary["stages"]
    assert (stage0["stage"], stage0["seq_len"], stage0["steps"]) == (0, 64, 4)
    assert stage0["median_tok_per_s"] == 200.0 and stage0["median_mfu"] == pytest.approx(0.20)
    assert (stage1["stage"], stage1["seq_len"], stage1["steps"]) == (1, 128, 3)
    assert stage1["median_tok_per_s"] == 500.0 and stage1["median_mfu"] == pytest.approx(0.50)
    assert stage1["mean_loss_last_10"] == pytest.approx((4.6 + 4.5 + 4.4) / 3)


def test_summary_of_a_one_step_stage_uses_that_step(tmp_path: Path) -> None:
    """A stage of one step has no other step to take: its only step gives both medians."""
    write_run(tmp_path, [train_record(0, stage=0, tok_per_s=10.0, mfu=0.01),
                         train_record(1, stage=0, tok_per_s=20.0, mfu=0.02),
                         train_record(2, stage=1, seq_len=128, tok_per_s=30.0, mfu=0.03)])
    stage0, stage1 = write_summary(tmp_path, {})["stages"]
    assert stage0["median_tok_per_s"] == 20.0 and stage0["median_mfu"] == 0.02
    assert stage1["median_tok_per_s"] == 30.0 and stage1["median_mfu"] == 0.03


def test_summary_without_mfu(tmp_path: Path) -> None:
    write_run(tmp_path, [train_record(step) for step in range(3)])
    (stage,) = write_summary(tmp_path, {})["stages"]
    assert stage["median_mfu"] is None and stage["median_tok_per_s"] == 1000.0
    assert write_summary(tmp_path, {})["final_eval_loss"] is None


# --------------------------------------------------------------------------------------------------- plot


def test_plot_run_writes_a_png(tmp_path: Path) -> None:
    write_run(tmp_path, [train_record(0, stage=0), train_record(1, stage=0), eval_record(1, 4.0),
                         train_record(2, stage=1, seq_len=128), train_record(3, stage=1, seq_len=128)])
    path = plot_run(tmp_path)
    assert path == tmp_path / "training.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def two_stage_records() -> list[dict[str, Any]]:
    """Stage 0: 8 x 64 = 512 tokens per step, steps 0-3 (2,048 tokens), clip 5; stage 1: 4 x 128 = 512, steps 4-7
    (to 4,096), clip 1; evaluations after steps 3 and 7."""
    records = []
    for step in range(8):
        stage = step // 4
        records.append({**train_record(step, stage=stage, seq_len=64 << stage), "global_batch": 8 >> stage,
                        "tokens": (step + 1) * 512, "grad_clip": 5.0 if stage == 0 else 1.0,
                        "grad_norm": 2.0 / (step + 1)})
        if step % 4 == 3:
            records.append({**eval_record(step, 4.5 - 0.5 * stage), "tokens": (step + 1) * 512})
    return records


def test_training_figure_panels_share_the_token_axis_and_mark_each_stage_start() -> None:
    """Loss (by stage, eval dots), LR, seq_len and gradient norm (log, with the clip dashed) over one token axis
    labelled 1K, 2K, ...; stage 1 starts after step 3, at 2,048 tokens: a vertical line there on every panel."""
    from pipeline.metrics import training_figure

    records = two_stage_records()
    fig = training_figure(records)
    fig.canvas.draw()
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["loss", "learning rate", "seq_len", "gradient norm"]
    assert len({ax.get_xlim() for ax in axes}) == 1
    for ax in axes:
        verticals = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]
        assert [line.get_xdata()[0] for line in verticals] == [2048], ax.get_ylabel()
        labels = [label.get_text() for label in ax.get_xticklabels() if label.get_text()]
        assert labels and all(re.fullmatch(r"\d+|[\d.]+K", label) for label in labels), labels
    assert axes[0].xaxis.get_major_formatter()(1_500_000, 0) == "1.5M"
    assert axes[0].xaxis.get_major_formatter()(4.33e9, 0) == "4.33B"
    eval_dots = [line for line in axes[0].get_lines() if line.get_marker() == "o"]
    assert [list(line.get_ydata()) for line in eval_dots] == [[4.5, 4.0]]
    norm = axes[3]
    assert norm.get_yscale() == "log"
    (clip,) = [line for line in norm.get_lines() if line.get_linestyle() == "--"]
    assert set(clip.get_ydata()) == {5.0, 1.0}
    import matplotlib.pyplot as plt

    plt.close(fig)


def read_tensorboard(directory: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_gets_the_config_and_hparams_and_a_resumed_run_replaces_what_it_logs_again(
        tmp_path: Path) -> None:
    """Steps 0-7 with evaluations after 3 and 7, then a resume from step 5 that logs 5-7 again: TensorBoard reads
    back each step once (purge_step), the config as text, and the hparams (base_lr, seq_lens, total steps and
    tokens) with eval/eval_loss as their metric, whose last value is the final eval loss."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    from curriculum.loading import load_config
    from curriculum.schedule import build_schedule
    from pipeline.metrics import describe_run

    config = load_config("tiny-cpu", environ={})
    description = describe_run(config, build_schedule(config))
    records = two_stage_records()
    logger = RunLogger(tmp_path, 0, tensorboard=True, wandb_settings=None, description=description)
    for record in records:
        logger.log(record)
    logger.close()
    logger = RunLogger(tmp_path, 5, tensorboard=True, wandb_settings=None, description=description)
    resumed = [{**r, "loss": r.get("loss", 0.0) - 1.0, "eval_loss": 3.25} for r in records if r["step"] >= 5]
    for record in resumed:
        logger.log(record)
    logger.close()

    events = read_tensorboard(tmp_path / "tensorboard")
    expected = [r for r in records if r["kind"] == "train" and r["step"] < 5] + \
        [r for r in resumed if r["kind"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(8))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in expected])
    assert [(e.step, e.value) for e in events.Scalars("eval/eval_loss")] == [(3, 4.5), (7, 3.25)]

    texts = events.Tensors("config/text_summary")  # torch's SummaryWriter.add_text adds /text_summary
    assert [e.step for e in texts] == [0, 5]  # where each segment started
    text = texts[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("    name: tiny-cpu\n") and "    curriculum:\n" in text and "base_lr: 0.002" in text

    def plugin_data(tag: str) -> Any:
        return plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")[tag])

    experiment = plugin_data("_hparams_/experiment").experiment
    assert [metric.name.tag for metric in experiment.metric_infos] == ["eval/eval_loss"]
    hparams = plugin_data("_hparams_/session_start_info").session_start_info.hparams
    assert {key: getattr(value, value.WhichOneof("kind")) for key, value in hparams.items()} == {
        "base_lr": 2e-3, "seq_lens": "64,128,256", "total_steps": 200, "total_tokens": 409_600}


def test_wandb_settings_name_the_run_and_its_group() -> None:
    """The run is named after the config unless run.wandb.name says otherwise; run.wandb.group groups it; the id
    is the same for the same run directory (a resumed run continues the wandb run)."""
    from curriculum.loading import load_config
    from pipeline.metrics import wandb_settings

    assert wandb_settings(load_config("tiny-cpu", environ={}), Path("runs/x")) is None
    plain = wandb_settings(load_config("tiny-cpu", ["run.wandb.enabled=true"], environ={}), Path("runs/x"))
    assert plain is not None
    assert (plain["name"], plain["group"], plain["mode"], plain["project"]) == ("tiny-cpu", None, "offline",
                                                                              "curriculum-pretrain")
    named = wandb_settings(load_config("tiny-cpu", ["run.wandb.enabled=true", "run.wandb.group=sweep-1",
                                                    "run.wandb.name=tiny-cpu-lr_1.00e-03"], environ={}),
                           Path("runs/x"))
    assert named is not None
    assert (named["name"], named["group"], named["id"]) == ("tiny-cpu-lr_1.00e-03", "sweep-1", plain["id"])
