"""``prepare-data`` and the token readers: a tiny mixed corpus in, packed token files that decode back to it out.

The corpus has .txt, .jsonl and .parquet documents (and some blank ones, which are dropped); the tokenizer is a
byte-level BPE of 300 tokens, so ``decode(encode(text)) == text`` and every document can be checked exactly. Bad
input goes through the real CLI in a subprocess: exit status 2, ``error: <field> = <value>: ...``, no traceback.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from tokenizers import Tokenizer, models, pre_tokenizers

from curriculum.errors import ConfigError
from pipeline.cli import build_parser
from pipeline.data import (
    EOT_TOKEN,
    choose_validation,
    load_tokens,
    documentation_text,
    prepare_data,
    python_docs_files,
    python_package_files,
    python_stdlib_files,
    read_manifest,
    resolve_sources,
    site_packages,
)

TEXT_FILES = {
    "a.txt": "The first text document.\nIt has two lines.\n",
    "b.txt": "   \n\t\n",  # whitespace only: dropped
    "sub/c.txt": "def double(x):\n    return x * 2  # café, ünïcode\n",
}
JSONL_LINES = [
    '{"text": "json row one", "id": 1}',
    "",  # blank lines are skipped
    '{"text": "a row that mentions <|endoftext|> as plain text", "id": 2}',
    '{"text": "json row three"}',
]
PARQUET_TEXTS = ["parquet row one", "", "parquet row three\nwith a newline"]
# Packed order: .txt files (sorted), then .jsonl lines, then .parquet rows; blank documents dropped.
DOCUMENTS = [
    TEXT_FILES["a.txt"], TEXT_FILES["sub/c.txt"],
    "json row one", "a row that mentions <|endoftext|> as plain text", "json row three",
    "parquet row one", "parquet row three\nwith a newline",
]
SOURCE_FILES = ["a.txt", "b.txt", "rows.jsonl", "sub/c.txt", "table.parquet"]  # sorted, as the directory is read
N_VAL = 4  # max(1, round(0.5 * 7 documents)) = round(3.5) = 4
OPTIONS: dict[str, Any] = dict(tokenizer=None, vocab_size=300, text_field="text", val_fraction=0.5, dtype="auto",
                               seed=7, num_proc=1, max_files=None)


def make_corpus(root: Path) -> Path:
    """The mixed corpus above, written under ``root / "corpus"``."""
    corpus = root / "corpus"
    for name, text in TEXT_FILES.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(text, encoding="utf-8")
    (corpus / "rows.jsonl").write_text("\n".join(JSONL_LINES) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": PARQUET_TEXTS, "n": [1, 2, 3]}), corpus / "table.parquet")
    return corpus


def prepare(sources: list[Path], output_dir: Path, **overrides: Any) -> dict:
    return prepare_data([str(source) for source in sources], output_dir, **{**OPTIONS, **overrides})


def split_documents(tokens: np.ndarray, eot_id: int) -> list[list[int]]:
    """The token ids of each document in a packed file (each ends with ``eot_id``, which is dropped)."""
    ends = np.flatnonzero(tokens == eot_id)
    assert len(tokens) > 0 and ends[-1] == len(tokens) - 1, "the file must end with the end-of-text id"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[start:end].tolist() for start, end in zip(starts, ends)]


def decoded_split(data_dir: Path, split: str) -> list[str]:
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    eot_id = read_manifest(data_dir)["tokenizer"]["eot_id"]
    return [tokenizer.decode(ids) for ids in split_documents(np.asarray(load_tokens(data_dir, split)), eot_id)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The corpus prepared once: (corpus directory, output directory, manifest)."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = make_corpus(root)
    manifest = prepare([corpus], root / "out")
    return corpus, root / "out", manifest


# --------------------------------------------------------------------------------------------------- prepare


def test_manifest_describes_the_corpus(prepared: tuple[Path, Path, dict]) -> None:
    """Documents, tokens, sources (sha256, bytes) and tokenizer in the manifest match the corpus and the files;
    nothing but the four files is left in the directory."""
    corpus, out, manifest = prepared
    assert manifest == read_manifest(out)
    assert manifest["format"] == 1 and manifest["dtype"] == "uint16"
    assert manifest["seed"] == 7 and manifest["val_fraction"] == 0.5
    assert [source["path"] for source in manifest["sources"]] == [str(corpus / name) for name in SOURCE_FILES]
    for source in manifest["sources"]:
        data = Path(source["path"]).read_bytes()
        assert source["sha256"] == hashlib.sha256(data).hexdigest() and source["bytes"] == len(data)
    tokenizer = manifest["tokenizer"]
    assert tokenizer["file"] == "tokenizer.json" and tokenizer["origin"] == "trained"
    assert tokenizer["eot_token"] == EOT_TOKEN and tokenizer["eot_id"] == 0
    assert 257 <= tokenizer["vocab_size"] <= 300  # 256 bytes + <|endoftext|>, plus the merges the corpus allows
    splits = manifest["splits"]
    assert (splits["train"]["documents"], splits["val"]["documents"]) == (len(DOCUMENTS) - N_VAL, N_VAL)
    for split in ("train", "val"):
        assert splits[split]["file"] == f"{split}.bin"
        assert (out / f"{split}.bin").stat().st_size == 2 * splits[split]["tokens"]  # uint16: 2 bytes a token
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]


def test_tokens_decode_back_to_whole_documents(prepared: tuple[Path, Path, dict]) -> None:
    """Every document ends with <|endoftext|> and decodes to its exact text; validation holds whole documents,
    disjoint from training; training keeps corpus order; the text "<|endoftext|>" inside a document is not the id."""
    _, out, manifest = prepared
    train, val = decoded_split(out, "train"), decoded_split(out, "val")
    assert len(train) == manifest["splits"]["train"]["documents"] and len(val) == N_VAL
    assert sorted(train + val) == sorted(DOCUMENTS)
    assert not set(train) & set(val)
    assert train == [document for document in DOCUMENTS if document not in val]


def test_same_seed_same_bytes_other_seed_other_split(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """Preparing the same corpus with the same seed writes identical files; seed 8 picks other validation documents."""
    corpus, out, _ = prepared
    prepare([corpus], tmp_path / "again")
    for name in ("tokenizer.json", "train.bin", "val.bin", "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    prepare([corpus], tmp_path / "seed8", seed=8)
    assert sorted(decoded_split(tmp_path / "seed8", "val")) != sorted(decoded_split(out, "val"))


def test_existing_tokenizer_directory_is_reused(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """``--tokenizer DIR`` loads DIR/tokenizer.json, copies it and records where it came from; with the same
    split the token files equal those of the run that trained it."""
    corpus, out, _ = prepared
    manifest = prepare([corpus], tmp_path / "reuse", tokenizer=str(out), vocab_size=4096)  # vocab_size is ignored
    assert manifest["tokenizer"]["origin"] == str(out / "tokenizer.json")
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "reuse" / name).read_bytes() == (out / name).read_bytes(), name


def test_sources_are_globs_and_files_each_once(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """A glob and a file naming the same file read it once; ``max_files`` keeps the first files."""
    corpus, _, _ = prepared
    sources = [corpus / "*.txt", corpus / "a.txt", corpus / "sub", corpus / "rows.jsonl"]
    manifest = prepare(sources, tmp_path / "out", max_files=3)
    assert [source["path"] for source in manifest["sources"]] == [str(corpus / name)
                                                                  for name in ("a.txt", "b.txt", "sub/c.txt")]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 2  # b.txt is blank
    with pytest.raises(ConfigError, match="1 non-empty document; need at least 2"):
        prepare(sources, tmp_path / "one", max_files=2)  # a.txt and the blank b.txt


def test_ids_beyond_uint16_are_written_as_uint32(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """A loaded tokenizer with an id above 65,535 gives uint32 files (``auto``) and vocab_size = largest id + 1."""
    corpus, _, _ = prepared
    vocab = {"[UNK]": 0, "parquet": 1, EOT_TOKEN: 70_000}
    wide = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wide.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wide.save(str(tmp_path / "wide.json"))
    manifest = prepare([corpus / "table.parquet"], tmp_path / "out", tokenizer=str(tmp_path / "wide.json"))
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 70_001
    tokens = np.asarray(load_tokens(tmp_path / "out", "train")).tolist() + np.asarray(
        load_tokens(tmp_path / "out", "val")).tolist()
    assert tokens.count(70_000) == 2 and tokens.count(1) == 2  # two non-blank rows, each starts with "parquet"


def test_python_stdlib_through_the_cli_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``prepare-data --source python-stdlib --max-files 20`` writes data/python-stdlib (relative to the working
    directory) from the first 20 standard-library files and prints a summary."""
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["prepare-data", "--source", "python-stdlib", "--max-files", "20",
                                      "--vocab-size", "300", "--num-proc", "2"])
    assert args.run(args) == 0
    out = tmp_path / "data" / "python-stdlib"
    manifest = read_manifest(out)
    expected = python_stdlib_files()[:20]
    assert [source["path"] for source in manifest["sources"]] == [str(path) for path in expected]
    assert not any("site-packages" in path.parts for path in python_stdlib_files())
    non_blank = sum(1 for path in expected if path.read_text(encoding="utf-8", errors="replace").strip())
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == non_blank
    assert splits["val"]["documents"] == 1  # max(1, round(0.01 * n))
    assert f"wrote {Path('data/python-stdlib')}" in capsys.readouterr().out


def test_python_packages_are_the_installed_packages_sources(tmp_path: Path) -> None:
    """``python-packages`` reads the ``.py`` files under site-packages (this environment has torch), none of the
    standard library's; its first files become documents as ``python-stdlib``'s do."""
    files = python_package_files()
    roots = site_packages()
    assert files == sorted(files) and all(path.suffix == ".py" for path in files)
    assert all(any(root in path.parents for root in roots) for path in files)
    assert any(path.parts[-2:] == ("torch", "__init__.py") for path in files)
    assert not set(files) & set(python_stdlib_files())
    both = resolve_sources(["python-stdlib", "python-docs"], None)  # the stdlib's files once as code, once as docs
    first = python_stdlib_files()[0]
    assert {f.kind for f in both if f.path == first} == {"python", "docs"}
    manifest = prepare_data(["python-packages"], tmp_path / "out", **{**OPTIONS, "max_files": 12})
    assert [source["path"] for source in manifest["sources"]] == [str(path) for path in files[:12]]


def test_python_docs_reads_docstrings_descriptions_and_documentation(tmp_path: Path) -> None:
    """``python-docs`` takes from a ``.py`` file only its docstrings of at least 5 words (module, class, function,
    in source order, each once), from package metadata the description after the headers, and documentation files
    as they are; licenses and the other files of ``.dist-info`` directories are not read."""
    module = tmp_path / "m.py"
    module.write_text('''"""A module docstring with enough words in it."""
import os

def f():
    """Short one."""
    x = "a string that is not a docstring at all, however long"
    return x

class C:
    """A class docstring, also long enough to keep."""

    def g(self):
        """A module docstring with enough words in it."""
''', encoding="utf-8")
    assert documentation_text(str(module)) == ("A module docstring with enough words in it.\n\n"
                                               "A class docstring, also long enough to keep.")
    broken = tmp_path / "broken.py"
    broken.write_text('"""Never parsed because the file is not Python."""\ndef (:\n', encoding="utf-8")
    assert documentation_text(str(broken)) == ""
    metadata = tmp_path / "METADATA"
    metadata.write_text("Metadata-Version: 2.1\nName: pkg\nSummary: s\n\n# pkg\n\nWhat it does.\n", encoding="utf-8")
    assert documentation_text(str(metadata)) == "# pkg\n\nWhat it does.\n"
    readme = tmp_path / "guide.rst"
    readme.write_bytes("Usage\n=====\n\nCaf\u00e9 \xff".encode("utf-8") + b"\xff")
    assert documentation_text(str(readme)) == "Usage\n=====\n\nCaf\u00e9 \xff\ufffd"

    files = python_docs_files()
    names = {path.name for path in files}
    assert "METADATA" in names and set(python_stdlib_files()) <= set(files)
    assert any(path.suffix in (".md", ".rst", ".txt") for path in files)
    assert not any(path.name.lower().startswith(("license", "copying")) for path in files)
    assert not any(path.parent.name.endswith(".dist-info") and path.name != "METADATA" for path in files)
    prepare_data(["python-docs"], tmp_path / "out", **{**OPTIONS, "max_files": 40})
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    decoded = sum(len(tok.decode(load_tokens(tmp_path / "out", split).tolist())) for split in ("train", "val"))
    texts = [documentation_text(str(path)) for path in files[:40]]
    assert decoded == sum(len(text) for text in texts if text.strip())  # the docstrings alone, not the code
    assert decoded < sum(path.stat().st_size for path in files[:40]) / 3


@pytest.mark.parametrize(("n_documents", "val_fraction", "n_val"), [
    (2, 0.01, 1),  # at least one
    (100, 0.01, 1),
    (1790, 0.01, 18),  # 17.9 rounds to 18
    (3, 0.5, 2),  # round(1.5) = 2: train keeps 1
    (7, 0.5, 4),  # round(3.5) = 4
    (10, 0.25, 2),  # round(2.5) = 2: Python rounds halves to even
])
def test_validation_count_and_determinism(n_documents: int, val_fraction: float, n_val: int) -> None:
    """``max(1, round(val_fraction * n))`` documents go to validation, the same ones for the same seed."""
    is_val = choose_validation(n_documents, val_fraction, seed=3)
    assert is_val.sum() == n_val and 0 < n_documents - n_val
    assert np.array_equal(is_val, choose_validation(n_documents, val_fraction, seed=3))


# --------------------------------------------------------------------------------------------------- readers


def test_load_tokens_is_a_read_only_memmap(prepared: tuple[Path, Path, dict]) -> None:
    """``load_tokens`` gives a read-only 1-D memmap of the manifest's dtype and token count."""
    _, out, manifest = prepared
    for split in ("train", "val"):
        tokens = load_tokens(out, split)
        assert isinstance(tokens, np.memmap) and tokens.ndim == 1 and tokens.dtype == np.uint16
        assert len(tokens) == manifest["splits"][split]["tokens"] and not tokens.flags.writeable
    with pytest.raises(ConfigError, match="train or val"):
        load_tokens(out, "test")  # type: ignore[arg-type]


def test_readers_name_data_dir_and_prepare_data(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """A missing directory, a directory without a manifest and a truncated token file are ``data.dir`` errors
    that say to run prepare-data."""
    _, out, _ = prepared
    for missing in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(ConfigError, match="curriculum-pretrain prepare-data") as caught:
            read_manifest(missing)
        assert caught.value.field == "data.dir"
    shutil.copytree(out, tmp_path / "cut")
    with open(tmp_path / "cut" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ConfigError, match="train.bin is missing or not"):
        load_tokens(tmp_path / "cut", "train")


# --------------------------------------------------------------------------------------------------- bad input


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    """``{bad}``: the directory of bad inputs below; ``{out}``: an output directory."""
    names: str
    """What the error line must name: the flag, the file (and line)."""
    reads_data: bool = False
    """The error is found while reading the corpus, after ``datasets`` may have drawn progress bars."""


def make_bad_inputs(root: Path) -> None:
    """One small file or directory per kind of bad input."""
    (root / "good.txt").write_text("a document\n", encoding="utf-8")
    (root / "good2.txt").write_text("another document\n", encoding="utf-8")
    (root / "empty_dir").mkdir()
    (root / "notes.csv").write_text("a,b\n")
    (root / "blank").mkdir()
    (root / "blank" / "x.txt").write_text("  \n\n")
    (root / "blank" / "y.txt").write_text("")
    (root / "single").mkdir()
    (root / "single" / "one.txt").write_text("the only document")
    (root / "bad_json.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (root / "no_field.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    (root / "number.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    pq.write_table(pa.table({"text": ["fine", None]}), root / "null_row.parquet")
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    pq.write_table(pa.table({"body": ["x", "y"]}), root / "other_column.parquet")
    (root / "latin1").mkdir()
    (root / "latin1" / "ok.txt").write_text("fine\n")
    (root / "latin1" / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (root / "not_tokenizer.json").write_text("{}")
    (root / "no_eot").mkdir()
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(root / "no_eot" / "tokenizer.json"))
    Tokenizer(models.WordLevel({"[UNK]": 0, EOT_TOKEN: 70_000}, unk_token="[UNK]")).save(str(root / "wide.json"))
    (root / "a_file").write_text("not a directory")


GOOD = ("{bad}/good.txt", "{bad}/good2.txt", "--output", "{out}")
CASES = [
    Case("no sources", (), "error: sources = []"),
    Case("missing path", ("{bad}/missing.txt", "--output", "{out}"), "missing.txt"),
    Case("directory without corpus files", ("{bad}/empty_dir", "--output", "{out}"), "empty_dir"),
    Case("glob without matches", ("{bad}/nothing/*.txt", "--output", "{out}"), "nothing/*.txt"),
    Case("unsupported suffix", ("{bad}/notes.csv", "--output", "{out}"), "notes.csv"),
    Case("unknown built-in (--source)", ("--source", "python-stdlb"), "error: --source = 'python-stdlb'"),
    Case("unknown built-in (positional)", ("python-stdlb", "--output", "{out}"), "python-stdlb"),
    Case("no --output", ("{bad}/good.txt",), "error: --output"),
    Case("--output is a file", (*GOOD[:2], "--output", "{bad}/a_file"), "error: --output"),
    Case("val fraction 0", (*GOOD, "--val-fraction", "0"), "error: --val-fraction = 0.0"),
    Case("val fraction above 0.5", (*GOOD, "--val-fraction", "0.6"), "error: --val-fraction = 0.6"),
    Case("vocab below 257", (*GOOD, "--vocab-size", "256"), "error: --vocab-size = 256"),
    Case("vocab above 2**32", (*GOOD, "--vocab-size", str(2**32 + 1)), "error: --vocab-size"),
    Case("num-proc 0", (*GOOD, "--num-proc", "0"), "error: --num-proc = 0"),
    Case("max-files 0", (*GOOD, "--max-files", "0"), "error: --max-files = 0"),
    Case("negative seed", (*GOOD, "--seed", "-1"), "error: --seed = -1"),
    Case("uint16 with a large vocab", (*GOOD, "--dtype", "uint16", "--vocab-size", "70000"), "error: --dtype"),
    Case("tokenizer missing", (*GOOD, "--tokenizer", "{bad}/nope"), "error: --tokenizer"),
    Case("tokenizer directory without one", (*GOOD, "--tokenizer", "{bad}/empty_dir"), "error: --tokenizer"),
    Case("tokenizer not a tokenizer", (*GOOD, "--tokenizer", "{bad}/not_tokenizer.json"), "error: --tokenizer"),
    Case("tokenizer without eot", (*GOOD, "--tokenizer", "{bad}/no_eot"), EOT_TOKEN),
    Case("uint16 with a wide tokenizer", (*GOOD, "--tokenizer", "{bad}/wide.json", "--dtype", "uint16"),
         "error: --dtype"),
    Case("corrupt parquet", ("{bad}/corrupt.parquet", "--output", "{out}"), "corrupt.parquet"),
    Case("parquet without the text field", ("{bad}/other_column.parquet", "--output", "{out}"), "--text-field"),
    Case("empty corpus", ("{bad}/blank", "--output", "{out}"), "every document is empty", reads_data=True),
    Case("one document", ("{bad}/single", "--output", "{out}"), "1 non-empty document;", reads_data=True),
    Case("jsonl line not JSON", ("{bad}/bad_json.jsonl", "--output", "{out}"), "bad_json.jsonl line 2",
         reads_data=True),
    Case("jsonl line without the field", ("{bad}/no_field.jsonl", "--output", "{out}"), "no_field.jsonl line 2",
         reads_data=True),
    Case("jsonl text not a string", ("{bad}/number.jsonl", "--output", "{out}"), "number.jsonl line 2",
         reads_data=True),
    Case("parquet null text", ("{bad}/null_row.parquet", "--output", "{out}"), "null_row.parquet row 1",
         reads_data=True),
    Case("text file not UTF-8", ("{bad}/latin1", "--output", "{out}"), "latin1.txt", reads_data=True),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    make_bad_inputs(root)
    return root


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_error_line(case: Case, bad_inputs: Path) -> None:
    """Exit status 2 and ``error: <field> = <value>: ...`` naming the flag or file, no traceback, no output files.
    Errors found before the corpus is read are the only thing on stderr."""
    out = bad_inputs / "out" / case.id.replace(" ", "_")
    args = [arg.format(bad=bad_inputs, out=out) for arg in case.args]
    result = run_cli(["prepare-data", *args])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and case.names in lines[-1], lines[-1]
    if not case.reads_data:
        assert len(lines) == 1, result.stderr
    assert not (out / "manifest.json").exists()
