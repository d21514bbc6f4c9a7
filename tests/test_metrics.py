"""Run outputs: metrics.jsonl and its CSV twin (also across a resume), summary.json and the plot.

TensorBoard and wandb are off here; the records are the ones the training loop writes, with made-up values.
"""

from __future__ import annotations

import csv
import json
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
