"""The checkpoint directory protocol and resume state, without a DeepSpeed engine.

``FakeEngine`` stands in for the DeepSpeed engine only to test the directory protocol around it (``.partial``,
commit, ``latest``, keep-last-N, finding the resume point) and the per-rank state (RNG, rank file). It writes one
file where ``engine.save_checkpoint`` would write its shards and reads it back in ``load_checkpoint``. Saving and
loading through the real engine is tested in test_train.py.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import torch

from curriculum.errors import ConfigError
from pipeline import checkpoint as checkpoint_module
from pipeline.checkpoint import (Checkpointer, RunState, damaged_file, resolve_resume, rng_state, set_rng_state,
                                 tag_for)

ENGINE_FILE = "engine_state.json"


class FakeEngine:
    """Records each call and keeps the client state in ``<save_dir>/<tag>/engine_state.json``."""

    def __init__(self) -> None:
        self.saves: list[dict[str, Any]] = []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        target = Path(save_dir) / tag
        self.saves.append({"save_dir": save_dir, "tag": tag, "save_latest": save_latest,
                           "existing": sorted(p.name for p in Path(save_dir).iterdir())})
        target.mkdir(parents=True, exist_ok=True)
        (target / ENGINE_FILE).write_text(json.dumps(client_state))

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool, load_lr_scheduler_states: bool
                        ) -> tuple[Optional[str], dict[str, Any]]:
        path = Path(load_dir) / tag
        if not (path / ENGINE_FILE).is_file():
            return None, {}
        return str(path), json.loads((path / ENGINE_FILE).read_text())


@pytest.fixture(autouse=True)
def keep_global_rng() -> Iterator[None]:
    """These tests move and restore the global RNGs; put them back as they were for the tests after."""
    saved = rng_state()
    yield
    set_rng_state(saved)


def save_steps(checkpointer: Checkpointer, engine: FakeEngine, *steps: int) -> list[Path]:
    return [checkpointer.save(engine, step, client_state={"step": step}, rank_state={"data_sha256": f"sha{step}"})
            for step in steps]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------------- saving


def test_tag_names_the_steps_done() -> None:
    assert tag_for(0) == "step00000000"
    assert tag_for(1200) == "step00001200"


def test_save_writes_a_partial_then_commits_it(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=2, rank=0)
    engine = FakeEngine()
    (path,) = save_steps(checkpointer, engine, 100)

    # the engine was asked to write into <tag>.partial, with no complete checkpoint of that name yet
    (call,) = engine.saves
    assert call == {"save_dir": str(directory), "tag": "step00000100.partial", "save_latest": False,
                    "existing": []}
    # then the partial became <tag>, holding the engine's files and this rank's file, and latest names it
    assert path == directory / "step00000100"
    assert names(directory) == ["latest", "step00000100"]
    assert names(path) == [ENGINE_FILE, "rank0.pt"]
    assert (directory / "latest").read_text() == "step00000100"
    assert checkpointer.latest() == path


def test_each_save_replaces_latest(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=5, rank=0)
    engine = FakeEngine()
    save_steps(checkpointer, engine, 100)
    assert (directory / "latest").read_text() == "step00000100"
    save_steps(checkpointer, engine, 200)
    assert (directory / "latest").read_text() == "step00000200"
    assert names(directory) == ["latest", "step00000100", "step00000200"]  # no latest.tmp, no .partial left
    assert engine.saves[1]["existing"] == ["latest", "step00000100"]


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=2, rank=0)
    engine = FakeEngine()
    save_steps(checkpointer, engine, 100)
    checkpointer.save(engine, 100, client_state={"step": 100, "again": True}, rank_state={})
    assert names(directory) == ["latest", "step00000100"]
    assert json.loads((directory / "step00000100" / ENGINE_FILE).read_text()) == {"step": 100, "again": True}


def test_keep_last_n_prunes_the_oldest(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=2, rank=0)
    engine = FakeEngine()
    save_steps(checkpointer, engine, 100, 200)
    assert names(directory) == ["latest", "step00000100", "step00000200"]
    save_steps(checkpointer, engine, 300)
    assert names(directory) == ["latest", "step00000200", "step00000300"]
    save_steps(checkpointer, engine, 400, 500)
    assert names(directory) == ["latest", "step00000400", "step00000500"]
    assert (directory / "latest").read_text() == "step00000500"


def test_keep_1_never_prunes_the_checkpoint_just_saved(tmp_path: Path) -> None:
    """Resumed from step 100 while step 200 (of the abandoned run) is still there: the new step-150 save is the
    one ``latest`` names, so pruning must keep it."""
    directory = tmp_path / "checkpoints"
    engine = FakeEngine()
    save_steps(Checkpointer(directory, keep=2, rank=0), engine, 100, 200)
    checkpointer = Checkpointer(directory, keep=1, rank=0)
    (path,) = save_steps(checkpointer, engine, 150)
    assert path.is_dir()
    assert checkpointer.latest() == path
    assert names(directory) == ["latest", "step00000150"]


def test_best_is_a_pointer_and_pruning_keeps_what_it_names(tmp_path: Path) -> None:
    """A checkpoint saved for ``best`` only moves neither ``latest`` nor pruning; ``best`` is a file naming it, and
    keep-last-1 keeps it as long as ``best`` names it, then prunes it once ``best`` moves on."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=1, rank=0)
    engine = FakeEngine()
    save_steps(checkpointer, engine, 100)
    best = checkpointer.save(engine, 150, client_state={"step": 150}, rank_state={}, latest=False)
    checkpointer.mark_best(best)
    assert names(directory) == ["best", "latest", "step00000100", "step00000150"]
    assert (directory / "best").read_text() == "step00000150" and checkpointer.best() == best
    assert checkpointer.latest() == directory / "step00000100"
    save_steps(checkpointer, engine, 200, 300)
    assert names(directory) == ["best", "latest", "step00000150", "step00000300"]
    checkpointer.mark_best(directory / "step00000300")  # a periodic checkpoint can be the best too
    assert names(directory) == ["best", "latest", "step00000300"]
    assert checkpointer.best() == checkpointer.latest() == directory / "step00000300"


def test_pruning_keeps_latest_and_best_when_both_are_old(tmp_path: Path) -> None:
    """A run resumed from step 100 saves step 150 while the abandoned run's 200 and 300 are still here and ``best``
    names step 50: keep-last-1 keeps 150 (now ``latest``) and 50 (``best``), and prunes the rest."""
    directory = tmp_path / "checkpoints"
    engine = FakeEngine()
    first = Checkpointer(directory, keep=5, rank=0)
    (fifty,) = save_steps(first, engine, 50)
    first.mark_best(fifty)
    save_steps(first, engine, 100, 200, 300)
    checkpointer = Checkpointer(directory, keep=1, rank=0)
    save_steps(checkpointer, engine, 150)
    assert names(directory) == ["best", "latest", "step00000050", "step00000150"]


def test_mark_best_replaces_the_full_copy_older_runs_saved(tmp_path: Path) -> None:
    """A resumed run of an older version has a ``best`` directory: the first better evaluation replaces it with the
    pointer. Only rank 0 writes."""
    directory = tmp_path / "checkpoints"
    engine = FakeEngine()
    (path,) = save_steps(Checkpointer(directory, keep=2, rank=0), engine, 100)
    (directory / "best").mkdir()
    (directory / "best" / ENGINE_FILE).write_text("{}")
    Checkpointer(directory, keep=2, rank=1).mark_best(path)
    assert (directory / "best").is_dir()
    checkpointer = Checkpointer(directory, keep=2, rank=0)
    checkpointer.mark_best(path)
    assert (directory / "best").read_text() == "step00000100" and checkpointer.best() == path


def test_leftover_partial_is_removed_at_start(tmp_path: Path) -> None:
    """A save killed half-way leaves ``<tag>.partial``: the next Checkpointer (rank 0) removes it."""
    directory = tmp_path / "checkpoints"
    engine = FakeEngine()
    save_steps(Checkpointer(directory, keep=2, rank=0), engine, 100)
    leftover = directory / "step00000200.partial"
    leftover.mkdir()
    (leftover / ENGINE_FILE).write_text("{}")
    Checkpointer(directory, keep=2, rank=1)  # other ranks leave the directory to rank 0
    assert leftover.is_dir()
    checkpointer = Checkpointer(directory, keep=2, rank=0)
    assert names(directory) == ["latest", "step00000100"]
    assert checkpointer.latest() == directory / "step00000100"  # the complete one is untouched


# --------------------------------------------------------------------------------------------------- resume point


def test_resolve_resume(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, rank=0)
    assert resolve_resume("auto", checkpointer) is None  # nothing saved yet: start fresh
    save_steps(checkpointer, FakeEngine(), 100, 200)
    assert resolve_resume("auto", checkpointer) == directory / "step00000200"
    assert resolve_resume("none", checkpointer) is None
    # a checkpoints directory resolves through its latest; a checkpoint directory is itself
    assert resolve_resume(str(directory), checkpointer) == directory / "step00000200"
    assert resolve_resume(str(directory / "step00000100"), checkpointer) == directory / "step00000100"


def test_latest_pointing_nowhere_is_never_a_silent_fresh_start(tmp_path: Path) -> None:
    """``latest`` naming a checkpoint that is not there: ``latest()`` finds nothing, and ``--resume auto`` takes the
    newest complete checkpoint, saying so, or is an error when there is none (a fresh start would truncate the
    run's metrics)."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, rank=0)
    directory.mkdir()
    (directory / "latest").write_text("step00000300")
    assert checkpointer.latest() is None
    with pytest.raises(ConfigError, match=r"--resume = 'auto': .*latest names step00000300, which is not there, and "
                                          r"no complete checkpoint is"):
        resolve_resume("auto", checkpointer)
    save_steps(checkpointer, FakeEngine(), 100, 200)
    (directory / "latest").write_text("step00000300")
    said: list[str] = []
    assert resolve_resume("auto", checkpointer, said.append) == directory / "step00000200"
    assert said == [f"{directory / 'latest'} names step00000300, which is not there: resuming from the newest "
                    "complete checkpoint, step00000200"]


@pytest.mark.parametrize("bad", ["does-not-exist", "latest-pointing-nowhere", "a-file"])
def test_resolve_resume_bad_path(tmp_path: Path, bad: str) -> None:
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2, rank=0)
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "latest-pointing-nowhere").mkdir()
    (tmp_path / "latest-pointing-nowhere" / "latest").write_text("step00000300")
    with pytest.raises(ConfigError) as err:
        resolve_resume(str(tmp_path / bad), checkpointer)
    assert err.value.field == "--resume"
    assert err.value.value == str(tmp_path / bad)


@pytest.mark.parametrize("damaged", ["rank0.pt", "mp_rank_00_model_states.pt"])
def test_a_checkpoint_with_a_file_cut_short_is_refused_before_loading(tmp_path: Path, damaged: str) -> None:
    """A checkpoint file cut short (a save killed while writing, a copy interrupted): ``--resume`` auto or the
    directory is one ConfigError naming the checkpoint and the file, before the engine is built, instead of torch's
    zip-reader RuntimeError when it loads; an older whole checkpoint still resumes."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, rank=0)
    older, newer = save_steps(checkpointer, FakeEngine(), 100, 200)
    # the engine's weights file, as DeepSpeed names it
    torch.save({"module": {}}, newer / "mp_rank_00_model_states.pt")
    file = newer / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    for arg in ("auto", str(newer)):
        with pytest.raises(ConfigError) as err:
            resolve_resume(arg, checkpointer)
        assert (err.value.field, err.value.value) == ("--resume", str(newer))
        assert err.value.allowed.startswith(f"{damaged} is damaged (not a whole torch.save archive: ")
        assert err.value.allowed.endswith("; resume from another checkpoint")
    assert resolve_resume(str(older), checkpointer) == older


def test_a_checkpoint_with_bytes_changed_inside_is_refused_before_loading(tmp_path: Path) -> None:
    """Bytes changed in the middle of a tensor's record (a bad disk, a faulty copy) leave the archive whole, and
    torch.load would load them as weights: the record's checksum does not match, so ``--resume`` is one ConfigError
    naming the file and the record; the older checkpoint still resumes."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, rank=0)
    older, newer = save_steps(checkpointer, FakeEngine(), 100, 200)
    file = newer / "mp_rank_00_model_states.pt"
    torch.save({"module": {"weight": torch.zeros(64, 1024)}}, file)
    data = bytearray(file.read_bytes())
    middle = data.index(bytes(4096)) + 2048  # inside the zeros of the weight's record
    data[middle:middle + 8] = b"\xff" * 8
    file.write_bytes(bytes(data))
    assert torch.load(file)["module"]["weight"].isnan().any()  # what a load without the check gives
    with pytest.raises(ConfigError) as err:
        resolve_resume("auto", checkpointer)
    assert (err.value.field, err.value.value) == ("--resume", str(newer))
    assert err.value.allowed == ("mp_rank_00_model_states.pt is damaged (its record mp_rank_00_model_states/data/0 "
                                 "does not read back: Bad CRC-32 for file 'mp_rank_00_model_states/data/0'); resume "
                                 "from another checkpoint"), err.value.allowed
    assert resolve_resume(str(older), checkpointer) == older


def test_a_checkpoint_saved_without_checksums_is_not_taken_for_damaged(tmp_path: Path) -> None:
    """torch.save can write archives without checksums (``torch.serialization.set_crc32_options(False)``: every
    record's CRC 0), which torch.load reads: such a checkpoint resumes, where a checksum check would refuse every
    record of it."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, rank=0)
    (newer,) = save_steps(checkpointer, FakeEngine(), 100)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"module": {"weight": torch.ones(8)}}, newer / "mp_rank_00_model_states.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert resolve_resume("auto", checkpointer) == newer


def test_each_rank_checks_its_share_of_the_files(tmp_path: Path) -> None:
    """With several ranks each reads every world-size-th file (sorted by name), so a damaged file is found by one
    rank only; ``resolve_resume`` shares that rank's verdict (a collective, run by the multi-rank resume tests)."""
    checkpoint = tmp_path / "step00000100"
    checkpoint.mkdir()
    for name in ("a.pt", "b.pt", "c.pt"):
        torch.save({"x": torch.ones(4)}, checkpoint / name)
    (checkpoint / "b.pt").write_bytes((checkpoint / "b.pt").read_bytes()[:40])
    assert damaged_file(checkpoint, rank=0, world_size=2) is None  # a.pt, c.pt
    assert damaged_file(checkpoint, rank=1, world_size=2).startswith("b.pt is damaged")  # type: ignore[union-attr]
    assert damaged_file(checkpoint).startswith("b.pt is damaged")  # type: ignore[union-attr]


def _central_entry(data: bytes, name: bytes) -> int:
    """Where the zip central directory's entry for the record ``name`` starts in ``data``."""
    start = data.index(b"PK\x01\x02")
    while data[start + 46:start + 46 + len(name)] != name:
        start = data.index(b"PK\x01\x02", start + 4)
    return start


@pytest.mark.parametrize("change", ["local header name", "central directory name", "directory flag"])
def test_a_checkpoint_with_a_header_byte_changed_is_damaged_not_a_traceback(tmp_path: Path, change: str) -> None:
    """A byte changed in an archive's headers instead of its data: a record name that no longer decodes (zipfile
    raises UnicodeDecodeError) is a damaged file, not a traceback; a data record flagged as a directory (zipfile
    would skip it, the loader would read it) is one too."""
    file = tmp_path / "m.pt"
    torch.save({"w": torch.ones(16)}, file)
    data = bytearray(file.read_bytes())
    entry = _central_entry(data, b"m/data/0")
    offset = {"local header name": 31, "central directory name": entry + 47, "directory flag": entry + 38}[change]
    data[offset] = data[offset] | 0x10 if change == "directory flag" else 0xFF
    file.write_bytes(bytes(data))
    found = damaged_file(tmp_path)
    assert found is not None and found.startswith("m.pt is damaged ("), found
    if change == "directory flag":
        assert found == "m.pt is damaged (its record m/data/0 is marked a directory)"
    else:
        assert "its zip headers do not read: UnicodeDecodeError" in found


def test_resolve_resume_refuses_on_every_rank_what_one_rank_found(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank checks its share of the files, so the verdicts are gathered: rank 0, whose share is whole, refuses
    the checkpoint that rank 1 found damaged (a two-rank process group stood in for: its gather returns rank 1's
    verdict)."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, rank=0)
    (newer,) = save_steps(checkpointer, FakeEngine(), 100)
    said_by_rank_1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged (...)"
    checked: list[tuple[int, int]] = []

    def gather(every: list[Any], found: Any) -> None:
        every[:] = [found, said_by_rank_1]

    monkeypatch.setattr("pipeline.checkpoint.damaged_file", lambda path, rank, world: checked.append((rank, world)))
    monkeypatch.setattr(checkpoint_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint_module.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(checkpoint_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(checkpoint_module.dist, "all_gather_object", gather)
    with pytest.raises(ConfigError) as err:
        resolve_resume(str(newer), checkpointer)
    assert checked == [(0, 2)]
    assert err.value.allowed == f"{said_by_rank_1}; resume from another checkpoint"


def test_a_checkpoint_in_torch_saves_legacy_format_is_not_taken_for_damaged(tmp_path: Path) -> None:
    """DeepSpeed writes torch.save's legacy (pickle, not zip) format when ``checkpoint.checkpoint_serialization`` is
    false: such a checkpoint resumes, where the zip check alone would call every file of it damaged."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3, rank=0)
    (newer,) = save_steps(checkpointer, FakeEngine(), 100)
    torch.save({"module": {}}, newer / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=False)
    assert resolve_resume("auto", checkpointer) == newer


# --------------------------------------------------------------------------------------------------- loading


def draws() -> tuple[float, float, list[float]]:
    """One draw from each global RNG a training step may use."""
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_load_restores_rng_exactly_and_returns_the_state(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=2, rank=0)
    engine = FakeEngine()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = checkpointer.save(engine, 100, client_state={"step": 100, "tokens": 51200, "cursor": 800},
                             rank_state={"data_sha256": "abc"})
    after_save = draws()  # what the run drew right after saving
    draws()  # the RNGs move on
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)

    client_state, rank_state = checkpointer.load(engine, path)
    assert draws() == after_save  # exactly the same numbers, from every generator
    assert client_state == {"step": 100, "tokens": 51200, "cursor": 800}
    assert rank_state == {"data_sha256": "abc"}  # the RNG states are consumed, not returned


def test_each_rank_gets_its_own_file(tmp_path: Path) -> None:
    """Every rank saves its RNG and data fingerprint into the same partial, rank 0 commits; each loads its own."""
    directory = tmp_path / "checkpoints"
    engine = FakeEngine()
    rank0, rank1 = (Checkpointer(directory, keep=2, rank=0, world_size=2),
                    Checkpointer(directory, keep=2, rank=1, world_size=2))
    # without processes there is no barrier to wait at: rank 1 saves first, then rank 0's save commits
    torch.manual_seed(1)
    rank1.save(engine, 100, client_state={"step": 100}, rank_state={"data_sha256": "rank1"})
    after_rank1_save = torch.rand(2).tolist()
    assert names(directory) == ["step00000100.partial"]  # rank 1 never commits
    torch.manual_seed(0)
    path = rank0.save(engine, 100, client_state={"step": 100}, rank_state={"data_sha256": "rank0"})
    after_rank0_save = torch.rand(2).tolist()
    assert names(path) == [ENGINE_FILE, "rank0.pt", "rank1.pt"]

    assert rank1.load(engine, path)[1] == {"data_sha256": "rank1"}
    assert torch.rand(2).tolist() == after_rank1_save
    assert rank0.load(engine, path)[1] == {"data_sha256": "rank0"}
    assert torch.rand(2).tolist() == after_rank0_save


def test_load_without_a_rank_file(tmp_path: Path) -> None:
    """A checkpoint of two ranks (as its run_state.json says) whose rank1.pt is gone: a clear error on every rank,
    not a crash, and not a checkpoint of one rank."""
    directory = tmp_path / "checkpoints"
    engine = FakeEngine()
    rank0, rank1 = (Checkpointer(directory, keep=2, rank=0, world_size=2),  # rank 0 clears partials when made
                    Checkpointer(directory, keep=2, rank=1, world_size=2))
    rank1.save(engine, 100, {"step": 100}, {"data_sha256": "1"})
    path = rank0.save(engine, 100, {"step": 100}, {"data_sha256": "0"}, readable=json.dumps({"world_size": 2}))
    (path / "rank1.pt").unlink()
    for checkpointer in (rank0, rank1, Checkpointer(directory, keep=2, rank=0, world_size=1)):
        with pytest.raises(ConfigError) as err:
            checkpointer.load(engine, path)
        assert (err.value.field, err.value.value) == ("--resume", str(path))
        assert "rank1.pt missing of its 2 ranks' files" in str(err.value)


def test_a_checkpoint_of_two_ranks_loads_on_one(tmp_path: Path) -> None:
    """On another world size (here a ZeRO-0 checkpoint, whose optimizer state is not partitioned: no conversion) the
    rank takes rank 0's RNG state and a data fingerprint that hashes every saved rank's, in rank order."""
    directory = tmp_path / "checkpoints"
    engine = FakeEngine()
    rank0, rank1 = (Checkpointer(directory, keep=2, rank=0, world_size=2),
                    Checkpointer(directory, keep=2, rank=1, world_size=2))
    torch.manual_seed(1)
    rank1.save(engine, 100, {"step": 100}, {"data_sha256": "b"})
    torch.manual_seed(0)
    path = rank0.save(engine, 100, {"step": 100}, {"data_sha256": "a"})
    after_rank0_save = torch.rand(2).tolist()
    client_state, rank_state = Checkpointer(directory, keep=2, rank=0, world_size=1).load(engine, path)
    assert client_state == {"step": 100}
    assert rank_state == {"data_sha256": hashlib.sha256(b"ab").hexdigest()}
    assert torch.rand(2).tolist() == after_rank0_save
    assert not (path / "universal").exists()


def test_load_of_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2, rank=0)
    with pytest.raises(ConfigError) as err:
        checkpointer.load(FakeEngine(), tmp_path)
    assert err.value.field == "--resume"


def test_a_run_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """Every field of a ``RunState`` comes back from ``save_state`` / ``load_state``: the shared fields through the
    engine's client state, this rank's data fingerprint through its own file."""
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2, rank=0)
    engine = FakeEngine()
    state = RunState(step=12, tokens=3072, cursor=96, elapsed_s=31.5, train_s=20.25, data_sha256="ab" * 32,
                     guard={"stage": 1, "losses": [2.0, 3.0], "grad_norms": [0.5], "events": 1, "lr_factor": 0.5,
                            "scale_until": 40},
                     best_eval_loss=4.75, curriculum={"base_lr": 0.003}, params_sha256="cd" * 32)
    path = checkpointer.save_state(engine, state)
    assert path.name == "step00000012"
    assert json.loads((path / ENGINE_FILE).read_text())["step"] == 12  # rank 0's client state holds the step
    assert checkpointer.load_state(engine, path) == state
