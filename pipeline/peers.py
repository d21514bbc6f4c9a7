"""Ranks that notice a dead peer: a heartbeat per rank in the rendezvous store, and one error line instead of a hang.

A rank that dies mid-run (``kill -9``, the OOM killer, a lost node) leaves the others waiting in a collective. Gloo
notices a closed socket at once; NCCL, and gloo when a node vanishes without closing its sockets, wait for the
process-group timeout, which cannot be short: it must outlast every legitimate gap between two collectives
(``run.collective_timeout_s``, default 600 s). So with several ranks each one also runs a watch thread that, every
``HEARTBEAT_INTERVAL_S``, adds 1 to a counter of its own in the rendezvous store (the TCPStore at
``MASTER_ADDR:MASTER_PORT`` that every launcher starts) and reads others':

- rank 0 reads every rank's counter: one that has not moved for ``run.heartbeat_timeout_s`` (default 30 s) is a
  dead rank, which rank 0 announces in the store before it stops; every other rank reads rank 0's counter and that
  announcement (N ranks each reading N counters every second would be N^2 reads on one store);
- a collective that fails in the main thread (gloo: a peer's socket closed) is explained at once: the counters that
  stay still for ``SILENCE_S`` name the dead ranks; when none does, a rank is stuck rather than dead;
- the store gone means its holder is: rank 0 under the DeepSpeed launcher, node 0's torchrun agent under torchrun.

The thread gets its turn also while the main thread compiles, evaluates or saves a checkpoint (Python switches
threads every few milliseconds, and I/O and collectives release the interpreter lock), so a long gap never looks
like a death. Every surviving rank prints one line and exits with status ``PEER_LOST``, e.g.

    error: rank 1 stopped responding at step 37 (no heartbeat for 30 s); the last checkpoint is step00000032;
    resume with --resume auto

and the launcher (DeepSpeed's, torchrun, ``srun --kill-on-bad-exit``) ends the job with a non-zero status.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

import torch.distributed as dist

from curriculum.config import RunConfig

HEARTBEAT_INTERVAL_S = 1.0
"""Each rank's counter moves once a second; ``run.heartbeat_timeout_s`` (at least 3 s) is several missed beats."""
SILENCE_S = 3.0
"""After a collective failed: how long a counter must stay still to name its rank (three missed beats)."""
PEER_LOST = 3
"""Exit status of a rank that stopped because another one did (2 is bad input, 1 a run the guard halted)."""

_LOST = "lost"  # rank 0's announcement: {"who": ..., "cause": ...}
_watch: Optional["PeerWatch"] = None  # this process's watch while it runs, like torch.distributed's default group


class PeerWatch:
    """One rank's heartbeat and its view of the others, on a store (``torch.distributed.Store``)."""

    def __init__(self, store: Any, rank: int, world_size: int, heartbeat_timeout_s: float,
                 collective_timeout_s: float, store_holder: str = "rank 0",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.heartbeat_timeout_s, self.collective_timeout_s = heartbeat_timeout_s, collective_timeout_s
        self.store_holder = store_holder
        self.clock = clock
        self.watched = list(range(1, world_size)) if rank == 0 else [0]
        self._counters: dict[int, Optional[bytes]] = dict.fromkeys(self.watched)
        self._moved_at = dict.fromkeys(self.watched, clock())
        self._step: Callable[[], Optional[int]] = lambda: None
        self._latest_checkpoint: Callable[[], Optional[Path]] = lambda: None
        self._stopped = threading.Event()
        self._failing = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    def follow(self, step: Callable[[], int], latest_checkpoint: Callable[[], Optional[Path]]) -> None:
        """What the error line names: the step this rank is at, and the checkpoint to resume from."""
        self._step, self._latest_checkpoint = step, latest_checkpoint

    def beat(self) -> None:
        self.store.add(_beat_key(self.rank), 1)

    def check(self) -> Optional[tuple[str, str]]:
        """One look at the watched counters (and, off rank 0, rank 0's announcement): who is dead and why, or None.
        Rank 0 announces what it finds."""
        if self.rank != 0 and self.store.check([_LOST]):
            announced = json.loads(self.store.get(_LOST))
            return announced["who"], announced["cause"]
        now = self.clock()
        for rank, counter in zip(self.watched, self.store.multi_get([_beat_key(r) for r in self.watched])):
            if counter != self._counters[rank]:
                self._counters[rank], self._moved_at[rank] = counter, now
        silent = [rank for rank in self.watched if now - self._moved_at[rank] >= self.heartbeat_timeout_s]
        if not silent:
            return None
        verdict = _ranks(silent), f"no heartbeat for {self.heartbeat_timeout_s:g} s"
        if self.rank == 0:
            self.store.set(_LOST, json.dumps({"who": verdict[0], "cause": verdict[1]}))
        return verdict

    def explain(self, err: BaseException) -> NoReturn:
        """After a collective failed in the main thread: name the ranks whose counters stay still for ``SILENCE_S``,
        or say that every rank still beats (one is stuck, not dead)."""
        cause = collective_cause(err, self.collective_timeout_s)
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        keys = [_beat_key(rank) for rank in others]
        try:
            before = self.store.multi_get(keys)
            time.sleep(SILENCE_S)
            still = [rank for rank, a, b in zip(others, before, self.store.multi_get(keys)) if a == b]
        except dist.DistError:
            self.fail(self.store_holder, f"{cause}; the rendezvous store it held is gone")
        if still:
            self.fail(_ranks(still), cause)
        self.fail("a rank", f"{cause}; every rank's heartbeat goes on: one is stuck, not dead")

    def fail(self, who: str, cause: str) -> NoReturn:
        """The one line, then this process ends (whichever thread gets here first; the other waits for the end)."""
        with self._failing:
            try:
                latest = self._latest_checkpoint()
                print(failure_line(who, self._step(), cause, latest.name if latest else None), file=sys.stderr,
                      flush=True)
                sys.stdout.flush()
            finally:
                os._exit(PEER_LOST)  # the main thread may be blocked in a collective that never returns

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
                verdict = self.check()
            except dist.DistError:  # refused or reset at once, or no answer within heartbeat_timeout_s
                if self._stopped.is_set():
                    return
                host, port = _store_address()
                verdict = self.store_holder, f"the rendezvous store it held at {host}:{port} is gone"
            if verdict is not None:
                self.fail(*verdict)


def failure_line(who: str, step: Optional[int], cause: str, checkpoint: Optional[str]) -> str:
    where = "during start-up" if step is None else f"at step {step}"
    then = (f"the last checkpoint is {checkpoint}; resume with --resume auto" if checkpoint else
            "no checkpoint was saved yet: train again into another --output-dir (or remove this one)")
    return f"error: {who} stopped responding {where} ({cause}); {then}"


def collective_cause(err: BaseException, collective_timeout_s: float) -> str:
    """What went wrong in a collective, in a few words: gloo's first sentence without its source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().split("\n")[0]).split(". ")[0] or type(err).__name__
    if "timed out" in text.lower():
        return f"a collective timed out after {collective_timeout_s:g} s"
    return f"a collective failed: {text}"


def is_collective_failure(err: BaseException) -> bool:
    """An error of torch.distributed (NCCL's, the store's) or of gloo (a plain ``RuntimeError`` naming gloo)."""
    return isinstance(err, dist.DistError) or "gloo" in str(err)


# --------------------------------------------------------------------------------------------------- this process


def start(rank: int, world_size: int, run: RunConfig) -> None:
    """With several ranks, right after the process group exists: connect to the rendezvous store, beat once, wait
    until every rank has (so every counter exists before anyone reads it), then watch in a thread."""
    global _watch
    if world_size == 1:
        return
    host, port = _store_address()
    client = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                           timeout=timedelta(seconds=run.heartbeat_timeout_s))
    # torchrun's agent keeps its store across restarts (--max-restarts): each attempt counts apart
    store = dist.PrefixStore(f"curriculum-pretrain/peers/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)
    holder = "node 0" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
    watch = PeerWatch(store, rank, world_size, run.heartbeat_timeout_s, run.collective_timeout_s, holder)
    watch.beat()
    dist.barrier()
    watch.start()
    _watch = watch


def follow(step: Callable[[], int], latest_checkpoint: Callable[[], Optional[Path]]) -> None:
    """Name ``step()`` and ``latest_checkpoint()`` in the error line (before this: "during start-up")."""
    if _watch is not None:
        _watch.follow(step, latest_checkpoint)


def stop() -> None:
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None


@contextmanager
def failures_reported() -> Iterator[None]:
    """Around a command: a collective that fails because a peer died (or timed out) ends this rank with the one
    line and ``PEER_LOST``; any other error stops the watch (this rank is on its way out) and goes on up."""
    try:
        yield
    except Exception as err:
        if _watch is not None and is_collective_failure(err):
            _watch.explain(err)
        stop()
        raise


def _store_address() -> tuple[str, int]:
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def _beat_key(rank: int) -> str:
    return f"heartbeat/{rank}"


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
