"""Process environment fixes applied before DeepSpeed is imported, and a check of the bytecode cache behind start-up."""

from __future__ import annotations

import os
import random
import re
import socket
import sys
from typing import MutableMapping, Optional


# what a launcher (deepspeed, torchrun) sets for each worker; a process that starts runs of its own drops them
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"


def free_port() -> int:
    """A TCP port that was free on every address a moment ago, for a rendezvous that binds it seconds later. Taken
    at random below the range the OS hands out to outgoing connections (Linux's ``ip_local_port_range``,
    32768-60999 by default): a port from that range can be taken in between by any connection on the machine,
    gloo's among them (two test runs side by side collided so: ``EADDRINUSE``). Where that range is unknown, starts
    low or is not a port range, the OS picks one (binding port 0)."""
    try:
        with open(EPHEMERAL_PORTS) as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 0
    candidates = random.SystemRandom().sample(range(first_ephemeral // 2, first_ephemeral), 32) \
        if 4096 <= first_ephemeral <= 65536 else []
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port")


def single_process_defaults(environ: MutableMapping[str, str]) -> None:
    """``curriculum-pretrain train`` without a launcher: DeepSpeed needs the rendezvous variables a launcher would
    set (without them it tries mpi4py), so fill them in for one local process on a free port."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        environ.setdefault(key, value)


def sanitize_cuda_arch_list(environ: MutableMapping[str, str]) -> str | None:
    """DeepSpeed's op builder parses ``TORCH_CUDA_ARCH_LIST`` entries as ``major.minor`` integers and crashes on
    arch-specific suffixes such as ``9.0a`` (``invalid literal for int() with base 10: '0a'``). Strip the
    suffixes; return a note for the log when something changed."""
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    cleaned = " ".join(dict.fromkeys(re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", part)
                                     for part in re.split(r"[;\s]+", value.strip()) if part))
    if cleaned == value:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = cleaned
    return f"TORCH_CUDA_ARCH_LIST {value!r} -> {cleaned!r} (DeepSpeed's op builder cannot parse arch suffixes)"


def choose_accelerator(environ: MutableMapping[str, str], cuda_available: bool) -> None:
    """DeepSpeed's CPU accelerator where there is no GPU, said up front (else DeepSpeed warns when it guesses: at
    its first import, which ``transformers`` also makes)."""
    if not cuda_available:
        environ.setdefault("DS_ACCELERATOR", "cpu")


def prepare_environment(environ: MutableMapping[str, str], cuda_available: bool) -> list[str]:
    """Everything above, plus the accelerator choice; returns notes for the log."""
    notes = []
    single_process_defaults(environ)
    choose_accelerator(environ, cuda_available)
    note = sanitize_cuda_arch_list(environ)
    if note:
        notes.append(note)
    return notes


def uncached_modules() -> int:
    """Imported modules with no bytecode cached on disk: Python compiled each from source in this process and will
    again in the next (``PYTHONDONTWRITEBYTECODE`` set, as many container images do, or packages installed without
    ``.pyc`` in a read-only place)."""
    count = 0
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", {})  # not getattr(module, ...): lazy modules' __getattr__ hooks stay out
        source, cached = names.get("__file__"), names.get("__cached__")
        if isinstance(source, str) and isinstance(cached, str) and not os.path.exists(cached):
            count += os.path.isfile(source)  # a source file on disk, not one inside a zip archive
    return count


def bytecode_note(minimum: int = 100) -> Optional[str]:
    """A note for the log when at least ``minimum`` modules are uncached: on the H200 machine that was about 3,000
    modules and 10 s of every process's start-up."""
    uncached = uncached_modules()
    if uncached < minimum:
        return None
    return (f"start-up: {uncached} imported modules have no cached bytecode, so every process compiles them from "
            "source; unset PYTHONDONTWRITEBYTECODE (and, where the packages' directories are read-only, set "
            "PYTHONPYCACHEPREFIX to a writable directory)")
