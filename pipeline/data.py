"""``prepare-data``: local text (or the Python standard library) into a tokenizer and packed token files.

A prepared data directory holds four files:

    tokenizer.json  a ``tokenizers`` JSON file: trained here (byte-level BPE) or copied from ``--tokenizer``
    train.bin       the training documents' token ids back to back, each document followed by ``<|endoftext|>``
    val.bin         the same for the validation documents
    manifest.json   what the directory holds (below); written last, so a directory with a manifest is complete

The ``.bin`` files are raw little-endian arrays without a header: ``np.memmap(path, dtype, mode="r")`` reads them.
The dtype is uint16 when every token id fits (vocabulary of at most 65,536 ids), else uint32. ``manifest.json``::

    {"format": 1,
     "sources": [{"path": "corpus/a.txt", "sha256": "...", "bytes": 1234}, ...],
     "tokenizer": {"file": "tokenizer.json", "origin": "trained" | the tokenizer.json it was copied from,
                   "vocab_size": 4096, "eot_token": "<|endoftext|>", "eot_id": 0},
     "dtype": "uint16" | "uint32",
     "seed": 1234, "val_fraction": 0.01,
     "splits": {"train": {"file": "train.bin", "documents": 1772, "tokens": 9876543},
                "val":   {"file": "val.bin", "documents": 18, "tokens": 98765}}}

``vocab_size`` is the largest token id + 1, the number of embedding rows a model needs; ``tokens`` counts every id in
the file, the ``<|endoftext|>`` after each document included.

Documents: one per ``.txt`` file, one per ``.jsonl`` line and one per ``.parquet`` row (the ``--text-field`` value),
one per ``.py`` file of the built-in ``python-stdlib`` and ``python-packages`` sources, and one per file of the built-in
``python-docs`` source (see ``python_docs_files``). Documents that are empty or only whitespace are dropped. They are
packed in the order text, Python sources, documentation, jsonl, parquet, each in file order (directories sorted).
The split is by whole documents: a permutation seeded by ``--seed`` picks ``max(1, round(val_fraction * n))`` of
the ``n`` documents for validation; the rest train, in corpus order. The tokenizer is trained on the training
documents only. A document that contains the text ``<|endoftext|>`` gets that text's ordinary ids, so the end-of-text
id only ever separates documents.

Text must be UTF-8: a file that is not is an error naming the file, the line and the byte offset (convert it, e.g.
with ``iconv -f latin1 -t utf-8``). Bytes are never replaced: U+FFFD in place of every byte of a wrongly encoded
corpus would be trained on without a word (the built-in sources excepted: a few of the standard library's test files are
broken on purpose, see ``read_python_source``). An empty ``.txt`` file is an empty document (dropped); a ``.jsonl`` file
without a JSON line and a ``.parquet`` file without rows are errors (most likely not the file meant).

Loading and tokenizing go through ``datasets`` (local builders only, nothing is downloaded) with its cache in
``<output>/.cache``, removed at the end. The new files are written under temporary names and replace the old ones
only once all three are complete, so a run that fails leaves an existing directory as it was (and removes the
directories it created).

``read_manifest`` and ``load_tokens`` are the training loop's readers: numpy only, no torch, no ``datasets``. They
check the directory against what training reads before anything is built: a manifest that is a JSON object of this
format, ``tokenizer.vocab_size`` an integer >= 1 and ``eot_id`` an id below it, ``dtype`` uint16 or uint32, each split's
``file`` a file in the directory holding exactly ``tokens`` ids (at least one), and every id below ``vocab_size``;
``check_tokenizer`` adds the ``tokenizer.json`` a run exports its model with. Each problem is a ``ConfigError`` on
``data.dir`` that says to run prepare-data again.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tokenize
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Optional, Union

import numpy as np

from curriculum.errors import ConfigError

if TYPE_CHECKING:  # imported lazily: the readers below must stay light for the training loop
    import datasets
    import pyarrow as pa
    import tokenizers

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
SPLIT_FILES = {split: f"{split}.bin" for split in SPLITS}
EOT_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + 1  # byte-level BPE starts from the 256 byte tokens, plus <|endoftext|>
MAX_VOCAB_SIZE = 2**32  # ids 0 .. 2**32 - 1 fit uint32
UINT16_IDS = 2**16  # ids 0 .. 65535 fit uint16
MAX_DEFAULT_PROCS = 8
BUILTIN_SOURCES = ("python-stdlib", "python-packages", "python-docs")
DEFAULT_OUTPUT = {name: Path("data") / name for name in BUILTIN_SOURCES}
SUFFIX_KINDS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
SUPPORTED = ".txt, .jsonl or .parquet"
KIND_ORDER = ("text", "python", "docs", "jsonl", "parquet")  # the order documents are packed in
DOC_SUFFIXES = (".md", ".rst", ".txt")
NOT_DOCS = ("license", "licence", "copying", "notice", "authors", "requirements")  # file names that start so
MIN_DOCSTRING_WORDS = 5
BATCH_DOCUMENTS = 1000
PREPARE_HINT = "run `curriculum-pretrain prepare-data` first"
REPREPARE_HINT = "run `curriculum-pretrain prepare-data` again"
TOKEN_DTYPES = ("uint16", "uint32")
ID_CHECK_CHUNK = 2**24  # ids read at a time by the id check: 32 MiB of uint16

SourceKind = Literal["text", "python", "docs", "jsonl", "parquet"]


# --------------------------------------------------------------------------------------------------- the command


HELP = "tokenize text into packed token files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import finite_float

    parser.add_argument("sources", nargs="*", default=[],
                        help="files (.txt, .jsonl, .parquet), directories or glob patterns; or a built-in "
                             "source: python-stdlib (the running interpreter's standard library sources), "
                             "python-packages (its installed packages' .py files), python-docs (natural language: "
                             "docstrings, package descriptions and documentation files of both)")
    parser.add_argument("--source", action="append", default=[], dest="named_sources", metavar="NAME",
                        help=f"a built-in source ({', '.join(BUILTIN_SOURCES)}); same as giving it as a "
                             "positional source")
    parser.add_argument("--output", default=None,
                        help="output directory (default data/<name> for a built-in source alone, else required)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", default=None,
                           help="a local tokenizer.json file or a directory holding one (default: train one)")
    tokenizer.add_argument("--vocab-size", type=int, default=None,
                           help="vocabulary size of the byte-level BPE trained on the training split (default 8192)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet rows")
    parser.add_argument("--val-fraction", type=finite_float, default=0.01,
                        help="share of whole documents held out for validation (default 0.01, at least one)")
    parser.add_argument("--dtype", choices=["auto", *TOKEN_DTYPES], default="auto",
                        help="token dtype (auto: uint16 when the vocabulary fits)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="processes that tokenize, and that read the built-in sources (default: CPU count, max 8)")
    parser.add_argument("--max-files", type=int, default=None, help="use at most this many source files")


def run(args: argparse.Namespace) -> int:
    """``curriculum-pretrain prepare-data``: check the flags, prepare the directory, print what it holds."""
    for name in args.named_sources:
        if name not in BUILTIN_SOURCES:
            raise ConfigError("--source", name, f"built-in sources: {', '.join(BUILTIN_SOURCES)}")
    sources = list(dict.fromkeys([*args.sources, *args.named_sources]))  # in order, each once
    if not sources:
        raise ConfigError("sources", sources, f"give files ({SUPPORTED}), directories, glob patterns "
                                              f"or a built-in source ({', '.join(BUILTIN_SOURCES)})")
    if args.output is not None:
        output_dir = Path(args.output)
    elif len(sources) == 1 and sources[0] in DEFAULT_OUTPUT:
        output_dir = DEFAULT_OUTPUT[sources[0]]
    else:
        raise ConfigError("--output", None, "required unless the only source is a built-in one")
    manifest = prepare_data(
        sources, output_dir,
        tokenizer=args.tokenizer,
        vocab_size=DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        dtype=args.dtype,
        seed=args.seed,
        num_proc=min(os.cpu_count() or 1, MAX_DEFAULT_PROCS) if args.num_proc is None else args.num_proc,
        max_files=args.max_files,
    )
    print(format_summary(manifest, output_dir))
    return 0


def format_summary(manifest: dict, output_dir: Path) -> str:
    """A few lines: the directory, the tokenizer, documents / tokens / file size per split."""
    tokenizer = manifest["tokenizer"]
    origin = "trained byte-level BPE" if tokenizer["origin"] == "trained" else f"from {tokenizer['origin']}"
    lines = [f"wrote {output_dir} from {len(manifest['sources']):,} source files",
             f"  tokenizer  {origin}, vocab_size {tokenizer['vocab_size']:,}, "
             f"{tokenizer['eot_token']} = {tokenizer['eot_id']}, {manifest['dtype']}"]
    for split, entry in manifest["splits"].items():
        size_mib = (output_dir / entry["file"]).stat().st_size / 2**20
        lines.append(f"  {split:<9}  {entry['documents']:>9,} documents  {entry['tokens']:>13,} tokens  "
                     f"{entry['file']} {size_mib:,.1f} MiB")
    return "\n".join(lines)


def prepare_data(
    sources: list[str],
    output_dir: Path,
    *,
    tokenizer: Optional[str],
    vocab_size: int,
    text_field: str,
    val_fraction: float,
    dtype: str,
    seed: int,
    num_proc: int,
    max_files: Optional[int],
) -> dict:
    """Write ``tokenizer.json``, ``train.bin``, ``val.bin`` and (last) ``manifest.json`` into ``output_dir``.

    ``tokenizer`` is a ``tokenizer.json`` file or a directory holding one; ``None`` trains a byte-level BPE of
    ``vocab_size`` tokens on the training documents. ``dtype`` is ``auto``, ``uint16`` or ``uint32``. Returns the
    manifest. Bad input raises ``ConfigError`` before anything in ``output_dir`` is replaced.
    """
    from pipeline.commands import output_directory

    check_arguments(tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, dtype=dtype, seed=seed,
                    num_proc=num_proc, max_files=max_files)
    output_dir = output_directory("--output", output_dir)
    files = resolve_sources(sources, max_files)
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None
    if loaded is not None:
        eot_id(loaded, tokenizer)  # no <|endoftext|>: fail before the corpus is read
        token_dtype(loaded, dtype, tokenizer)

    source_files = [describe_file(f.path) for f in files]  # hashed before reading: the manifest names what was read
    cache_dir = output_dir / ".cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # left by a crashed run
    created = _make_directory(output_dir)
    try:
        documents = load_documents(files, text_field, cache_dir, num_proc)
        if len(documents) < 2:
            found = "every document is empty or only whitespace" if len(documents) == 0 else "1 non-empty document"
            raise ConfigError("sources", sources, f"{found}; need at least 2 (one to validate on)")
        is_val = choose_validation(len(documents), val_fraction, seed)
        trained = loaded is None
        tok = train_tokenizer(documents, ~is_val, vocab_size) if trained else loaded
        eot = eot_id(tok, tokenizer)
        token_dtype_name = token_dtype(tok, dtype, tokenizer)
        names = (TOKENIZER_FILE, *SPLIT_FILES.values())
        with _replacing(*(output_dir / name for name in names)) as (tokenizer_tmp, *split_tmps):
            tok.save(str(tokenizer_tmp))
            tokenized = tokenize_documents(documents, tok, eot, num_proc, tokenizer)
            splits = write_splits(tokenized, is_val, dict(zip(SPLITS, split_tmps)), token_dtype_name)
            # The old manifest goes before its files are replaced: a crash in between leaves an incomplete
            # directory rather than an old manifest describing new files.
            (output_dir / MANIFEST_FILE).unlink(missing_ok=True)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    manifest = {
        "format": FORMAT_VERSION,
        "sources": source_files,
        "tokenizer": {"file": TOKENIZER_FILE, "origin": "trained" if trained else str(tokenizer_file(tokenizer)),
                      "vocab_size": id_bound(tok), "eot_token": EOT_TOKEN, "eot_id": eot},
        "dtype": token_dtype_name,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": splits,
    }
    with _replacing(output_dir / MANIFEST_FILE) as (tmp,):
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _make_directory(path: Path) -> Optional[Path]:
    """Create ``path`` and its missing parents; return the topmost directory created (``None``: it existed)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, no permission, read-only file system
        raise ConfigError("--output", str(path), f"cannot be created: {err.strerror} ({err.filename})") from None
    return missing[-1] if missing else None


def check_arguments(*, tokenizer: Optional[str], vocab_size: int, val_fraction: float, dtype: str, seed: int,
                    num_proc: int, max_files: Optional[int]) -> None:
    """The checks that need no file: each bad value raises ``ConfigError`` naming its flag."""
    if not 0 < val_fraction <= 0.5:
        raise ConfigError("--val-fraction", val_fraction, "must be in (0, 0.5]")
    if tokenizer is None and not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError("--vocab-size", vocab_size,
                          f"must be in [{MIN_VOCAB_SIZE}, 2**32]: 256 byte tokens + {EOT_TOKEN} at least")
    if dtype not in ("auto", *TOKEN_DTYPES):
        raise ConfigError("--dtype", dtype, "auto, uint16 or uint32")
    if tokenizer is None and dtype == "uint16" and vocab_size > UINT16_IDS:
        raise ConfigError("--dtype", dtype, f"--vocab-size {vocab_size} needs uint32 (uint16 holds {UINT16_IDS:,} ids)")
    if seed < 0:
        raise ConfigError("--seed", seed, "must be >= 0")
    if num_proc < 1:
        raise ConfigError("--num-proc", num_proc, "must be >= 1")
    if max_files is not None and max_files < 1:
        raise ConfigError("--max-files", max_files, "must be >= 1")


# --------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceFile:
    """One input file and how it is read."""

    path: Path
    kind: SourceKind


def resolve_sources(sources: list[str], max_files: Optional[int]) -> list[SourceFile]:
    """Expand built-in names, directories (recursively, sorted) and glob patterns into files; each file once."""
    if not sources:
        raise ConfigError("sources", sources, "give at least one file, directory, glob pattern or built-in source")
    files: dict[tuple[Path, str], SourceFile] = {}  # by resolved path and how it is read, in first-seen order
    for source in sources:
        for found in _expand_source(source):  # python-stdlib and python-docs both read the standard library's files
            files.setdefault((found.path.resolve(), found.kind), found)
    chosen = list(files.values())
    return chosen if max_files is None else chosen[:max_files]


def _expand_source(source: str) -> list[SourceFile]:
    if source in BUILTIN_SOURCES:  # the bare name wins; write ./python-stdlib for a directory of that name
        if source == "python-docs":
            return [SourceFile(path, "docs") for path in python_docs_files()]
        files = python_stdlib_files() if source == "python-stdlib" else python_package_files()
        return [SourceFile(path, "python") for path in files]
    if glob.has_magic(source):
        matches = [Path(match) for match in sorted(glob.glob(source, recursive=True))]
        found = [f for match in matches for f in (_files_under(match) if match.is_dir() else _regular(match))]
        if not found:
            raise ConfigError("sources", source, f"the pattern matches no {SUPPORTED} files")
        return found
    path = Path(source)
    if path.is_dir():
        found = _files_under(path)
        if not found:
            raise ConfigError("sources", source, f"the directory holds no {SUPPORTED} files")
        return found
    if path.is_file():
        if not _supported(path):
            raise ConfigError("sources", source, f"unsupported file type {path.suffix!r}; use {SUPPORTED}")
        return _supported(path)
    if path.is_symlink() or path.exists():
        raise _not_regular(path)
    raise ConfigError("sources", source, f"no such file or directory (built-in sources: {', '.join(BUILTIN_SOURCES)})")


def _supported(path: Path) -> list[SourceFile]:
    kind = SUFFIX_KINDS.get(path.suffix.lower())
    return [SourceFile(path, kind)] if kind is not None else []


def _regular(path: Path) -> list[SourceFile]:
    """``_supported`` for a path that is not a directory; a corpus file that cannot be read as one is an error (a
    FIFO would block the read for ever, a dangling link would drop a document without a word)."""
    if path.is_file() or not _supported(path):
        return _supported(path)
    raise _not_regular(path)


def _not_regular(path: Path) -> ConfigError:
    if path.is_symlink() and not path.exists():
        return ConfigError("sources", str(path), f"is a symbolic link to {os.readlink(path)}, which does not exist")
    return ConfigError("sources", str(path), "is not a regular file (a FIFO, socket or device)")


def _files_under(directory: Path) -> list[SourceFile]:
    return [f for path in sorted(directory.rglob("*")) if not path.is_dir() for f in _regular(path)]


def python_stdlib_files() -> list[Path]:
    """Every ``.py`` file of the running interpreter's standard library, sorted; installed packages are not part."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(path for path in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts))


def site_packages() -> list[Path]:
    """The running interpreter's package directories (site-packages, dist-packages), each once, in sorted order."""
    import site

    found = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted({Path(p).resolve() for p in found if Path(p).is_dir()})


def python_package_files() -> list[Path]:
    """Every ``.py`` file of the running interpreter's installed packages, sorted."""
    return sorted(path for root in site_packages() for path in root.rglob("*.py"))


def python_docs_files() -> list[Path]:
    """The files the ``python-docs`` source reads, sorted: every ``.py`` file of the standard library and the
    installed packages (for its docstrings), each installed package's metadata (``METADATA``/``PKG-INFO``, for its
    long description) and the ``.md``, ``.rst`` and ``.txt`` files inside packages, except license, notice, author
    and requirement lists and the other files of ``*.dist-info``/``*.egg-info`` directories."""
    found = set(python_stdlib_files())
    for root in site_packages():
        for path in root.rglob("*"):
            in_metadata = any(part.endswith((".dist-info", ".egg-info")) for part in path.relative_to(root).parts[:-1])
            if path.suffix == ".py":
                found.add(path)
            elif in_metadata:
                if path.name in ("METADATA", "PKG-INFO"):
                    found.add(path)
            elif path.suffix.lower() in DOC_SUFFIXES and not path.name.lower().startswith(NOT_DOCS):
                found.add(path)
    return sorted(path for path in found if path.is_file())


def documentation_text(path: str) -> str:
    """The natural language of one ``python-docs`` file: a ``.py`` file's docstrings (module, classes and functions,
    in source order, those of at least ``MIN_DOCSTRING_WORDS`` words, each once), a metadata file's body (the long
    description after the header lines), any other file as it is. Undecodable bytes are replaced; a file that does
    not parse gives no docstrings."""
    import ast
    import warnings

    if path.endswith(".py"):
        try:
            with warnings.catch_warnings():  # invalid escape sequences and the like in installed code
                warnings.simplefilter("ignore")
                tree = ast.parse(read_python_source(path))
        except (SyntaxError, ValueError, RecursionError):
            return ""
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                              ast.AsyncFunctionDef)))
        docstrings = (ast.get_docstring(n) for n in sorted(nodes, key=lambda n: getattr(n, "lineno", 0)))
        kept = dict.fromkeys(d for d in docstrings if d and len(d.split()) >= MIN_DOCSTRING_WORDS)
        return "\n\n".join(kept)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if Path(path).name in ("METADATA", "PKG-INFO"):
        _, _, body = text.partition("\n\n")  # RFC 822 headers, a blank line, then the description
        return body
    return text


def read_python_source(path: str) -> str:
    """A ``.py`` file as text, decoded as its coding line says (UTF-8 by default), newlines as ``\\n``."""
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError):  # a few test files are broken on purpose (badsyntax_pep3120.py)
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


def describe_file(path: Path) -> dict:
    """``{"path", "sha256", "bytes"}`` of one source file, for the manifest."""
    try:
        with path.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:  # no permission, an I/O error
        raise ConfigError("sources", str(path), f"cannot be read ({err.strerror})") from None
    return {"path": str(path), "sha256": sha256, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------------------- loading


def load_documents(files: list[SourceFile], text_field: str, cache_dir: Path, num_proc: int = 1) -> datasets.Dataset:
    """One ``text`` column, one row per non-empty document, packed in ``KIND_ORDER`` then file order. ``num_proc``
    processes read the built-in sources' files (in contiguous shards, so the order stays)."""
    for f in files:  # cheap checks first: a parquet file's schema is in its footer, a JSON line is at the top
        if f.kind == "parquet":
            check_parquet_schema(f.path, text_field)
        elif f.kind == "jsonl":
            check_jsonl_has_a_line(f.path)
    _offline()
    import datasets

    loaders = {"text": _load_text, "python": _load_python, "docs": _load_docs, "jsonl": _load_jsonl,
               "parquet": _load_parquet}
    parts = []
    for kind in KIND_ORDER:
        paths = [f.path for f in files if f.kind == kind]
        if paths:
            parts.append(loaders[kind](paths, text_field, str(cache_dir), num_proc))
    return _drop_blank(datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0])


def _offline() -> None:
    """Nothing here needs the Hub: say so before ``datasets`` reads its configuration."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load_text(paths: list[Path], text_field: str, cache_dir: str, num_proc: int) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset("text", data_files=[str(p) for p in paths], sample_by="document",
                                     split="train", cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError:
        for path in paths:  # find the file to name; only on this error path is every file read a second time
            for _ in utf8_lines(path):
                pass
        raise


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file, read in binary a line at a time; the first byte that is not UTF-8
    raises ``ConfigError`` naming the file, the byte offset (from 0) and the line (from 1). Nothing is replaced:
    see the module docstring."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):  # b"\n" never occurs inside a multi-byte UTF-8 sequence
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(str(path), f"byte {offset + err.start}",
                                  f"line {number} is not UTF-8 text ({err.reason}); convert the file to UTF-8, "
                                  "e.g. with iconv") from None
            offset += len(raw)


def _load_python(paths: list[Path], text_field: str, cache_dir: str, num_proc: int) -> datasets.Dataset:
    return _generated(_python_documents, paths, cache_dir, num_proc)


def _generated(generator: Callable[[list[str]], Iterator[dict[str, str]]], paths: list[Path], cache_dir: str,
               num_proc: int) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_generator(
        generator, gen_kwargs={"paths": [str(p) for p in paths]}, num_proc=min(num_proc, len(paths)),
        features=datasets.Features({"text": datasets.Value("string")}), cache_dir=cache_dir)


def _python_documents(paths: list[str]) -> Iterator[dict[str, str]]:
    for path in paths:
        yield {"text": read_python_source(path)}


def _load_docs(paths: list[Path], text_field: str, cache_dir: str, num_proc: int) -> datasets.Dataset:
    return _generated(_docs_documents, paths, cache_dir, num_proc)


def _docs_documents(paths: list[str]) -> Iterator[dict[str, str]]:
    for path in paths:
        yield {"text": documentation_text(path)}


def _load_jsonl(paths: list[Path], text_field: str, cache_dir: str, num_proc: int) -> datasets.Dataset:
    return _load_rows("json", paths, text_field, cache_dir, _find_bad_jsonl_line, "line of the .jsonl files")


def _load_parquet(paths: list[Path], text_field: str, cache_dir: str, num_proc: int) -> datasets.Dataset:
    return _load_rows("parquet", paths, text_field, cache_dir, _find_bad_parquet_row, "row of the .parquet files",
                      columns=[text_field])


def _load_rows(builder: str, paths: list[Path], text_field: str, cache_dir: str,
               find_bad: Callable[[list[Path], str], None], unit: str, **kwargs: Any) -> datasets.Dataset:
    """Load with a ``datasets`` builder; on failure, ``find_bad`` raises a ``ConfigError`` naming the bad line/row."""
    import datasets

    try:
        rows = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir,
                                     **kwargs)
    except datasets.exceptions.DatasetGenerationError:
        find_bad(paths, text_field)
        raise
    # the json reader lets bytes that are not UTF-8 into string columns: validated here, under 0.1 s per GB
    if not (_is_text_column(rows, text_field) and _is_utf8(rows.data.column(text_field))):
        find_bad(paths, text_field)
        raise ConfigError("--text-field", text_field, f"is not a UTF-8 string in every {unit}")
    return _only_text(rows, text_field)


def check_jsonl_has_a_line(path: Path) -> None:
    """The file has a line that is not blank (read up to the first one)."""
    with path.open("rb") as f:
        if any(line.strip() for line in f):
            return
    raise ConfigError(str(path), f"{path.stat().st_size} bytes",
                      "holds no JSON lines (empty or blank); leave it out of the sources")


def _find_bad_jsonl_line(paths: list[Path], text_field: str) -> None:
    """Raise ``ConfigError`` naming the first line that is not UTF-8 or not a JSON object with a string
    ``text_field``."""
    for path in paths:
        for number, line in utf8_lines(path):
            if not line.strip():
                continue  # blank lines are skipped, as the json loader does
            where, excerpt = f"{path} line {number}", line.strip()[:80]
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(where, excerpt, f"is not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(where, excerpt, "is not a JSON object")
            if not isinstance(row.get(text_field), str):
                raise ConfigError(where, excerpt, f"has no string field {text_field!r} (see --text-field)")


def check_parquet_schema(path: Path, text_field: str) -> None:
    """The file has a footer pyarrow can read, at least one row and a string column ``text_field``."""
    import pyarrow.parquet as pq

    try:
        footer = pq.ParquetFile(path)
        schema, num_rows = footer.schema_arrow, footer.metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise ConfigError(str(path), f"{path.stat().st_size} bytes", f"is not a readable parquet file: {err}") from None
    if num_rows == 0:
        raise ConfigError(str(path), "0 rows", "holds no rows; leave it out of the sources")
    if text_field not in schema.names:
        raise ConfigError("--text-field", text_field, f"{path} has no such column (columns: {schema.names})")
    if not _is_string_type(schema.field(text_field).type):
        raise ConfigError("--text-field", text_field, f"{path}: the column is {schema.field(text_field).type}, "
                                                      "not a string")


def _find_bad_parquet_row(paths: list[Path], text_field: str) -> None:
    """Raise ``ConfigError`` naming the first file whose data cannot be read or whose ``text_field`` is null."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in paths:
        try:
            column = pq.read_table(path, columns=[text_field]).column(text_field)
        except Exception as err:  # a damaged data page
            size = f"{path.stat().st_size} bytes"
            raise ConfigError(str(path), size, f"is not a readable parquet file: {err}") from None
        if column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            raise ConfigError(f"{path} row {row}", None, f"the {text_field!r} column is null here (rows count from 0)")
        if not _is_utf8(column):
            raise ConfigError(str(path), f"column {text_field!r}", "holds strings that are not UTF-8")


def _is_utf8(column: pa.ChunkedArray) -> bool:
    import pyarrow as pa

    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _is_string_type(arrow_type: object) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _is_text_column(rows: datasets.Dataset, text_field: str) -> bool:
    """The column exists, holds strings and no nulls (a row without the field reads as null). Mixed types in
    .jsonl come back as a ``Json`` feature stored as strings, so the feature is checked, not the arrow type."""
    import datasets

    feature = rows.features.get(text_field)
    return (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
            and rows.data.column(text_field).null_count == 0)


def _only_text(rows: datasets.Dataset, text_field: str) -> datasets.Dataset:
    rows = rows.select_columns([text_field])
    return rows if text_field == "text" else rows.rename_column(text_field, "text")


def _drop_blank(documents: datasets.Dataset) -> datasets.Dataset:
    """Drop the documents that are empty or only whitespace."""
    import pyarrow.compute as pc

    non_blank = [pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk)), 0).to_numpy(zero_copy_only=False)
                 for chunk in documents.data.column("text").chunks]
    keep = np.concatenate(non_blank) if non_blank else np.zeros(0, dtype=bool)
    return documents if keep.all() else documents.select(np.flatnonzero(keep))


def choose_validation(n_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over the documents: True for the ``max(1, round(val_fraction * n))`` that go to validation.

    They are the first of a permutation seeded by ``seed``. ``round`` is Python's (halves to even): 100 documents
    at 0.01 give 1, 1790 give 18 (17.9), 10 at 0.25 give 2 (2.5).
    """
    n_val = max(1, round(val_fraction * n_documents))
    is_val = np.zeros(n_documents, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_documents)[:n_val]] = True
    return is_val


# --------------------------------------------------------------------------------------------------- tokenizer


def tokenizer_file(tokenizer: str) -> Path:
    """``--tokenizer`` as a file: the path itself, or ``tokenizer.json`` inside a directory."""
    path = Path(tokenizer)
    return path / TOKENIZER_FILE if path.is_dir() else path


def load_tokenizer(tokenizer: str) -> tokenizers.Tokenizer:
    """A local ``tokenizer.json`` (or a directory holding one); never a Hub name."""
    from tokenizers import Tokenizer

    path = tokenizer_file(tokenizer)
    if not path.is_file():
        missing = f"no {TOKENIZER_FILE} in this directory" if Path(tokenizer).is_dir() else "no such file"
        raise ConfigError("--tokenizer", tokenizer, f"{missing}; give a {TOKENIZER_FILE} or a directory holding one")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ConfigError("--tokenizer", tokenizer, f"not a tokenizers JSON file: {err}") from None


def train_tokenizer(documents: datasets.Dataset, is_train: np.ndarray, vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (fewer if the corpus runs out of merges); ``<|endoftext|>`` is 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(documents, is_train), trainer=trainer, length=int(is_train.sum()))
    return tok


def _texts(documents: datasets.Dataset, keep: np.ndarray) -> Iterator[list[str]]:
    """The documents where ``keep`` is True, in batches."""
    start = 0
    for batch in documents.with_format("arrow").iter(batch_size=BATCH_DOCUMENTS):
        texts = batch.column("text").to_pylist()
        yield [text for text, kept in zip(texts, keep[start:start + len(texts)]) if kept]
        start += len(texts)


def eot_id(tok: tokenizers.Tokenizer, tokenizer: Optional[str]) -> int:
    """The id of ``<|endoftext|>``; a loaded tokenizer without it is an error."""
    eot = tok.token_to_id(EOT_TOKEN)
    if eot is None:
        raise ConfigError("--tokenizer", tokenizer, f"has no {EOT_TOKEN} token, which separates the documents")
    return eot


def id_bound(tok: tokenizers.Tokenizer) -> int:
    """Largest token id + 1: the embedding rows a model needs (the vocabulary size when ids have no gaps)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_dtype(tok: tokenizers.Tokenizer, dtype: str, tokenizer: Optional[str]) -> str:
    """``uint16`` when every id fits (``auto``) or when asked and possible, else ``uint32``."""
    fits_uint16 = id_bound(tok) <= UINT16_IDS
    if dtype == "uint16" and not fits_uint16:
        raise ConfigError("--dtype", dtype, f"the tokenizer {tokenizer or ''} has ids up to {id_bound(tok) - 1:,}; "
                                            f"uint16 holds {UINT16_IDS:,} ids: use uint32 or auto")
    if dtype == "auto":
        return "uint16" if fits_uint16 else "uint32"
    return dtype


# --------------------------------------------------------------------------------------------------- tokenizing


def tokenize_documents(documents: datasets.Dataset, tok: tokenizers.Tokenizer, eot: int, num_proc: int,
                       tokenizer: Optional[str]) -> datasets.Dataset:
    """One ``ids`` row per document: its token ids followed by ``eot``. ``tokenizer`` (``--tokenizer``) is named
    when a loaded tokenizer cannot encode a document (a word-level vocabulary without an unknown token)."""
    import datasets

    num_proc = min(num_proc, len(documents))  # more processes than documents would idle
    if num_proc > 1:
        # Each process encodes its shard on one thread: tokenizers' own thread pool would oversubscribe the CPUs
        # and, once used before the fork (training), warns in every process that it turns itself off.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return documents.map(
        _encode_batch, batched=True, num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tok": tok, "eot": eot, "tokenizer": tokenizer}, remove_columns=["text"],
        features=datasets.Features({"ids": datasets.Sequence(datasets.Value("uint32"))}),
        desc="tokenizing", load_from_cache_file=False,
        new_fingerprint="tokenized",  # the cache is private to this run: no need to hash the tokenizer
    )


def _encode_batch(batch: dict[str, list[str]], tok: tokenizers.Tokenizer, eot: int,
                  tokenizer: Optional[str]) -> dict[str, list[list[int]]]:
    # Special-token text inside a document is encoded as plain text, so eot ids only mark document ends. The flag
    # is set here because pickling the tokenizer into a worker process does not carry it.
    tok.encode_special_tokens = True
    try:
        encodings = tok.encode_batch(batch["text"], add_special_tokens=False)  # no BOS/EOS from a post-processor
    except Exception as err:  # tokenizers raises a bare Exception; a ConfigError crosses back from a worker whole
        raise ConfigError("--tokenizer", tokenizer, f"cannot encode every document: {err}") from None
    return {"ids": [encoding.ids + [eot] for encoding in encodings]}


def write_splits(tokenized: datasets.Dataset, is_val: np.ndarray, paths: dict[str, Path], dtype: str) -> dict:
    """Pack every document's ids into ``paths["train"]`` or ``paths["val"]`` (staged ``train.bin`` and ``val.bin``);
    return the manifest's ``splits``."""
    import pyarrow.compute as pc

    token_type = np.dtype(dtype).newbyteorder("<")
    tokens = {"train": 0, "val": 0}
    with open(paths["train"], "wb") as train_file, open(paths["val"], "wb") as val_file:
        start = 0
        for batch in tokenized.with_format("arrow").iter(batch_size=BATCH_DOCUMENTS):
            ids = batch.column("ids")
            lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(token_type, copy=False)
            token_is_val = np.repeat(is_val[start:start + len(lengths)], lengths)
            flat[~token_is_val].tofile(train_file)
            flat[token_is_val].tofile(val_file)
            tokens["val"] += int(token_is_val.sum())
            tokens["train"] += len(flat) - int(token_is_val.sum())
            start += len(lengths)
    n_val = int(is_val.sum())
    documents = {"train": len(is_val) - n_val, "val": n_val}
    return {split: {"file": SPLIT_FILES[split], "documents": documents[split], "tokens": tokens[split]}
            for split in SPLITS}


@contextmanager
def _replacing(*paths: Path) -> Iterator[tuple[Path, ...]]:
    """Temporary siblings of ``paths`` to write to; they replace ``paths`` only when the block completes, so a
    failure inside it leaves every old file as it was."""
    tmps = tuple(path.with_name(f".{path.name}.tmp") for path in paths)
    try:
        yield tmps
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- readers


def read_manifest(data_dir: Union[str, Path]) -> dict:
    """The manifest of a prepared data directory, with what every reader takes from it checked: a JSON object of
    this format whose ``tokenizer.vocab_size`` is an integer >= 1 and ``tokenizer.eot_id`` an id below it.
    ``ConfigError`` on ``data.dir`` otherwise, or when there is no manifest."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        reason = "does not exist" if not Path(data_dir).is_dir() else f"has no {MANIFEST_FILE} (incomplete?)"
        raise ConfigError("data.dir", str(data_dir), f"{reason}; {PREPARE_HINT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _prepare_again(data_dir, f"{MANIFEST_FILE} is not readable JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise _prepare_again(data_dir, f"{MANIFEST_FILE} is {json.dumps(manifest)[:60]}, not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise _prepare_again(data_dir, f"{MANIFEST_FILE} is not format {FORMAT_VERSION}")
    vocab_size = _manifest_value(manifest, "tokenizer.vocab_size", data_dir, "an integer >= 1",
                                 lambda v: _is_int(v) and v >= 1)
    _manifest_value(manifest, "tokenizer.eot_id", data_dir, f"an integer in [0, {vocab_size}) (below vocab_size)",
                    lambda v: _is_int(v) and 0 <= v < vocab_size)
    return manifest


def _manifest_value(manifest: dict, key: str, data_dir: Union[str, Path], expected: str,
                    valid: Callable[[Any], bool]) -> Any:
    """``manifest[a][b]`` for ``key = "a.b"``; ``ConfigError`` on ``data.dir`` naming the key when it is missing or
    not ``valid`` (described by ``expected``)."""
    parts = key.split(".")
    value: Any = manifest
    for depth, part in enumerate(parts):
        if not isinstance(value, dict):
            raise _prepare_again(data_dir, f"{MANIFEST_FILE} has {'.'.join(parts[:depth])} = "
                                           f"{json.dumps(value)[:60]}, expected an object")
        if part not in value:
            raise _prepare_again(data_dir, f"{MANIFEST_FILE} has no {'.'.join(parts[:depth + 1])}")
        value = value[part]
    if not valid(value):
        raise _prepare_again(data_dir, f"{MANIFEST_FILE} has {key} = {json.dumps(value)[:60]}, expected {expected}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def load_tokens(data_dir: Union[str, Path], split: Literal["train", "val"]) -> np.memmap:
    """The split's token ids as a read-only 1-D memmap (dtype from the manifest), checked against the manifest.

    ``ConfigError`` on ``data.dir`` unless ``dtype`` is uint16 or uint32, the split's ``file`` names a file in the
    directory of exactly ``tokens`` (at least 1) ids of that dtype, and every id is below ``tokenizer.vocab_size``
    (a larger id would be an index error at the first forward pass). The id check reads the file once,
    ``ID_CHECK_CHUNK`` ids at a time, nothing kept in memory: about 0.04 s per GB from the page cache on one core,
    else the time the disk takes to read it; none when every id of the dtype is below ``vocab_size``.
    """
    if split not in SPLITS:
        raise ConfigError("split", split, "train or val")
    manifest = read_manifest(data_dir)
    dtype = _manifest_value(manifest, "dtype", data_dir, " or ".join(TOKEN_DTYPES), lambda v: v in TOKEN_DTYPES)
    name = _manifest_value(manifest, f"splits.{split}.file", data_dir, "the name of a file in the directory",
                           lambda v: isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v)
    count = _manifest_value(manifest, f"splits.{split}.tokens", data_dir, f"an integer >= 1 ({name} must not be empty)",
                            lambda v: _is_int(v) and v >= 1)
    path = Path(data_dir) / name
    token_type = np.dtype(dtype).newbyteorder("<")
    expected_bytes = count * token_type.itemsize
    if not path.is_file() or path.stat().st_size != expected_bytes:
        found = (f"{path.stat().st_size:,} bytes" if path.is_file() else
                 "not a regular file" if path.exists() else "no such file")
        raise _prepare_again(data_dir, f"{name} is missing or not the {expected_bytes:,} bytes the manifest says "
                                       f"({count:,} {dtype} ids): {found}")
    try:
        tokens = np.memmap(path, dtype=token_type, mode="r")
    except OSError as err:
        raise _prepare_again(data_dir, f"{name} cannot be read: {err.strerror}") from None
    _check_ids(tokens, manifest["tokenizer"]["vocab_size"], data_dir, name)
    return tokens


def _check_ids(tokens: np.ndarray, vocab_size: int, data_dir: Union[str, Path], name: str) -> None:
    """Every id in ``tokens`` is below ``vocab_size``: the largest of each ``ID_CHECK_CHUNK`` ids, vectorised."""
    if vocab_size > np.iinfo(tokens.dtype).max:
        return  # every id the dtype can hold is below it
    for start in range(0, len(tokens), ID_CHECK_CHUNK):
        chunk = tokens[start:start + ID_CHECK_CHUNK]
        if chunk.max() >= vocab_size:
            index = start + int(np.argmax(chunk >= vocab_size))
            raise _prepare_again(data_dir, f"{name} holds token id {int(tokens[index]):,} at index {index:,}, "
                                           f"not below tokenizer.vocab_size {vocab_size:,}")


def check_tokenizer(data_dir: Union[str, Path], manifest: dict) -> None:
    """The directory's ``tokenizer.json``, which an exported model is saved with, loads and agrees with the
    manifest: its ``eot_token`` has ``eot_id`` and its largest id + 1 is ``vocab_size``. Checked when a run opens
    the directory, not when it ends."""
    from tokenizers import Tokenizer

    eot_token = _manifest_value(manifest, "tokenizer.eot_token", data_dir, "a token",
                                lambda v: isinstance(v, str) and v != "")
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise _prepare_again(data_dir, f"has no {TOKENIZER_FILE}, which the exported model needs "
                                       "(or set run.export=false)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise _prepare_again(data_dir, f"{TOKENIZER_FILE} is not a tokenizers JSON file ({err})") from None
    eot, vocab_size = manifest["tokenizer"]["eot_id"], manifest["tokenizer"]["vocab_size"]
    if tok.token_to_id(eot_token) != eot:
        raise _prepare_again(data_dir, f"{TOKENIZER_FILE} gives {eot_token} the id {tok.token_to_id(eot_token)}, "
                                       f"{MANIFEST_FILE} says tokenizer.eot_id {eot}")
    if id_bound(tok) != vocab_size:
        raise _prepare_again(data_dir, f"{TOKENIZER_FILE} has ids up to {id_bound(tok) - 1:,}, {MANIFEST_FILE} says "
                                       f"tokenizer.vocab_size {vocab_size:,}")


def _prepare_again(data_dir: Union[str, Path], problem: str) -> ConfigError:
    """``data.dir`` holds something other than what prepare-data wrote."""
    return ConfigError("data.dir", str(data_dir), f"{problem}; {REPREPARE_HINT}")
