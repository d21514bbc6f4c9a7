"""``bench --from-train``: a train run's per-stage throughput read from its metrics, beside a bench JSON or, for
scaling, beside a reference run on fewer GPUs; one error line for what it cannot read, and for an ``--output`` that
cannot be written (measuring too), before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import run_cli

# Two stages of a run on one GPU. The first step of each stage enters it (new shapes) and is left out of the median.
ONE_GPU_TOK_PER_S = {(128, 1024): [50.0, 1000.0, 1010.0, 990.0], (1024, 512): [40.0, 800.0, 820.0, 810.0]}


def train_lines(world_size: int, tok_per_s: dict[tuple[int, int], list[float]],
                sizes_in_lines: bool = True) -> list[dict[str, Any]]:
    """One train line per step, 1,000 tokens each, a stage per ``(seq_len, global_batch)``, carrying ``world_size``
    as train writes it (or not, as lines written before it did)."""
    lines, step = [], 0
    for stage, ((seq_len, global_batch), rates) in enumerate(tok_per_s.items()):
        for rate in rates:
            lines.append({"kind": "train", "step": step, "tokens": 1000 * (step + 1), "stage": stage,
                          "seq_len": seq_len, "global_batch": global_batch, "loss": 5.0, "tok_per_s": rate,
                          "mfu": None, "elapsed_s": step + 10.0, "train_s": float(step),
                          **({"world_size": world_size} if sizes_in_lines else {})})
            step += 1
    return lines


def write_run(run_dir: Path, world_size: int, tok_per_s: dict[tuple[int, int], list[float]],
              lines: Optional[list[dict[str, Any]]] = None) -> Path:
    """A run directory with ``ds_config.json`` for ``world_size`` ranks (micro-batch 8, accumulation to the first
    stage's global batch) and ``metrics.jsonl``: ``lines``, or ``train_lines(world_size, tok_per_s)``."""
    run_dir.mkdir(parents=True)
    (seq_len, global_batch), *_ = tok_per_s
    micro = 8
    (run_dir / "ds_config.json").write_text(json.dumps({
        "train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_batch // (micro * world_size)}))
    lines = train_lines(world_size, tok_per_s) if lines is None else lines
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def test_each_stage_gets_tok_per_s_per_gpu_and_its_scaling_efficiency(tmp_path: Path) -> None:
    """2 GPUs at 1,900 tok/s (950 per GPU) against 1,000 on 1 GPU: 95 % at seq_len 128; 1,560 (780 per GPU) against
    810: 96.3 % at 1024."""
    reference = write_run(tmp_path / "one-gpu", 1, ONE_GPU_TOK_PER_S)
    run = write_run(tmp_path / "two-gpus", 2, {(128, 1024): [90.0, 1900.0, 1850.0, 1950.0],
                                               (1024, 512): [80.0, 1560.0, 1500.0, 1600.0]})
    out = tmp_path / "scaling.json"
    result = run_cli(["bench", "--from-train", str(run), "--against", str(reference), "--output", str(out)])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert (report["world_sizes"], report["reference_world_sizes"]) == ([2], [1])
    first, last = report["stages"]
    assert (first["median_tok_per_s"], first["median_tok_per_s_per_gpu"]) == (1900.0, 950.0)
    assert first["reference_tok_per_s_per_gpu"] == 1000.0
    assert first["scaling_efficiency"] == pytest.approx(0.95)
    assert last["scaling_efficiency"] == pytest.approx(780 / 810)
    assert ("stage 0 seq_len   128 batch  1024:      1,900 tok/s (950 per GPU)  per GPU 95.0% of the reference's "
            "1,000 (1 GPU)") in result.stdout


def test_a_run_resumed_on_another_world_size_is_divided_line_by_line(tmp_path: Path) -> None:
    """Stage 0 on 2 GPUs, then resumed on 1 (its ds_config.json says 1): stage 0 is 1,900 tok/s, 950 per GPU, not
    1,900 per GPU; stage 1 mixes both and its median is of per-GPU figures."""
    rates = {(128, 1024): [1.0, 1900.0, 1900.0], (1024, 512): [1.0, 1600.0, 810.0]}
    lines = [{**line, "world_size": size} for line, size in zip(train_lines(1, rates), [2, 2, 2, 2, 2, 1])]
    run = write_run(tmp_path / "resumed", 1, rates, lines=lines)
    out = tmp_path / "report.json"
    result = run_cli(["bench", "--from-train", str(run), "--output", str(out)])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    first, last = report["stages"]
    assert report["world_sizes"] == [2, 1] and (first["world_size"], last["world_size"]) == (2, None)
    assert first["median_tok_per_s_per_gpu"] == 950.0
    assert last["median_tok_per_s_per_gpu"] == pytest.approx((800 + 810) / 2)
    assert "(2 then 1 GPUs)" in result.stdout


def test_the_wall_time_is_split_into_steps_compile_evaluation_start_up_and_the_rest(tmp_path: Path) -> None:
    """Step 0 ends at 17 s after 2 s of step time and a 5 s warm-up: 10 s of start-up. 21 s of wall time = 4 s of
    steps + 5 s warm-up + 1.5 s of evaluation + 10 s start-up + 0.5 s of the rest (a checkpoint save, say)."""
    rates = {(128, 1024): [1.0, 1000.0, 1000.0]}
    train = [{**line, "elapsed_s": elapsed, "train_s": train_s}
             for line, (elapsed, train_s) in zip(train_lines(1, rates), [(17.0, 2.0), (18.0, 3.0), (21.0, 4.0)])]
    lines = [{"kind": "compile", "step": 0, "graphs": ["8x128"], "warmup_s": 5.0}, *train[:2],
             {"kind": "eval", "step": 1, "eval_loss": 5.0, "eval_s": 1.5, "elapsed_s": 19.5, "train_s": 3.0}, train[2]]
    run = write_run(tmp_path / "run", 1, rates, lines=lines)
    out = tmp_path / "report.json"
    result = run_cli(["bench", "--from-train", str(run), "--output", str(out)])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert (report["wall_s"], report["train_s"], report["warmup_s"], report["eval_s"]) == (21.0, 4.0, 5.0, 1.5)
    assert report["startup_s"] == pytest.approx(10.0) and report["other_s"] == pytest.approx(0.5)
    assert ("wall 21.0 s: training steps 4.0 s, compile + warm-up 5.0 s, 1 evaluations 1.5 s, start-up 10.0 s, other "
            "(checkpoint saves, rollbacks, resumed processes' start-up) 0.5 s; not training: 81.0 %") in result.stdout


def test_a_resumed_process_keeps_its_warm_up_out_of_the_first_start_up(tmp_path: Path) -> None:
    """The first process: 10 s of start-up, a 5 s warm-up, steps 0-1 (1 s each). The second, resumed at step 2: 8 s of
    start-up and a 4 s warm-up (its compile line at step 2), then step 2. Start-up 10 s; compile 9 s; the other 8 s
    are the second process's start-up."""
    rates = {(128, 1024): [1.0, 1000.0, 1000.0]}
    train = [{**line, "elapsed_s": elapsed, "train_s": train_s}
             for line, (elapsed, train_s) in zip(train_lines(1, rates), [(16.0, 1.0), (17.0, 2.0), (30.0, 3.0)])]
    lines = [{"kind": "compile", "step": 0, "warmup_s": 5.0}, *train[:2],
             {"kind": "compile", "step": 2, "warmup_s": 4.0}, train[2]]
    run = write_run(tmp_path / "run", 1, rates, lines=lines)
    out = tmp_path / "report.json"
    assert run_cli(["bench", "--from-train", str(run), "--output", str(out)]).returncode == 0
    report = json.loads(out.read_text())
    assert (report["wall_s"], report["train_s"], report["warmup_s"]) == (30.0, 3.0, 9.0)
    assert report["startup_s"] == pytest.approx(10.0) and report["other_s"] == pytest.approx(8.0)


def test_lines_without_their_world_size_take_it_from_ds_config(tmp_path: Path) -> None:
    rates = {(128, 1024): [1.0, 1900.0]}
    run = write_run(tmp_path / "old", 2, rates, lines=train_lines(2, rates, sizes_in_lines=False))
    out = tmp_path / "report.json"
    assert run_cli(["bench", "--from-train", str(run), "--output", str(out)]).returncode == 0
    (stage,) = json.loads(out.read_text())["stages"]
    assert (stage["world_size"], stage["median_tok_per_s_per_gpu"]) == (2, 950.0)


def test_a_stage_the_reference_did_not_train_gets_no_efficiency(tmp_path: Path) -> None:
    reference = write_run(tmp_path / "one-gpu", 1, {(128, 1024): ONE_GPU_TOK_PER_S[(128, 1024)]})
    run = write_run(tmp_path / "two-gpus", 2, {(128, 1024): [1.0, 2000.0], (1024, 512): [1.0, 1600.0]})
    out = tmp_path / "scaling.json"
    result = run_cli(["bench", "--from-train", str(run), "--against", str(reference), "--output", str(out)])
    assert result.returncode == 0, result.stderr
    first, last = json.loads(out.read_text())["stages"]
    assert first["scaling_efficiency"] == pytest.approx(1.0) and "scaling_efficiency" not in last


def test_against_a_bench_json_each_stage_is_set_beside_its_shape(tmp_path: Path) -> None:
    run = write_run(tmp_path / "one-gpu", 1, ONE_GPU_TOK_PER_S)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"shapes": [{"seq_len": 1024, "global_batch": 512, "tok_per_s": 900.0}]}))
    out = tmp_path / "vs-bench.json"
    result = run_cli(["bench", "--from-train", str(run), "--against", str(bench), "--output", str(out)])
    assert result.returncode == 0, result.stderr
    first, last = json.loads(out.read_text())["stages"]
    assert "vs_bench" not in first and last["vs_bench"] == pytest.approx(810 / 900)
    assert "bench 900 tok/s: -10.0%" in result.stdout


def test_what_it_cannot_read_is_one_error_line(tmp_path: Path) -> None:
    """A reference directory that is no run (named as ``--against``), and a run whose train lines do not give their
    world size and whose ds_config.json is gone."""
    lines = train_lines(1, ONE_GPU_TOK_PER_S, sizes_in_lines=False)
    run = write_run(tmp_path / "run", 1, ONE_GPU_TOK_PER_S, lines=lines)
    (tmp_path / "empty").mkdir()
    result = run_cli(["bench", "--from-train", str(run), "--against", str(tmp_path / "empty")])
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: --against = '{tmp_path / 'empty'}': holds no metrics.jsonl; give a train run directory"]
    (run / "ds_config.json").unlink()
    result = run_cli(["bench", "--from-train", str(run)])
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: --from-train = '{run}': its train lines do not give their world size and its ds_config.json does "
        "not either"]


def test_a_train_line_whose_loss_is_null_is_one_error_line(tmp_path: Path) -> None:
    """``"loss": null`` on a train line (no run writes one) is the one line ``diagnose`` gives for it, naming the
    file, the line and the field; not a TypeError, and no report is written."""
    lines = train_lines(1, ONE_GPU_TOK_PER_S)
    lines[2]["loss"] = None
    run = write_run(tmp_path / "run", 1, ONE_GPU_TOK_PER_S, lines=lines)
    out = tmp_path / "report.json"
    result = run_cli(["bench", "--from-train", str(run), "--output", str(out)])
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {run}/metrics.jsonl:3: loss = None: a train line needs a number"]
    assert not out.exists()


@pytest.mark.parametrize("mode", ["from-train", "measure"])
def test_an_output_it_cannot_write_is_refused_before_anything_runs(tmp_path: Path, mode: str) -> None:
    """``--output`` below a file, or an existing directory: one line, with nothing read or measured first (both
    modes used to run to their end, then fail with FileExistsError or IsADirectoryError)."""
    source = (["--from-train", str(write_run(tmp_path / "run", 1, ONE_GPU_TOK_PER_S))] if mode == "from-train"
              else ["--config", "tiny-cpu", "--no-baseline"])
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    for output, allowed in ((a_file / "bench.json", f"{a_file} is a file; give a file path in a directory"),
                            (tmp_path, "is a directory; give a file path")):
        result = run_cli(["bench", *source, "--output", str(output)])
        assert result.returncode == 2 and result.stderr.splitlines() == [f"error: --output = '{output}': {allowed}"]
        assert result.stdout == ""
    assert a_file.read_text() == "keep me\n"


def test_the_default_report_path_is_checked_too(tmp_path: Path) -> None:
    """Without ``--output`` the report goes to RUN_DIR/bench-from-train.json; where a directory has that name it
    is the same one line, before the run is read."""
    run = write_run(tmp_path / "run", 1, ONE_GPU_TOK_PER_S)
    (run / "bench-from-train.json").mkdir()
    result = run_cli(["bench", "--from-train", str(run)])
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: --output = '{run}/bench-from-train.json': is a directory; give a file path"]
    assert result.stdout == ""


def test_a_rounding_remainder_prints_as_zero_not_minus_zero() -> None:
    """The rest of the wall time is a difference of measured times: -0.001 s (a rounding remainder) prints as 0.0 s;
    a real negative remainder still shows."""
    from pipeline.bench import format_train_report

    report = {"run_dir": "run", "world_sizes": [1], "stages": [], "wall_s": 10.0, "train_s": 4.0, "warmup_s": 3.0,
              "eval_s": 1.0, "evaluations": 2, "startup_s": 2.001, "other_s": -0.001, "not_training_share": 0.6,
              "surprises": []}
    assert "resumed processes' start-up) 0.0 s;" in format_train_report(report)[-1]
    report["other_s"] = -0.3
    assert "resumed processes' start-up) -0.3 s;" in format_train_report(report)[-1]
