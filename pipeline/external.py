"""Other tools' files, read as this project's: the HF Trainer's and TensorBoard's logs for ``diagnose``, and the JSON
files ``doctor`` checks (HF ``TrainingArguments``, DeepSpeed configs, HF model configs).

Logs become the records of a ``metrics.jsonl``: ``kind: train`` lines with step, loss, grad_norm and lr, and
``kind: eval`` lines with eval_loss. What another tool does not log is filled in so that ``diagnose`` judges
nothing it cannot see: stage 0 (one stage: no curriculum), seq_len None, grad_clip None (no clipping finding) and
tok_per_s nan (left out of every throughput median: no throughput finding).

Steps. This project counts optimizer updates from 0: step ``s`` is the ``(s + 1)``-th update. The HF Trainer logs
``state.global_step``, the number of updates done, so the entry of its ``k``-th update says step ``k``
(``TRAINER_FIRST_STEP`` = 1), in its ``trainer_state.json`` and in the TensorBoard scalars it writes alike; both
readers shift it to ``k - 1`` in ``_records``, the one place where steps are mapped. So an entry the Trainer logs at
step 20 is reported at step 19 (and an evaluation after update 20 at step 19, as this project logs it).
TensorBoard scalars with a ``train/stage`` tag come from this project's own logger (``pipeline.metrics``): their
steps count from 0 already and their stage, seq_len, grad_clip and tok_per_s are read as well. Other writers'
scalars (plain tags such as ``loss``, as transformers 3 wrote them) are taken to count as the Trainer does, unless
they log a loss at step 0, which the Trainer never does: then they count from 0 and are read as they are.

Torch-free: json, and tensorboard's event reader, which is imported only to read event files.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from curriculum.errors import ConfigError

Record = dict[str, Any]

TRAINER_FIRST_STEP = 1
"""The step the HF Trainer logs for its first optimizer update (this project's step 0)."""
PROJECT_FIRST_STEP = 0
"""The step this project's logger (and any log with a loss at step 0) writes for the first update."""
STEP_NOTES = {TRAINER_FIRST_STEP: "steps from 0: the Trainer's step - 1", PROJECT_FIRST_STEP: "steps as logged"}
"""How the steps of the records relate to the log's, for the report's first line."""

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
EVENT_FILE = "events.out.tfevents.*"
READABLE = ("a run directory (metrics.jsonl), a HF Trainer output or checkpoint directory (trainer_state.json), a "
            "directory of TensorBoard event files, or one of those files")

# What another tool's records lack, set so that diagnose finds nothing about it (see the module docstring).
UNLOGGED: Record = {"stage": 0, "seq_len": None, "grad_norm": None, "grad_clip": None, "tok_per_s": math.nan}

# TensorBoard tag of each record field, first match wins: the HF Trainer writes train/<key> and eval/<key> (its
# eval_loss becomes eval/loss); this project writes <kind>/<key> (eval/eval_loss); plain names: transformers 3 and
# other writers.
TENSORBOARD_TAGS: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss", "loss"),
    "grad_norm": ("train/grad_norm", "grad_norm"),
    "lr": ("train/learning_rate", "train/lr", "learning_rate", "lr"),
    "eval_loss": ("eval/loss", "eval/eval_loss", "eval_loss"),
    "stage": ("train/stage",),
    "seq_len": ("train/seq_len",),
    "grad_clip": ("train/grad_clip",),
    "tok_per_s": ("train/tok_per_s",),
}
INTEGER_FIELDS = ("stage", "seq_len")  # TensorBoard stores every scalar as a float


# ------------------------------------------------------------------------------------------------ JSON files


def read_json_object(path: Path, field: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``ConfigError`` naming ``field`` (the flag or argument that gave the path) when
    the file is missing, is not JSON or holds something else than an object."""
    if not path.is_file():
        raise ConfigError(field, str(path), "no such file")
    try:
        value = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as err:
        raise ConfigError(field, str(path), f"not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise ConfigError(field, str(path), "must hold a JSON object")
    return value


def is_number(value: Any) -> bool:
    """An int or a float (nan and inf included), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ logs


def read_logs(path: Path) -> tuple[list[Record], str]:
    """The records of another tool's logs at ``path``, and what was read (for the report's first line).

    A directory: its ``trainer_state.json``, else the one of its newest ``checkpoint-N`` (a Trainer's output
    directory holds one only after ``save_state()``), else every TensorBoard event file under it. A file: event
    files by their name, anything else as a ``trainer_state.json``."""
    if not path.exists():
        raise ConfigError("run_dir", str(path), f"no such directory or file; give {READABLE}")
    if path.is_file():
        if path.match(EVENT_FILE):
            records, steps = read_tensorboard([path], path)
            return records, f"TensorBoard events {path.name} ({steps})"
        records, steps = read_trainer_state(path)
        return records, f"HF Trainer state {path.name} ({steps})"
    state = find_trainer_state(path)
    if state is not None:
        records, steps = read_trainer_state(state)
        return records, f"HF Trainer state {state.relative_to(path)} ({steps})"
    events = sorted(path.rglob(EVENT_FILE))
    if events:
        records, steps = read_tensorboard(events, path)
        return records, f"TensorBoard events ({len(events)} file{'s' * (len(events) != 1)}; {steps})"
    raise ConfigError("run_dir", str(path),
                      f"holds no metrics.jsonl, no {TRAINER_STATE} (nor a checkpoint-N with one) and no TensorBoard "
                      f"event files; give {READABLE}")


def find_trainer_state(directory: Path) -> Optional[Path]:
    """``directory/trainer_state.json``, else the one in the ``checkpoint-N`` with the largest N, else None."""
    if (directory / TRAINER_STATE).is_file():
        return directory / TRAINER_STATE
    checkpoints = [(int(match.group(1)), child) for child in directory.iterdir()
                   if (match := CHECKPOINT_DIR.fullmatch(child.name)) and (child / TRAINER_STATE).is_file()]
    return max(checkpoints)[1] / TRAINER_STATE if checkpoints else None


def read_trainer_state(path: Path) -> tuple[list[Record], str]:
    """The train and eval entries of a HF Trainer ``trainer_state.json``'s ``log_history``, and how their steps
    relate to the log's (``STEP_NOTES``).

    Entries with a ``loss`` are train lines, entries with an ``eval_loss`` evaluations; the others (the end-of-run
    summary with ``train_loss``, other metrics) are skipped. Raises ``ConfigError`` naming the entry for an entry
    without a step or with a loss that is not a number."""
    state = read_json_object(path, "run_dir")
    history = state.get("log_history")
    if not isinstance(history, list):
        raise ConfigError(f"{path}: log_history", history,
                          f"a {TRAINER_STATE} has a list of logged entries here; give one the HF Trainer wrote")
    train: dict[int, Record] = {}
    evals: dict[int, float] = {}
    for index, entry in enumerate(history):
        where = f"{path}: log_history[{index}]"
        if not isinstance(entry, dict) or not ("loss" in entry or "eval_loss" in entry):
            continue
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ConfigError(f"{where}.step", step, "a logged loss needs the integer step it was logged at")
        for key in ("loss", "eval_loss", "grad_norm", "learning_rate"):
            if entry.get(key) is not None and not is_number(entry[key]):
                raise ConfigError(f"{where}.{key}", entry[key], "must be a number")
        if "loss" in entry:
            train[step] = {"loss": entry["loss"], "grad_norm": entry.get("grad_norm"), "lr": entry.get("learning_rate")}
        if "eval_loss" in entry:
            evals[step] = entry["eval_loss"]
    return _records(train, evals, TRAINER_FIRST_STEP, path, f"{len(history)} log_history entries")


def read_tensorboard(files: Sequence[Path], where: Path) -> tuple[list[Record], str]:
    """The loss curves in TensorBoard event files (``TENSORBOARD_TAGS``), and how their steps relate to the log's
    (``STEP_NOTES``); ``where`` (the path given) names the files in errors.

    A scalar logged at the same step in several files (a resumed run logs the steps after its checkpoint again)
    counts with its newest value, by wall time."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    scalars: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    for file in files:
        accumulator = EventAccumulator(str(file), size_guidance={SCALARS: 0})  # 0: every value (default: a sample)
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            by_step = scalars.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                if event.step not in by_step or event.wall_time >= by_step[event.step][0]:
                    by_step[event.step] = (event.wall_time, event.value)
    curves = {field: next((scalars[tag] for tag in tags if tag in scalars), {})
              for field, tags in TENSORBOARD_TAGS.items()}
    counts_from_0 = bool(curves["stage"]) or 0 in curves["loss"]  # this project's logger, or a loss at step 0
    first_step = PROJECT_FIRST_STEP if counts_from_0 else TRAINER_FIRST_STEP
    train = {step: {field: int(curve[step][1]) if field in INTEGER_FIELDS else curve[step][1]
                    for field, curve in curves.items() if field != "eval_loss" and step in curve}
             for step in curves["loss"]}
    evals = {step: value for step, (_, value) in curves["eval_loss"].items()}
    return _records(train, evals, first_step, where, f"{len(scalars)} scalar tags in {len(files)} event file(s)")


def _records(train: Mapping[int, Record], evals: Mapping[int, float], first_step: int, where: Path,
             contents: str) -> tuple[list[Record], str]:
    """Train and eval records in step order, with the writer's step ``first_step`` as this project's step 0, and
    the note that says so."""
    if not train:
        raise ConfigError("run_dir", str(where), f"has no training losses ({contents}); nothing to diagnose")
    records = [{"kind": "train", "step": step - first_step, **UNLOGGED, **fields}
               for step, fields in sorted(train.items())]
    records += [{"kind": "eval", "step": step - first_step, "eval_loss": loss} for step, loss in sorted(evals.items())]
    return records, STEP_NOTES[first_step]
