"""Bad data input: one line naming the field or file, the value and what is allowed; exit status 2; no traceback;
nothing already written is lost.

Three classes, each under its own header:

1. data directories that do not match what training reads, found when the directory is opened (``read_manifest``,
   ``load_tokens``, ``load_run_data``), the directory byte-identical afterwards;
2. ``prepare-data`` input (files and flags): the output directory as it was found, byte-identical when it held a
   prepared directory, absent when it did not exist;
3. the same through the real CLI (``prepare-data``, and ``train`` on a bad ``data.dir``, which writes no run
   directory).

Most cases are unit-level (the ``ConfigError`` message exactly); the CLI cases check the printed line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO_ROOT, TINY_LLAMA_YAML, make_config, process_env, run_cli
from tokenizers import Tokenizer, models, pre_tokenizers

from curriculum.errors import ConfigError
from curriculum.schedule import build_schedule
from pipeline import data
from pipeline.batches import load_run_data
from pipeline.data import EOT_TOKEN, load_tokens, prepare_data, read_manifest

AGAIN = "run `curriculum-pretrain prepare-data` again"
OPTIONS: dict[str, Any] = dict(tokenizer=None, vocab_size=300, text_field="text", val_fraction=0.25, dtype="auto",
                               seed=7, num_proc=1, max_files=None)
DOCUMENTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times, then rests.\n" * 3
             for i in range(16)]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``, hidden ones too: relative path -> sha256 of the bytes ("dir")."""
    return {str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


def assert_one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit status 2, no traceback, one ``error:`` line on stderr, the last, starting with ``expected``.
    (``datasets`` may draw progress bars above it when the error is found while reading the corpus.)"""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and lines[-1].startswith(expected), result.stderr


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 small text documents, a 300-token BPE: about 2,000 training tokens, enough for 16-token samples."""
    root = tmp_path_factory.mktemp("prepared")
    for i, text in enumerate(DOCUMENTS):
        (root / "corpus" / f"{i:02d}.txt").parent.mkdir(exist_ok=True)
        (root / "corpus" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    prepare_data([str(root / "corpus")], root / "data", **OPTIONS)
    return root / "data"


def copy_of(prepared: Path, destination: Path) -> Path:
    shutil.copytree(prepared, destination)
    return destination


# --------------------------------------------------------------------------------------------------- 1. data dirs
# Each case breaks a copy of a prepared directory, opens it with one reader and expects the exact message.


def edit_manifest(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """A breakage: ``change`` edits the manifest dict in place (or returns what replaces it)."""
    def apply(directory: Path) -> None:
        manifest = json.loads((directory / "manifest.json").read_text())
        replaced = change(manifest)
        (directory / "manifest.json").write_text(json.dumps(manifest if replaced is None else replaced))
    return apply


def write_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda directory: (directory / name).write_bytes(content)


def set_token(name: str, index: int, token_id: int) -> Callable[[Path], None]:
    """Overwrite one uint16 id of a token file (``index`` from the end when negative)."""
    def apply(directory: Path) -> None:
        tokens = np.fromfile(directory / name, dtype="<u2")
        tokens[index] = token_id
        tokens.tofile(directory / name)
    return apply


def drop(*keys: str) -> Callable[[dict], None]:
    """Delete ``manifest[a][b]`` for ``"a.b"``."""
    def change(manifest: dict) -> None:
        *parents, last = keys
        for key in parents:
            manifest = manifest[key]
        del manifest[last]
    return change


def put(value: Any, *keys: str) -> Callable[[dict], None]:
    """Set ``manifest[a][b] = value``."""
    def change(manifest: dict) -> None:
        *parents, last = keys
        for key in parents:
            manifest = manifest[key]
        manifest[last] = value
    return change


def remove(name: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).unlink()


def replace_with_directory(name: str) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / name).unlink()
        (directory / name).mkdir()
    return apply


@dataclass(frozen=True)
class Broken:
    id: str
    breakage: Callable[[Path], None]
    opens: str
    """``manifest`` (read_manifest), ``train``/``val`` (load_tokens) or ``run`` (load_run_data, run.export on)."""
    expected: str
    """The whole message after ``data.dir = '<dir>': ``; ``{vocab}``, ``{train_bytes}``, ``{val_bytes}``,
    ``{train_tokens}`` from the prepared manifest; ``{again}`` the hint."""
    prefix: bool = False
    """Only the start of the message is fixed (it ends with a parser's own words)."""


BROKEN = [
    # the manifest itself
    Broken("manifest is an array", write_file("manifest.json", b"[1, 2]"), "manifest",
           "manifest.json is [1, 2], not a JSON object; {again}"),
    Broken("manifest is a string", write_file("manifest.json", b'"prepared"'), "manifest",
           'manifest.json is "prepared", not a JSON object; {again}'),
    Broken("manifest is not UTF-8", write_file("manifest.json", b'{"format": 1, "dtype": "uint\xff16"}'), "manifest",
           "manifest.json is not readable JSON ('utf-8' codec can't decode byte 0xff in position 28: invalid start "
           "byte); {again}"),
    Broken("manifest cut short", write_file("manifest.json", b'{"format": 1, "tokenizer": '), "manifest",
           "manifest.json is not readable JSON (Expecting value: line 1 column 28 (char 27)); {again}"),
    Broken("manifest of another format", edit_manifest(put(2, "format")), "manifest",
           "manifest.json is not format 1; {again}"),
    # tokenizer.vocab_size and tokenizer.eot_id: every reader needs them
    Broken("no tokenizer", edit_manifest(drop("tokenizer")), "manifest", "manifest.json has no tokenizer; {again}"),
    Broken("tokenizer not an object", edit_manifest(put("tokenizer.json", "tokenizer")), "manifest",
           'manifest.json has tokenizer = "tokenizer.json", expected an object; {again}'),
    Broken("no vocab_size", edit_manifest(drop("tokenizer", "vocab_size")), "manifest",
           "manifest.json has no tokenizer.vocab_size; {again}"),
    Broken("vocab_size a string", edit_manifest(put("300", "tokenizer", "vocab_size")), "manifest",
           'manifest.json has tokenizer.vocab_size = "300", expected an integer >= 1; {again}'),
    Broken("vocab_size a float", edit_manifest(put(300.0, "tokenizer", "vocab_size")), "manifest",
           "manifest.json has tokenizer.vocab_size = 300.0, expected an integer >= 1; {again}"),
    Broken("vocab_size a boolean", edit_manifest(put(True, "tokenizer", "vocab_size")), "manifest",
           "manifest.json has tokenizer.vocab_size = true, expected an integer >= 1; {again}"),
    Broken("vocab_size 0", edit_manifest(put(0, "tokenizer", "vocab_size")), "manifest",
           "manifest.json has tokenizer.vocab_size = 0, expected an integer >= 1; {again}"),
    Broken("no eot_id", edit_manifest(drop("tokenizer", "eot_id")), "manifest",
           "manifest.json has no tokenizer.eot_id; {again}"),
    Broken("eot_id negative", edit_manifest(put(-1, "tokenizer", "eot_id")), "manifest",
           "manifest.json has tokenizer.eot_id = -1, expected an integer in [0, {vocab}) (below vocab_size); {again}"),
    Broken("eot_id not below vocab_size", edit_manifest(lambda m: put(m["tokenizer"]["vocab_size"], "tokenizer",
                                                                        "eot_id")(m)), "manifest",
           "manifest.json has tokenizer.eot_id = {vocab}, expected an integer in [0, {vocab}) (below vocab_size); "
           "{again}"),
    Broken("eot_id null", edit_manifest(put(None, "tokenizer", "eot_id")), "manifest",
           "manifest.json has tokenizer.eot_id = null, expected an integer in [0, {vocab}) (below vocab_size); "
           "{again}"),
    # dtype and splits: what the token files are
    Broken("no dtype", edit_manifest(drop("dtype")), "train", "manifest.json has no dtype; {again}"),
    Broken("unknown dtype", edit_manifest(put("float32", "dtype")), "train",
           'manifest.json has dtype = "float32", expected uint16 or uint32; {again}'),
    Broken("dtype not the files'", edit_manifest(put("uint32", "dtype")), "train",
           "train.bin is missing or not the {train_bytes_as_uint32:,} bytes the manifest says ({train_tokens:,} "
           "uint32 ids): {train_bytes:,} bytes; {again}"),
    Broken("no splits", edit_manifest(drop("splits")), "train", "manifest.json has no splits; {again}"),
    Broken("splits an array", edit_manifest(put(["train.bin", "val.bin"], "splits")), "val",
           'manifest.json has splits = ["train.bin", "val.bin"], expected an object; {again}'),
    Broken("no val split", edit_manifest(drop("splits", "val")), "val", "manifest.json has no splits.val; {again}"),
    Broken("split without file", edit_manifest(drop("splits", "train", "file")), "train",
           "manifest.json has no splits.train.file; {again}"),
    Broken("split file outside the directory", edit_manifest(put("../train.bin", "splits", "train", "file")), "train",
           'manifest.json has splits.train.file = "../train.bin", expected the name of a file in the directory; '
           "{again}"),
    Broken("split without tokens", edit_manifest(drop("splits", "train", "tokens")), "train",
           "manifest.json has no splits.train.tokens; {again}"),
    Broken("tokens a string", edit_manifest(put("12", "splits", "train", "tokens")), "train",
           'manifest.json has splits.train.tokens = "12", expected an integer >= 1 (train.bin must not be empty); '
           "{again}"),
    # the token files
    Broken("empty train split", lambda d: (write_file("train.bin", b"")(d),
                                           edit_manifest(put(0, "splits", "train", "tokens"))(d)), "train",
           "manifest.json has splits.train.tokens = 0, expected an integer >= 1 (train.bin must not be empty); "
           "{again}"),
    Broken("empty val split", lambda d: (write_file("val.bin", b"")(d),
                                         edit_manifest(put(0, "splits", "val", "tokens"))(d)), "val",
           "manifest.json has splits.val.tokens = 0, expected an integer >= 1 (val.bin must not be empty); {again}"),
    Broken("val.bin emptied", write_file("val.bin", b""), "val",
           "val.bin is missing or not the {val_bytes:,} bytes the manifest says ({val_tokens:,} uint16 ids): 0 bytes; "
           "{again}"),
    Broken("train.bin one byte long", lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes() + b"\0"),
           "train", "train.bin is missing or not the {train_bytes:,} bytes the manifest says ({train_tokens:,} uint16 "
                    "ids): {train_bytes_plus_one:,} bytes; {again}"),
    Broken("train.bin missing", remove("train.bin"), "train",
           "train.bin is missing or not the {train_bytes:,} bytes the manifest says ({train_tokens:,} uint16 ids): "
           "no such file; {again}"),
    Broken("train.bin a directory", replace_with_directory("train.bin"), "train",
           "train.bin is missing or not the {train_bytes:,} bytes the manifest says ({train_tokens:,} uint16 ids): "
           "not a regular file; {again}"),
    Broken("train id past the vocabulary", set_token("train.bin", 10, 65_535), "train",
           "train.bin holds token id 65,535 at index 10, not below tokenizer.vocab_size {vocab}; {again}"),
    Broken("val id past the vocabulary", set_token("val.bin", -1, 300), "val",
           "val.bin holds token id 300 at index {last_val_index:,}, not below tokenizer.vocab_size {vocab}; {again}"),
    Broken("vocab_size below the ids", edit_manifest(put(3, "tokenizer", "vocab_size")), "train",
           "train.bin holds token id {first_id_from_3} at index {first_index_from_3}, not below "
           "tokenizer.vocab_size 3; {again}"),
    # the tokenizer a run exports its model with (run.export is on)
    Broken("tokenizer.json missing", remove("tokenizer.json"), "run",
           "has no tokenizer.json, which the exported model needs (or set run.export=false); {again}"),
    Broken("tokenizer.json not a tokenizer", write_file("tokenizer.json", b"{}"), "run",
           "tokenizer.json is not a tokenizers JSON file (", prefix=True),
    Broken("eot_id not the tokenizer's", edit_manifest(put(1, "tokenizer", "eot_id")), "run",
           f"tokenizer.json gives {EOT_TOKEN} the id 0, manifest.json says tokenizer.eot_id 1; {{again}}"),
    Broken("vocab_size not the tokenizer's", edit_manifest(lambda m: put(m["tokenizer"]["vocab_size"] + 5, "tokenizer",
                                                                           "vocab_size")(m)), "run",
           "tokenizer.json has ids up to {last_id}, manifest.json says tokenizer.vocab_size {vocab_plus_5}; {again}"),
    Broken("no eot_token", edit_manifest(drop("tokenizer", "eot_token")), "run",
           "manifest.json has no tokenizer.eot_token; {again}"),
]


def facts(prepared: Path) -> dict[str, Any]:
    """The numbers the expected messages quote, from the prepared directory."""
    manifest = read_manifest(prepared)
    vocab, splits = manifest["tokenizer"]["vocab_size"], manifest["splits"]
    train = np.fromfile(prepared / "train.bin", dtype="<u2")
    first_index_from_3 = int(np.argmax(train >= 3))
    return {"vocab": vocab, "vocab_plus_5": vocab + 5, "last_id": vocab - 1, "again": AGAIN,
            "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
            "train_bytes": 2 * splits["train"]["tokens"], "train_bytes_plus_one": 2 * splits["train"]["tokens"] + 1,
            "train_bytes_as_uint32": 4 * splits["train"]["tokens"], "val_bytes": 2 * splits["val"]["tokens"],
            "last_val_index": splits["val"]["tokens"] - 1,
            "first_index_from_3": first_index_from_3, "first_id_from_3": int(train[first_index_from_3])}


def open_run_data(directory: Path, export: bool = True) -> Any:
    """``load_run_data`` as ``train`` calls it: 16-token samples, evaluation batches of 2."""
    config = make_config({"stages": [{"until_step": 2, "seq_len": 16, "global_batch": 2}]},
                         run={"eval_batch": 2, "eval_batches": 1, "export": export}, data={"dir": str(directory)})
    return load_run_data(config, build_schedule(config, 1), rank=0, world_size=1, device=torch.device("cpu"))


def open_with(reader: str, directory: Path) -> Any:
    """``reader`` of ``Broken.opens``; ``run`` exports (the tokenizer is checked)."""
    if reader == "manifest":
        return read_manifest(directory)
    if reader == "run":
        return open_run_data(directory, export=True)
    return load_tokens(directory, reader)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", BROKEN, ids=[case.id for case in BROKEN])
def test_broken_data_directory_is_one_error_naming_data_dir(case: Broken, prepared: Path, tmp_path: Path) -> None:
    """The reader raises ``ConfigError`` on ``data.dir`` with the exact message, which says to prepare the data
    again; the directory is byte-identical afterwards. ``load_run_data`` finds every case as well."""
    directory = copy_of(prepared, tmp_path / "data")
    case.breakage(directory)
    before = tree_digest(directory)
    expected = f"data.dir = {str(directory)!r}: " + case.expected.format(**facts(prepared))
    for open_directory in (lambda: open_with(case.opens, directory),
                           lambda: open_run_data(directory, export=case.opens == "run")):
        with pytest.raises(ConfigError) as caught:
            open_directory()
        assert caught.value.field == "data.dir"
        assert str(caught.value).startswith(expected) if case.prefix else str(caught.value) == expected
        assert str(caught.value).endswith(AGAIN)
    assert tree_digest(directory) == before


def test_a_prepared_directory_opens_and_needs_its_tokenizer_only_to_export(prepared: Path, tmp_path: Path) -> None:
    """The prepared directory passes every check; without tokenizer.json it still opens when nothing is exported."""
    run_data = open_run_data(prepared)
    assert run_data.manifest == read_manifest(prepared) and run_data.sampler.num_samples >= 1
    directory = copy_of(prepared, tmp_path / "data")
    (directory / "tokenizer.json").unlink()
    assert open_run_data(directory, export=False).manifest == run_data.manifest


def test_the_id_check_reads_chunk_by_chunk(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 7-id chunks an id past the vocabulary in the fourth chunk is found at its index in the whole file."""
    monkeypatch.setattr(data, "ID_CHECK_CHUNK", 7)
    directory = copy_of(prepared, tmp_path / "data")
    set_token("train.bin", 23, 1000)(directory)
    with pytest.raises(ConfigError, match="train.bin holds token id 1,000 at index 23, not below"):
        load_tokens(directory, "train")


# --------------------------------------------------------------------------------------------------- 2. prepare-data


def make_bad_inputs(root: Path) -> None:
    """One small file or directory per kind of bad input, next to two good text files."""
    (root / "good.txt").write_text("a document\n", encoding="utf-8")
    (root / "good2.txt").write_text("another document\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("ok\nok\ncafé\n".encode("latin-1"))
    (root / "cut.txt").write_bytes("abc".encode() + "é".encode()[:1])
    (root / "utf16.txt").write_bytes("hi".encode("utf-16"))
    (root / "latin1.jsonl").write_bytes('{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"))
    (root / "empty.jsonl").write_bytes(b"")
    (root / "blank.jsonl").write_bytes(b"\n  \n\n")
    (root / "array.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    (root / "string.jsonl").write_text('{"text": "fine"}\n"just text"\n')
    (root / "null.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (root / "no_field.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), root / "no_rows.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), root / "other_column.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), root / "ints.parquet")
    (root / "dangling.txt").symlink_to(root / "nowhere.txt")
    (root / "with_dangling").mkdir()
    (root / "with_dangling" / "ok.txt").write_text("fine\n")
    (root / "with_dangling" / "gone.txt").symlink_to(root / "gone-for-good.txt")
    os.mkfifo(root / "pipe.txt")
    (root / "with_pipe").mkdir()
    os.mkfifo(root / "with_pipe" / "pipe.txt")
    (root / "dir.txt").mkdir()
    (root / "blank").mkdir()
    (root / "blank" / "x.txt").write_text("  \n\n")
    (root / "blank" / "y.txt").write_text("")
    (root / "locked").mkdir()
    (root / "locked" / "secret.txt").write_text("you may not read this\n")
    (root / "locked" / "secret.txt").chmod(0)
    no_unk = Tokenizer(models.WordLevel({"a": 0, "document": 1, EOT_TOKEN: 2}))
    no_unk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    no_unk.save(str(root / "no_unk.json"))
    (root / "a_file").write_text("not a directory")


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    make_bad_inputs(root)
    return root


@dataclass(frozen=True)
class BadSource:
    id: str
    sources: tuple[str, ...]
    """Relative to the directory of bad inputs (globs too)."""
    expected: str
    """The message, ``{bad}`` the directory of bad inputs; a prefix when ``prefix``."""
    options: dict[str, Any] = field(default_factory=dict)
    prefix: bool = False


UTF8_HINT = "convert the file to UTF-8, e.g. with iconv"
GOOD = ("good.txt", "good2.txt")
BAD_SOURCES = [
    # text that is not UTF-8: the file, the byte offset from 0 and the line from 1; never replaced
    BadSource("latin-1 text", ("latin1.txt", *GOOD),
              f"{{bad}}/latin1.txt = 'byte 9': line 3 is not UTF-8 text (invalid continuation byte); {UTF8_HINT}"),
    BadSource("UTF-8 cut mid-character", ("cut.txt", *GOOD),
              f"{{bad}}/cut.txt = 'byte 3': line 1 is not UTF-8 text (unexpected end of data); {UTF8_HINT}"),
    BadSource("UTF-16 text", ("utf16.txt", *GOOD),
              f"{{bad}}/utf16.txt = 'byte 0': line 1 is not UTF-8 text (invalid start byte); {UTF8_HINT}"),
    BadSource("latin-1 jsonl", ("latin1.jsonl", *GOOD),
              f"{{bad}}/latin1.jsonl = 'byte 30': line 2 is not UTF-8 text (invalid continuation byte); {UTF8_HINT}"),
    # .jsonl and .parquet files without documents, lines that are not objects with the text field
    BadSource("empty jsonl", ("empty.jsonl", *GOOD),
              "{bad}/empty.jsonl = '0 bytes': holds no JSON lines (empty or blank); leave it out of the sources"),
    BadSource("blank jsonl", (*GOOD, "blank.jsonl"),
              "{bad}/blank.jsonl = '5 bytes': holds no JSON lines (empty or blank); leave it out of the sources"),
    BadSource("jsonl line an array", ("array.jsonl",), "{bad}/array.jsonl line 2 = '[1, 2]': is not a JSON object"),
    BadSource("jsonl line a string", ("string.jsonl",),
              "{bad}/string.jsonl line 2 = '\"just text\"': is not a JSON object"),
    BadSource("jsonl text null", ("null.jsonl",),
              "{bad}/null.jsonl line 2 = '{{\"text\": null}}': has no string field 'text' (see --text-field)"),
    BadSource("jsonl without the field", ("no_field.jsonl",),
              "{bad}/no_field.jsonl line 2 = '{{\"body\": \"no text here\"}}': has no string field 'text' "
              "(see --text-field)"),
    BadSource("parquet without rows", ("no_rows.parquet", *GOOD),
              "{bad}/no_rows.parquet = '0 rows': holds no rows; leave it out of the sources"),
    BadSource("parquet without the column", ("other_column.parquet",),
              "--text-field = 'text': {bad}/other_column.parquet has no such column (columns: ['body'])"),
    BadSource("parquet column of numbers", ("ints.parquet",),
              "--text-field = 'text': {bad}/ints.parquet: the column is int64, not a string"),
    # files that cannot be read as files, sources that match nothing, nothing but blank documents
    BadSource("dangling link", ("dangling.txt", *GOOD),
              "sources = '{bad}/dangling.txt': is a symbolic link to {bad}/nowhere.txt, which does not exist"),
    BadSource("dangling link in a directory", ("with_dangling", *GOOD),
              "sources = '{bad}/with_dangling/gone.txt': is a symbolic link to {bad}/gone-for-good.txt, which does "
              "not exist"),
    BadSource("FIFO", ("pipe.txt", *GOOD),
              "sources = '{bad}/pipe.txt': is not a regular file (a FIFO, socket or device)"),
    BadSource("FIFO matched by a glob", ("with_pipe/*.txt", *GOOD),
              "sources = '{bad}/with_pipe/pipe.txt': is not a regular file (a FIFO, socket or device)"),
    BadSource("unreadable file", ("locked", *GOOD),
              "sources = '{bad}/locked/secret.txt': cannot be read (Permission denied)"),
    BadSource("directory named like a file", ("dir.txt", *GOOD),
              "sources = '{bad}/dir.txt': the directory holds no .txt, .jsonl or .parquet files"),
    BadSource("glob matching nothing", ("nothing/*.txt", *GOOD),
              "sources = '{bad}/nothing/*.txt': the pattern matches no .txt, .jsonl or .parquet files"),
    BadSource("every document blank", ("blank",),
              "sources = ['{bad}/blank']: every document is empty or only whitespace; need at least 2 (one to "
              "validate on)"),
    BadSource("tokenizer that cannot encode the corpus", GOOD,
              "--tokenizer = '{bad}/no_unk.json': cannot encode every document: WordLevel error: Missing [UNK] token "
              "from the vocabulary", options={"tokenizer": "{bad}/no_unk.json"}),
    BadSource("the same with two processes", GOOD,
              "--tokenizer = '{bad}/no_unk.json': cannot encode every document: ", prefix=True,
              options={"tokenizer": "{bad}/no_unk.json", "num_proc": 2}),
]


def prepare_bad(case: BadSource, bad: Path, output: Path) -> ConfigError:
    options = {**OPTIONS, **{key: value.format(bad=bad) if isinstance(value, str) else value
                             for key, value in case.options.items()}}
    with pytest.raises(ConfigError) as caught:
        prepare_data([str(bad / source) for source in case.sources], output, **options)
    return caught.value


def skip_when_readable(case: BadSource, bad: Path) -> None:
    if case.id == "unreadable file" and os.access(bad / "locked" / "secret.txt", os.R_OK):
        pytest.skip("running as root: file permissions do not stop reads")


@pytest.mark.parametrize("case", BAD_SOURCES, ids=[case.id for case in BAD_SOURCES])
def test_bad_source_leaves_a_prepared_output_byte_identical(case: BadSource, bad: Path, prepared: Path,
                                                            tmp_path: Path) -> None:
    """``ConfigError`` with the exact message; the prepared directory it would have replaced is untouched."""
    skip_when_readable(case, bad)
    output = copy_of(prepared, tmp_path / "out")
    before = tree_digest(output)
    message = str(prepare_bad(case, bad, output))
    expected = case.expected.format(bad=bad)
    assert message.startswith(expected) if case.prefix else message == expected
    assert tree_digest(output) == before


@pytest.mark.parametrize("case", [case for case in BAD_SOURCES if case.id in (
    "latin-1 text", "jsonl without the field", "every document blank", "tokenizer that cannot encode the corpus")],
    ids=lambda case: case.id)
def test_bad_source_leaves_no_new_output_directory(case: BadSource, bad: Path, tmp_path: Path) -> None:
    """A failure found while reading (or tokenizing) the corpus removes the directories the run created."""
    prepare_bad(case, bad, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------------- 3. the real CLI
# prepare-data: flags (found before anything is read) and a few corpus errors; the output is a prepared directory.

@dataclass(frozen=True)
class CliCase:
    id: str
    args: tuple[str, ...]
    """``{bad}``: the directory of bad inputs; ``{out}``: a copy of a prepared directory."""
    expected: str
    """The start of the ``error:`` line."""


CLI_GOOD = ("{bad}/good.txt", "{bad}/good2.txt")
CLI_CASES = [
    CliCase("val fraction negative", (*CLI_GOOD, "--output", "{out}", "--val-fraction", "-0.1"),
            "error: --val-fraction = -0.1: must be in (0, 0.5]"),
    CliCase("val fraction 1", (*CLI_GOOD, "--output", "{out}", "--val-fraction", "1"),
            "error: --val-fraction = 1.0: must be in (0, 0.5]"),
    CliCase("val fraction nan", (*CLI_GOOD, "--output", "{out}", "--val-fraction", "nan"),
            "error: curriculum-pretrain prepare-data: argument --val-fraction: must be a finite number, not 'nan'"),
    CliCase("val fraction not a number", (*CLI_GOOD, "--output", "{out}", "--val-fraction", "half"),
            "error: curriculum-pretrain prepare-data: argument --val-fraction: must be a number, not 'half'"),
    CliCase("vocab too small", (*CLI_GOOD, "--output", "{out}", "--vocab-size", "100"),
            "error: --vocab-size = 100: must be in [257, 2**32]"),
    CliCase("vocab too large for uint16",
            (*CLI_GOOD, "--output", "{out}", "--vocab-size", "70000", "--dtype", "uint16"),
            "error: --dtype = 'uint16': --vocab-size 70000 needs uint32 (uint16 holds 65,536 ids)"),
    CliCase("num-proc 0", (*CLI_GOOD, "--output", "{out}", "--num-proc", "0"), "error: --num-proc = 0: must be >= 1"),
    CliCase("num-proc negative", (*CLI_GOOD, "--output", "{out}", "--num-proc", "-4"),
            "error: --num-proc = -4: must be >= 1"),
    CliCase("max-files 0", (*CLI_GOOD, "--output", "{out}", "--max-files", "0"),
            "error: --max-files = 0: must be >= 1"),
    CliCase("output an existing file", (*CLI_GOOD, "--output", "{bad}/a_file"),
            "error: --output = '{bad}/a_file': is a file; give a directory"),
    CliCase("output below a file", (*CLI_GOOD, "--output", "{bad}/a_file/data"),
            "error: --output = '{bad}/a_file/data': {bad}/a_file is a file; give a directory"),
    CliCase("latin-1 text", ("{bad}/latin1.txt", *CLI_GOOD, "--output", "{out}"),
            "error: {bad}/latin1.txt = 'byte 9': line 3 is not UTF-8 text"),
    CliCase("empty jsonl", ("{bad}/empty.jsonl", *CLI_GOOD, "--output", "{out}"),
            "error: {bad}/empty.jsonl = '0 bytes': holds no JSON lines"),
    CliCase("parquet without rows", ("{bad}/no_rows.parquet", *CLI_GOOD, "--output", "{out}"),
            "error: {bad}/no_rows.parquet = '0 rows': holds no rows"),
    CliCase("tokenizer that cannot encode the corpus", (*CLI_GOOD, "--output", "{out}", "--tokenizer",
                                                        "{bad}/no_unk.json", "--num-proc", "2"),
            "error: --tokenizer = '{bad}/no_unk.json': cannot encode every document: WordLevel error"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_prepare_data_cli_prints_one_line(case: CliCase, bad: Path, prepared: Path, tmp_path: Path) -> None:
    """``python -m pipeline.cli prepare-data``: exit status 2, one ``error:`` line, no traceback; the prepared
    output directory is byte-identical."""
    output = copy_of(prepared, tmp_path / "out")
    before = tree_digest(output)
    result = run_cli(["prepare-data", *(arg.format(bad=bad, out=output) for arg in case.args)])
    assert_one_error_line(result, case.expected.format(bad=bad))
    assert tree_digest(output) == before


# train: a bad data.dir stops the run before it writes anything.

TRAIN_YAML = """\
name: bad-data
""" + TINY_LLAMA_YAML + """\
curriculum:
  stages:
    - {{until_step: 2, seq_len: 16, global_batch: 2}}
run:
  eval_batch: 2
  eval_batches: 1
"""

TRAIN_CASES = [
    Broken("manifest without splits", edit_manifest(drop("splits")), "train",
           "manifest.json has no splits; {again}"),
    Broken("token id past the vocabulary", set_token("train.bin", 10, 65_535), "train",
           "train.bin holds token id 65,535 at index 10, not below tokenizer.vocab_size {vocab}; {again}"),
    Broken("empty val.bin", write_file("val.bin", b""), "val",
           "val.bin is missing or not the {val_bytes:,} bytes the manifest says ({val_tokens:,} uint16 ids): 0 bytes; "
           "{again}"),
    Broken("tokenizer.json missing", remove("tokenizer.json"), "run",
           "has no tokenizer.json, which the exported model needs (or set run.export=false); {again}"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[case.id for case in TRAIN_CASES])
def test_train_on_a_broken_data_dir_prints_one_line_and_writes_nothing(case: Broken, prepared: Path,
                                                                       tmp_path: Path) -> None:
    """``python -m pipeline.cli train --set data.dir=BROKEN``: exit status 2, one ``error:`` line naming data.dir,
    no traceback; the run directory is never created and the data directory is byte-identical."""
    directory = copy_of(prepared, tmp_path / "data")
    case.breakage(directory)
    before = tree_digest(directory)
    config = tmp_path / "bad-data.yaml"
    config.write_text(TRAIN_YAML.format(data_dir=prepared))
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--config", str(config),
                             "--set", f"data.dir={directory}", "--output-dir", str(run_dir)],
                            cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=300)
    expected = f"error: data.dir = {str(directory)!r}: " + case.expected.format(**facts(prepared))
    assert_one_error_line(result, expected)
    assert result.stderr.strip().splitlines()[-1] == expected
    assert not run_dir.exists()
    assert tree_digest(directory) == before
