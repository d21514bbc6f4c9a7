"""``compare``: tokens and seconds to a target held-out loss, interpolated between evaluations, against the first
run; on finished and running directories; one error line for what it cannot compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
from conftest import run_cli

from pipeline.compare import compare_runs, milestones, reach


def write_run(run_dir: Path, evals: list[tuple[int, float, float, float]], finished: bool = True,
              steps: int = 40, torn: bool = False) -> Path:
    """A run directory: ``steps`` train lines (loss falling, 100 tokens each) and evaluations given as
    (step, eval_loss, train_s, elapsed_s)."""
    run_dir.mkdir(parents=True)
    lines = [{"kind": "train", "step": s, "tokens": 100 * (s + 1), "stage": 0, "seq_len": 64, "loss": 6.0 - s / 20,
              "grad_norm": 1.0, "global_batch": 1, "lr": 1e-3, "grad_clip": 1.0, "tok_per_s": 1000.0,
              "elapsed_s": float(s), "train_s": s / 2} for s in range(steps)]
    lines += [{"kind": "eval", "step": step, "tokens": 100 * (step + 1), "seq_len": 64, "eval_loss": loss,
               "train_s": train_s, "elapsed_s": elapsed_s} for step, loss, train_s, elapsed_s in evals]
    text = "".join(json.dumps(line) + "\n" for line in sorted(lines, key=lambda r: (r["step"], r["kind"])))
    (run_dir / "metrics.jsonl").write_text(text + ('{"kind": "train", "st' if torn else ""))
    (run_dir / "config.json").write_text(json.dumps({"name": run_dir.name}))
    if finished:
        (run_dir / "summary.json").write_text("{}")
    return run_dir


BASELINE = [(9, 5.0, 10.0, 30.0), (19, 4.0, 20.0, 40.0), (29, 3.5, 30.0, 50.0), (39, 3.0, 40.0, 60.0)]
FASTER = [(9, 4.5, 5.0, 25.0), (19, 3.2, 10.0, 30.0), (29, 2.9, 15.0, 35.0), (39, 2.7, 20.0, 40.0)]


def test_reach_interpolates_between_the_evaluations_around_the_crossing() -> None:
    """3.0 lies between 3.2 (step 19: 2,000 tokens, 10 s) and 2.9 (step 29: 3,000 tokens, 15 s): two thirds of
    the way, 2,666.7 tokens and 13.33 s."""
    evals = [{"tokens": 100 * (s + 1), "eval_loss": loss, "train_s": t, "elapsed_s": e} for s, loss, t, e in FASTER]
    assert reach(evals, 3.0, "tokens") == pytest.approx(2000 + 1000 * 2 / 3)
    assert reach(evals, 3.0, "train_s") == pytest.approx(10 + 5 * 2 / 3)
    assert reach(evals, 5.0, "tokens") == 1000  # already below at the first evaluation
    assert reach(evals, 2.0, "tokens") is None  # never reached


def test_speedups_against_the_first_run(tmp_path: Path) -> None:
    """The target is the baseline's final held-out loss (3.0, reached at its last evaluation: 4,000 tokens, 40 s of
    training, 60 s of wall time); the faster run gets there at 2,666.7 tokens, 13.33 s and 33.33 s."""
    base = write_run(tmp_path / "baseline", BASELINE)
    fast = write_run(tmp_path / "curriculum", FASTER, finished=False, torn=True)
    target, _, (b, f), _ = compare_runs([base, fast], None)
    assert target == 3.0
    assert b.at_target == {"tokens": 4000, "train_s": 40.0, "elapsed_s": 60.0}
    assert b.speedup == {"tokens": 1.0, "train_s": 1.0, "elapsed_s": 1.0}
    assert f.speedup["tokens"] == pytest.approx(4000 / (2000 + 1000 * 2 / 3))
    assert f.speedup["train_s"] == pytest.approx(40 / (10 + 5 * 2 / 3))
    assert f.speedup["elapsed_s"] == pytest.approx(60 / (30 + 5 * 2 / 3))
    assert (f.status.split(",")[0], f.final_eval_loss, f.evaluations) == ("running or stopped", 2.7, 4)


def test_a_stopped_run_says_why(tmp_path: Path) -> None:
    """A run without summary.json whose last line is ``kind: stop`` is ``stopped (<reason>)``, and diverged when the
    guard stopped it, whatever its losses; without one it may still be running (or was killed)."""
    stopped = write_run(tmp_path / "stopped", FASTER, finished=False)
    with (stopped / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"kind": "stop", "step": 40, "tokens": 4000, "reason": "guard.eval_rise"}) + "\n")
    running = write_run(tmp_path / "running", FASTER, finished=False)
    _, _, (base, s, r), _ = compare_runs([write_run(tmp_path / "baseline", BASELINE), stopped, running], None)
    assert [run.status for run in (base, s, r)] == ["finished, converged", "stopped (guard.eval_rise), diverged",
                                                    "running or stopped, converged"]


def test_token_speedups_along_the_first_run(tmp_path: Path) -> None:
    """The baseline's losses at 25 / 50 / 75 / 100 % of its 4,000 tokens are 5.0 / 4.0 / 3.5 / 3.0; the faster run
    is already at 4.5 at its first evaluation (1,000 tokens: 1.0x to 5.0, no finer than the evaluations), reaches 4.0
    and 3.5 between 4.5 and 3.2 (1,384.6 and 1,769.2 tokens) and 3.0 at 2,666.7: a lead that grows, then shrinks."""
    base = write_run(tmp_path / "baseline", BASELINE)
    fast = write_run(tmp_path / "curriculum", FASTER)
    _, marks, (b, f), _ = compare_runs([base, fast], 2.0)  # the target does not move the points along the baseline
    assert marks == {"25%": 5.0, "50%": 4.0, "75%": 3.5, "100%": 3.0}
    assert b.token_speedup_along == {"25%": 1.0, "50%": 1.0, "75%": 1.0, "100%": 1.0}
    assert f.token_speedup_along == pytest.approx({"25%": 1.0, "50%": 2000 / (1000 + 1000 * 0.5 / 1.3),
                                                   "75%": 3000 / (1000 + 1000 * 1.0 / 1.3),
                                                   "100%": 4000 / (2000 + 1000 * 2 / 3)})
    out = tmp_path / "out"
    result = run_cli(["compare", str(base), str(fast), "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr
    assert ("Token speedup to baseline's held-out loss at 25% / 50% / 75% / 100% of its tokens "
            "(5.0000 / 4.0000 / 3.5000 / 3.0000):") in result.stdout
    assert "| curriculum | 1.00x | 1.44x | 1.70x | 1.50x |" in result.stdout
    assert json.loads((out / "compare.json").read_text())["milestones"] == {"25%": 5.0, "50%": 4.0, "75%": 3.5,
                                                                            "100%": 3.0}


def test_milestones_take_the_first_evaluation_at_or_past_each_fraction() -> None:
    """Evaluations at 1,000 / 3,000 / 4,400 tokens: 25 % (1,100) and 50 % (2,200) both fall to the 3,000-token one,
    75 % (3,300) and 100 % to the last; not interpolated. A non-finite loss gives no milestone."""
    evals = [{"tokens": 1000, "eval_loss": 5.0}, {"tokens": 3000, "eval_loss": 4.0}, {"tokens": 4400, "eval_loss": 3.0}]
    assert milestones(evals) == {"25%": 4.0, "50%": 4.0, "75%": 3.0, "100%": 3.0}
    assert milestones(evals[:1]) == {"25%": 5.0, "50%": 5.0, "75%": 5.0, "100%": 5.0}
    assert milestones([*evals[:2], {"tokens": 4400, "eval_loss": float("nan")}])["100%"] is None


def test_a_run_that_never_reaches_the_target(tmp_path: Path) -> None:
    """Nor the baseline's loss at 75 % (3.5) and 100 % (3.0) of its tokens: no speedup there, '-' in the table; the
    ones it reaches, later than the baseline: below 1x."""
    base = write_run(tmp_path / "baseline", BASELINE)
    slow = write_run(tmp_path / "slow", [(19, 4.5, 20.0, 30.0), (39, 3.6, 40.0, 60.0)])
    _, _, (_, s), _ = compare_runs([base, slow], None)
    assert s.at_target == {"tokens": None, "train_s": None, "elapsed_s": None}
    assert s.speedup == {"tokens": None, "train_s": None, "elapsed_s": None}
    assert s.token_speedup_along["25%"] == 1000 / 2000  # below 5.0 at its first evaluation
    assert s.token_speedup_along["50%"] == pytest.approx(2000 / (2000 + 2000 * 0.5 / 0.9))
    assert (s.token_speedup_along["75%"], s.token_speedup_along["100%"]) == (None, None)
    result = run_cli(["compare", str(base), str(slow), "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    assert "| slow | 0.50x | 0.64x | - | - |" in result.stdout


def test_the_command_writes_the_table_json_and_figure(tmp_path: Path) -> None:
    base = write_run(tmp_path / "baseline", BASELINE)
    fast = write_run(tmp_path / "curriculum", FASTER)
    out = tmp_path / "out"
    result = run_cli(["compare", str(base), str(fast), "--output-dir", str(out), "--target-loss", "3.2"])
    assert result.returncode == 0, result.stderr
    assert "| curriculum | finished, converged | 2.7000 |" in result.stdout
    data = json.loads((out / "compare.json").read_text())
    assert data["target_loss"] == 3.2 and [r["name"] for r in data["runs"]] == ["baseline", "curriculum"]
    assert (out / "compare.md").read_text().startswith("Target held-out loss 3.2000")
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d, "holds no metrics.jsonl"),
    (lambda d: write_run(d, []), "has no evaluation yet"),
], ids=["no-metrics", "no-evaluations"])
def test_what_compare_cannot_compare_is_one_error(tmp_path: Path, make: object, message: str) -> None:
    base = write_run(tmp_path / "baseline", BASELINE)
    other = tmp_path / "other"
    if message == "holds no metrics.jsonl":
        other.mkdir()
    else:
        make(other)  # type: ignore[operator]
    result = run_cli(["compare", str(base), str(other), "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 2 and result.stderr.startswith(f"error: RUN_DIR = '{other}': {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("line", "field", "value", "allowed"), [
    (5, "loss", None, "a train line needs a number"),
    (10, "eval_loss", "high", "an eval line needs a number"),
    (10, "elapsed_s", "late", "an eval line needs a number"),
    (10, "tokens", None, "an eval line needs a number"),
    (5, "mfu", "high", "a train line needs a number or null"),
], ids=["train-loss-null", "eval-loss-a-string", "eval-seconds-a-string", "eval-tokens-null", "train-mfu-a-string"])
def test_a_metrics_value_that_is_not_a_number_is_one_error(tmp_path: Path, line: int, field: str,
                                                           value: Optional[str], allowed: str) -> None:
    """A value a run never writes (line 5: step 4's train line; line 10: the evaluation after step 9; null only
    where a run writes null, as for ``mfu``) is the one line ``diagnose`` gives for it, naming the file, the line,
    the field and the value; not a TypeError, and nothing is written."""
    base = write_run(tmp_path / "baseline", BASELINE)
    other = write_run(tmp_path / "other", FASTER)
    lines = (other / "metrics.jsonl").read_text().splitlines()
    lines[line - 1] = json.dumps({**json.loads(lines[line - 1]), field: value})
    (other / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli(["compare", str(base), str(other), "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {other}/metrics.jsonl:{line}: {field} = {value!r}: {allowed}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("target", "shown"), [("-1", "-1.0"), ("0", "0.0")])
def test_a_target_loss_that_is_not_positive_is_one_error(tmp_path: Path, target: str, shown: str) -> None:
    """A cross-entropy is above 0: ``--target-loss`` 0 or below is refused (no run could reach it)."""
    base = write_run(tmp_path / "baseline", BASELINE)
    result = run_cli(["compare", str(base), "--target-loss", target, "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: --target-loss = {shown}: must be a positive loss"]
    assert not (tmp_path / "out").exists()


def test_an_output_directory_below_a_file_is_one_error(tmp_path: Path) -> None:
    """``--output-dir FILE/sub`` cannot be made: one line naming the file, checked before the runs are read (a
    NotADirectoryError once they had been)."""
    base = write_run(tmp_path / "baseline", BASELINE)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    result = run_cli(["compare", str(base), "--output-dir", str(a_file / "sub")])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --output-dir = '{a_file / 'sub'}': {a_file} is a file; give a directory"]
    assert a_file.read_text() == "keep me\n"


def test_runs_of_one_recipe_are_named_by_their_directories(tmp_path: Path) -> None:
    """Two runs whose config.json both say ``tiny-cpu`` (one recipe on 1 and on 2 GPUs, say) are told apart."""
    runs = [write_run(tmp_path / name, BASELINE) for name in ("one-gpu", "two-gpus")]
    for run in runs:
        (run / "config.json").write_text(json.dumps({"name": "tiny-cpu"}))
    _, _, compared, _ = compare_runs(runs, None)
    assert [run.name for run in compared] == ["one-gpu", "two-gpus"]
    _, _, (alone,), _ = compare_runs(runs[:1], None)
    assert alone.name == "tiny-cpu"
