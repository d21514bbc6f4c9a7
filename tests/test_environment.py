"""Process environment fixes, on plain dicts standing in for ``os.environ`` (the real one is never touched)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import pytest

from pipeline.environment import (bytecode_note, prepare_environment, sanitize_cuda_arch_list,
                                  single_process_defaults, uncached_modules)

RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------------- arch list


@pytest.mark.parametrize(("value", "cleaned"), [
    ("9.0a", "9.0"),
    ("8.0;9.0a", "8.0 9.0"),
    ("9.0a 10.0a", "9.0 10.0"),
    ("9.0a;9.0", "9.0"),  # the suffix gone, the two entries are one
])
def test_arch_suffixes_are_stripped(value: str, cleaned: str) -> None:
    environ = {"TORCH_CUDA_ARCH_LIST": value}
    note = sanitize_cuda_arch_list(environ)
    assert environ == {"TORCH_CUDA_ARCH_LIST": cleaned}
    assert note is not None and repr(value) in note and repr(cleaned) in note


@pytest.mark.parametrize("value", ["8.6+PTX", "9.0", "8.0 8.6 9.0+PTX"])
def test_parseable_lists_are_left_alone(value: str) -> None:
    environ = {"TORCH_CUDA_ARCH_LIST": value}
    assert sanitize_cuda_arch_list(environ) is None
    assert environ == {"TORCH_CUDA_ARCH_LIST": value}


@pytest.mark.parametrize("environ", [{}, {"TORCH_CUDA_ARCH_LIST": ""}])
def test_unset_stays_unset(environ: dict[str, str]) -> None:
    before = dict(environ)
    assert sanitize_cuda_arch_list(environ) is None
    assert environ == before


# --------------------------------------------------------------------------------------------------- rendezvous


def test_single_process_defaults_fill_a_bare_environment() -> None:
    environ = {"PATH": "/usr/bin"}
    single_process_defaults(environ)
    assert {key: environ[key] for key in RENDEZVOUS if key != "MASTER_PORT"} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(environ["MASTER_PORT"]) < 65536
    assert environ["PATH"] == "/usr/bin"


def test_free_ports_come_from_below_the_range_outgoing_connections_take(tmp_path, monkeypatch) -> None:
    """With that range at 40000-60999 every port lies in 20000-39999 and can be bound; where the range starts low,
    is out of bounds or unreadable, or its file is missing (not Linux), the OS picks one."""
    import socket

    from pipeline import environment

    system = Path(environment.EPHEMERAL_PORTS)  # the machine's own range, read below
    ports = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(environment, "EPHEMERAL_PORTS", str(ports))
    ports.write_text("40000\t60999\n")
    for _ in range(20):
        port = environment.free_port()
        assert 20000 <= port < 40000
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    # the OS's own pick comes from the machine's range (where there is one to read)
    low, high = map(int, system.read_text().split()) if system.exists() else (1, 65535)
    for content in ("1024\t65535\n", "70000\t80000\n", "not ports\n"):
        ports.write_text(content)
        assert low <= environment.free_port() <= high
    ports.unlink()
    assert low <= environment.free_port() <= high


def test_single_process_defaults_leave_a_launcher_alone() -> None:
    """torchrun / the DeepSpeed launcher set RANK and WORLD_SIZE (and the rest): nothing is added or changed."""
    launcher = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    environ = dict(launcher)
    single_process_defaults(environ)
    assert environ == launcher
    minimal = {"RANK": "2", "WORLD_SIZE": "4"}  # a launcher that sets only these is still a launcher
    environ = dict(minimal)
    single_process_defaults(environ)
    assert environ == minimal


def test_single_process_defaults_keep_values_already_set() -> None:
    """Only RANK set (no WORLD_SIZE): the missing variables are filled, the given one is kept."""
    environ = {"RANK": "0", "MASTER_PORT": "12345"}
    single_process_defaults(environ)
    assert environ["MASTER_PORT"] == "12345" and environ["WORLD_SIZE"] == "1"
    assert set(RENDEZVOUS) <= set(environ)


# --------------------------------------------------------------------------------------------------- everything


@pytest.mark.parametrize(("cuda_available", "accelerator"), [(False, "cpu"), (True, None)])
def test_prepare_environment_picks_cpu_only_without_cuda(cuda_available: bool, accelerator: Optional[str]) -> None:
    environ: dict[str, str] = {}
    assert prepare_environment(environ, cuda_available) == []
    assert environ.get("DS_ACCELERATOR") == accelerator
    assert set(RENDEZVOUS) <= set(environ)


def test_prepare_environment_keeps_a_chosen_accelerator() -> None:
    environ = {"DS_ACCELERATOR": "cuda", "RANK": "0", "WORLD_SIZE": "1"}
    prepare_environment(environ, cuda_available=False)
    assert environ["DS_ACCELERATOR"] == "cuda"


def test_prepare_environment_reports_the_arch_fix() -> None:
    environ = {"TORCH_CUDA_ARCH_LIST": "9.0a", "RANK": "0", "WORLD_SIZE": "1"}
    notes = prepare_environment(environ, cuda_available=True)
    assert environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert len(notes) == 1 and "TORCH_CUDA_ARCH_LIST" in notes[0]
    assert "DS_ACCELERATOR" not in environ


# --------------------------------------------------------------------------------------------------- bytecode cache


def test_modules_imported_without_a_bytecode_cache_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """A module imported while Python writes no bytecode (PYTHONDONTWRITEBYTECODE) counts as uncached and reaches the
    note; one imported with its bytecode written does not."""
    names = ("uncached_probe_module", "cached_probe_module")
    for name in names:
        (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = uncached_modules()
    try:
        monkeypatch.setattr(sys, "dont_write_bytecode", True)
        importlib.import_module("uncached_probe_module")
        assert uncached_modules() == before + 1
        monkeypatch.setattr(sys, "dont_write_bytecode", False)
        importlib.import_module("cached_probe_module")
        assert uncached_modules() == before + 1
        note = bytecode_note(minimum=before + 1)
        assert note is not None and f"{before + 1} imported modules" in note and "PYTHONDONTWRITEBYTECODE" in note
        assert bytecode_note(minimum=before + 2) is None
    finally:
        for name in names:
            sys.modules.pop(name, None)
