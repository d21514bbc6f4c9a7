"""A run directory: the names of what a run writes, one reader of its metrics, one meaning of "final loss".

    config.json, ds_config.json   the run config and the DeepSpeed JSON the engine got
    tokenizer.json                the data's tokenizer, copied at the start (what ``export`` saves with the model)
    metrics.jsonl, metrics.csv    one line per logged step (``kind: train``), evaluation (``eval``), spike-guard
                                  event (``guard``) and compile report (``compile``), and a ``stop`` line when a
                                  run stopped before its end (its reason in metrics.jsonl only)
    tensorboard/, wandb/          the same scalars
    training.png, summary.json    written at the end
    checkpoints/, final/          ``step<N>``/``latest``/``best``, and the model exported from the last checkpoint
    train.log                     the trainer's output when a sweep started it

Used by train, export, diagnose, sweep, bench and compare; nothing else spells these names.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.loading import validate_config

Record = dict[str, Any]

FINAL_LOSS_STEPS = 5
"""The final train loss of a run is the mean of its last 5 logged train losses."""


class RunDir:
    """The paths of one run directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    ds_config = property(lambda self: self.path / "ds_config.json")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    metrics_csv = property(lambda self: self.path / "metrics.csv")
    tensorboard = property(lambda self: self.path / "tensorboard")
    summary = property(lambda self: self.path / "summary.json")
    plot = property(lambda self: self.path / "training.png")
    checkpoints = property(lambda self: self.path / "checkpoints")
    final = property(lambda self: self.path / "final")
    train_log = property(lambda self: self.path / "train.log")

    def world_size(self) -> Optional[int]:
        """The data-parallel ranks of the run's latest start, from ds_config.json (``train_batch_size`` over
        micro-batch x accumulation); None when it does not say. Train lines carry their own ``world_size``: this is
        for lines written before they did."""
        try:
            ds = json.loads(self.ds_config.read_text())
            ranks, rest = divmod(ds["train_batch_size"],
                                 ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            return None
        return ranks if isinstance(ranks, int) and ranks >= 1 and rest == 0 else None

    def __str__(self) -> str:
        return str(self.path)


def read_records(path: Path, strict: bool = False) -> list[Record]:
    """The JSON objects of a metrics.jsonl (blank lines skipped; none when the file does not exist).

    A line that does not parse is dropped when it is the last one (a write torn by a kill) and ``strict`` is off;
    any other bad line raises ``ConfigError`` naming the file and the line number."""
    return [record for _, record in read_numbered(path, strict)]


def read_numbered(path: Path, strict: bool = False) -> list[tuple[int, Record]]:
    """``read_records`` with each record's line number (from 1), for messages that point at a line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if not strict and number == len(lines):
                break
            raise ConfigError(f"{path}:{number}", _shorten(line), f"not a JSON line ({err.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}", _shorten(line), "not a JSON object")
        records.append((number, record))
    return records


NUMBER_FIELDS: dict[str, dict[str, str]] = {
    "train": {"step": "required", "stage": "required", "seq_len": "required", "loss": "required",
              "grad_norm": "nullable", "grad_clip": "nullable", "tok_per_s": "required", "tokens": "optional",
              "global_batch": "optional", "mfu": "nullable", "elapsed_s": "optional", "train_s": "optional",
              "world_size": "optional"},
    "eval": {"step": "required", "eval_loss": "required", "tokens": "optional", "eval_s": "optional",
             "train_s": "optional", "elapsed_s": "optional"},
    "guard": {"step": "required"},
    "compile": {"step": "required", "warmup_s": "optional"},
}
"""Per kind of line, the numbers its readers (diagnose, compare, bench --from-train) take from it: ``required``;
``optional``, a number when present (older runs lack ``world_size``, ``train_s``...); ``nullable``, a number or
null (``grad_norm`` where DeepSpeed computes it after the update, ``mfu`` where the device's peak FLOPs are
unknown)."""


def read_checked(path: Path, strict: bool = False) -> list[Record]:
    """``read_records``, each line checked for the numbers its kind carries (``NUMBER_FIELDS``; kinds not listed are
    kept as they are): what the commands that report on a run read, so a damaged or hand-edited line is a
    ``ConfigError`` naming the file, the line and the field rather than a ``TypeError`` deep in a report."""
    records = []
    for number, record in read_numbered(path, strict):
        kind = record.get("kind")
        for field, need in (NUMBER_FIELDS.get(kind, {}) if isinstance(kind, str) else {}).items():
            value = record.get(field)
            if (need == "optional" and field not in record) or (need == "nullable" and value is None):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{path}:{number}: {field}", value,
                                  f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} line needs a number"
                                  + (" or null" if need == "nullable" else ""))
        records.append(record)
    return records


def read_config(path: Path) -> Optional[Config]:
    """The run config a config.json holds (None when there is none). Raises ``ConfigError`` naming the file when it
    is not JSON, and the field when this version no longer accepts it."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(str(path), _shorten(text), f"not JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), _shorten(text), "not a JSON object")
    return validate_config(raw)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def train_rows(records: Sequence[Record]) -> list[Record]:
    """The train lines, one per step (the last one logged wins), in step order."""
    by_step = {r["step"]: r for r in records if r.get("kind") == "train"}
    return [by_step[step] for step in sorted(by_step)]


def stop_reason(records: Sequence[Record]) -> Optional[str]:
    """The reason on the run's last ``kind: stop`` line (``guard.max_events``, ``guard.eval_rise`` or
    ``requested``), or None: a run that is still going, finished, or was resumed since (a resume drops the line)."""
    stops = [r["reason"] for r in records if r.get("kind") == "stop"]
    return stops[-1] if stops else None


def eval_rows(records: Sequence[Record]) -> list[Record]:
    return sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])


def final_train_loss(train: Sequence[Record]) -> Optional[float]:
    """Mean of the last ``FINAL_LOSS_STEPS`` train losses; None without train lines or with a non-finite one."""
    last = [r["loss"] for r in train[-FINAL_LOSS_STEPS:]]
    if not last or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in last):
        return None
    return sum(last) / len(last)


def stage_throughput(train: Sequence[Record], world_size: Optional[int] = None) -> list[Record]:
    """Per stage, in order: its length, batch and steps, the mean loss of its last 10 steps, and the medians of tok/s
    (of the whole job, and per GPU) and MFU over its steps after the first, which pays for new shapes (allocation,
    kernel selection), unless that is its only step. Per GPU divides each line's tok/s by that line's
    ``world_size`` (``world_size`` stands in for lines without one); the stage's ``world_size`` is None where its
    lines disagree (a run resumed on another world size) or do not say."""
    stages = []
    for index in sorted({r["stage"] for r in train}):
        rows = [r for r in train if r["stage"] == index]
        timed = rows[1:] or rows
        sizes = [r.get("world_size", world_size) for r in timed]
        per_gpu = [r["tok_per_s"] / n for r, n in zip(timed, sizes) if n]
        mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
        stages.append({"stage": index, "seq_len": rows[0]["seq_len"], "global_batch": rows[0].get("global_batch"),
                       "steps": len(rows), "world_size": sizes[0] if len(set(sizes)) == 1 else None,
                       "mean_loss_last_10": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
                       "median_tok_per_s": statistics.median(r["tok_per_s"] for r in timed),
                       "median_tok_per_s_per_gpu": statistics.median(per_gpu) if len(per_gpu) == len(timed) else None,
                       "median_mfu": statistics.median(mfu) if mfu else None})
    return stages


def loss_rose(train: Sequence[Record], margin: float = 0.0) -> Optional[str]:
    """Why train lines whose losses are all finite ended above where they started, or None: their final train loss
    (mean of the last ``FINAL_LOSS_STEPS``) or their last loss (a blow-up at the end that the mean averages away)
    more than ``margin`` (a share) above the first. Needs no minimum of lines: however short, such a run diverged.
    The sweep asks it of whole runs (one config, margin 0), ``diagnose`` of each stage."""
    losses = [r["loss"] for r in train]
    final = final_train_loss(train)
    if len(losses) < 2 or final is None or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        return None
    bar = losses[0] * (1 + margin)
    above = f"above the first step's {losses[0]:.4g}" + (f" by more than {margin:.0%}" if margin else "")
    if final > bar:
        return f"final train loss {final:.4g} (mean of the last {FINAL_LOSS_STEPS} steps) {above}"
    if losses[-1] > bar:
        return f"last train loss {losses[-1]:.4g} (step {train[-1]['step']}) {above}"
    return None
