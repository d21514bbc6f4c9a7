"""Several nodes, and ranks that die or stall (``pipeline/peers.py``).

Two one-process "nodes" meet at 127.0.0.1 through the DeepSpeed launcher without ssh, started by
``launch/multi_node.sh`` itself (its hostfile names two nodes, ``node-0`` and ``node-1``: with ``--no_ssh`` the
names are labels, each launcher takes its line by ``--node_rank`` and never resolves it). Then two local ranks
through torchrun and through the DeepSpeed launcher, where a wrapper around ``pipeline.train.main`` makes rank 1
die (SIGKILL), stall, or pause at a chosen point, as a crashed, hung or merely slow rank would.

Every run trains the tiny Llama (2 layers, d_model 64) at world size 2 for 10 steps, counted from 0:

    stage  steps  seq_len  global batch  micro x accum x world
    0      0-4    32       4             2 x 1 x 2
    1      5-9    64       2             1 x 1 x 2

Checkpoints every 4 steps (4, 8, and 10 at the end), an evaluation after step 4 and one at the end. Each test
starts its processes afresh: 15-40 s on two cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch.distributed as dist
from conftest import (TINY_LLAMA_YAML, Run, assert_two_replicas, log_tail, run_process, run_together, train_args,
                      two_ranks, write_wrapper)

from pipeline.environment import free_port
from pipeline.peers import PeerWatch, collective_cause, failure_line

TOTAL_STEPS = 10
CHECKPOINT_EVERY = 4
FAIL_STEP = 6  # the first checkpoint (step 4) is behind it
HEARTBEAT_S = 3  # the shortest run.heartbeat_timeout_s there is
COLLECTIVE_S = 20  # short for a test, longer than the start-up skew of two jobs' processes on two busy cores
JOB_ENDS_WITHIN_S = 60

CONFIG_YAML = """\
name: multinode-test
""" + TINY_LLAMA_YAML + """\
curriculum:
  base_lr: 3.0e-3
  lr_scaling: {{rule: none}}
  stages:
    - {{until_step: 5, seq_len: 32, global_batch: 4, micro_batch: 2, warmup_steps: 1}}
    - {{until_step: 10, seq_len: 64, global_batch: 2, micro_batch: 1, warmup_steps: 1}}
run:
  seed: 1234
  eval_every: 5
  eval_batches: 1
  eval_batch: 2
  checkpoint_every: 4
  tensorboard: false
  export: false
"""


@pytest.fixture(scope="module")
def config(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "multinode-test.yaml"
    path.write_text(CONFIG_YAML.format(data_dir=data_dir))
    return path


def at_step_on_rank_1(tmp_path: Path, action: str) -> Path:
    """A wrapper in which rank 1, about to load step ``FAIL_STEP``'s batch, writes the time to ``marker`` and then
    does ``action`` (Python source)."""
    return write_wrapper(tmp_path / "rank1.py", f"""\
        from pipeline.batches import Prefetcher

        _get = Prefetcher.get


        def get(self, step, cursor):
            if step == {FAIL_STEP} and os.environ["RANK"] == "1":
                with open({str(tmp_path / "marker")!r}, "w") as f:
                    f.write(str(time.time()))
                {action}
            return _get(self, step, cursor)


        Prefetcher.get = get
        """)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------------------------------- nodes


@pytest.mark.multiprocess
@pytest.mark.parametrize(("slots", "include"), [(1, None), (2, "node-0:0@node-1:1")], ids=["hostfile", "include"])
def test_two_single_process_nodes_through_the_deepspeed_launcher_without_ssh(slots: int, include: Optional[str],
                                                                             config: Path, tmp_path: Path) -> None:
    """``launch/multi_node.sh`` on each "node" (``deepspeed --hostfile H --no_ssh --node_rank N --master_addr
    127.0.0.1 --master_port P --module pipeline.train``): as separate nodes run it (``slots=1`` lines), and as two
    "nodes" that share a 2-GPU host do (``slots=2`` lines, ``INCLUDE=node-0:0@node-1:1``, one GPU each). Both
    launchers exit 0, the two replicas are identical after training on different data, every step is logged once."""
    hostfile, run_dir, port = tmp_path / "hostfile", tmp_path / "run", free_port()
    hostfile.write_text(f"node-0 slots={slots}\nnode-1 slots={slots}\n")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the `deepspeed` of this Python
    envs = [{"HOSTFILE": str(hostfile), "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "CONFIG": str(config), "PATH": path, **({"INCLUDE": include} if include else {})}
            for node_rank in (0, 1)]
    nodes = run_together([["bash", "launch/multi_node.sh", "--output-dir", str(run_dir)]] * 2, tmp_path, envs)
    assert [node.status for node in nodes] == [0, 0], "\n\n".join(
        f"node {i} exit status {node.status}:\n{log_tail(node.output)}" for i, node in enumerate(nodes))
    run = Run(run_dir, nodes[0].output)
    assert_two_replicas(run)
    assert [r["step"] for r in run.train_rows()] == list(range(TOTAL_STEPS))


# --------------------------------------------------------------------------------------------------- dead ranks


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_killed_rank_ends_the_job_with_one_line(launcher: str, config: Path, tmp_path: Path) -> None:
    """``kill -9`` of rank 1 before step 6: rank 0 prints one line naming rank 1, the step and the checkpoint to
    resume from, and stops; the launcher ends the job non-zero within a minute of the kill (in about 4 s)."""
    wrapper = at_step_on_rank_1(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    [job] = run_together([two_ranks(launcher, str(wrapper), *train_args(config, tmp_path / "run"))], tmp_path)
    killed_at = float((tmp_path / "marker").read_text())
    assert job.status != 0, log_tail(job.output)
    assert job.ended_at - killed_at < JOB_ENDS_WITHIN_S, log_tail(job.output)
    [line] = error_lines(job.output)
    assert line.startswith(f"error: rank 1 stopped responding at step {FAIL_STEP} (a collective failed: "), line
    assert line.endswith(f"); the last checkpoint is step{CHECKPOINT_EVERY:08d}; resume with --resume auto"), line


@pytest.mark.multiprocess
def test_a_stuck_rank_ends_the_job_at_the_collective_timeout(config: Path, tmp_path: Path) -> None:
    """Rank 1 alive but stuck (asleep) before step 6, through the DeepSpeed launcher: rank 0's collective times out
    after ``run.collective_timeout_s``; as rank 1 still beats, rank 0 says a rank is stuck rather than naming a dead
    one, and the job ends non-zero (rank 1 follows once rank 0, which holds the store, is gone)."""
    wrapper = at_step_on_rank_1(tmp_path, "time.sleep(300)")
    command = two_ranks("deepspeed", str(wrapper), *train_args(config, tmp_path / "run"),
                        "--set", f"run.collective_timeout_s={COLLECTIVE_S}",
                        "--set", f"run.heartbeat_timeout_s={HEARTBEAT_S}")
    [job] = run_together([command], tmp_path)
    stuck_at = float((tmp_path / "marker").read_text())
    assert job.status != 0, log_tail(job.output)
    assert job.ended_at - stuck_at < JOB_ENDS_WITHIN_S, log_tail(job.output)
    assert (f"error: a rank stopped responding at step {FAIL_STEP} (a collective timed out after {COLLECTIVE_S} s; "
            "every rank's heartbeat goes on: one is stuck, not dead); the last checkpoint is "
            f"step{CHECKPOINT_EVERY:08d}; resume with --resume auto") in error_lines(job.output), log_tail(job.output)


@pytest.mark.multiprocess
def test_long_gaps_on_one_rank_trip_neither_timeout(config: Path, tmp_path: Path) -> None:
    """With a 3 s heartbeat timeout and a 20 s collective timeout, rank 1 takes 6 s longer over its first evaluation
    and rank 0 6 s longer over its first checkpoint: longer than the heartbeat timeout, shorter than the collective
    one. The run ends normally: the heartbeat goes on through a gap, and the others wait in the collective."""
    gap_s = 6
    wrapper = write_wrapper(tmp_path / "slow.py", f"""\
        from pipeline.checkpoint import Checkpointer
        from pipeline.engine import Engine

        _evaluate, _commit = Engine.evaluate, Checkpointer._commit
        slowed = set()  # each kind of gap once: the first evaluation on rank 1, the first save on rank 0


        def evaluate(self, batches):
            if os.environ["RANK"] == "1" and "evaluate" not in slowed:
                slowed.add("evaluate")
                time.sleep({gap_s})
            return _evaluate(self, batches)


        def commit(self, partial, final, update_latest=True):  # rank 0's part of a save, between two barriers
            if "commit" not in slowed:
                slowed.add("commit")
                time.sleep({gap_s})
            _commit(self, partial, final, update_latest)


        Engine.evaluate, Checkpointer._commit = evaluate, commit
        """)
    run_dir = tmp_path / "run"
    output = run_process(two_ranks("torchrun", str(wrapper), *train_args(config, run_dir),
                                   "--set", f"run.collective_timeout_s={COLLECTIVE_S}",
                                   "--set", f"run.heartbeat_timeout_s={HEARTBEAT_S}"))
    assert "stopped responding" not in output
    run = Run(run_dir, output)
    assert_two_replicas(run)
    assert [r["step"] for r in run.train_rows()] == list(range(TOTAL_STEPS))
    # Rank 0 waited for rank 1 (an evaluation here takes well under a second without it). Not all of the 6 s: rank 0
    # starts its clock when it reaches the evaluation, and rank 1 may have begun its sleep a moment earlier.
    assert run.eval_rows()[0]["eval_s"] >= gap_s - 1, run.eval_rows()


# --------------------------------------------------------------------------------------------------- the watch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rank_0_names_a_rank_whose_heartbeat_stopped_and_the_others_hear_it() -> None:
    """Three ranks on one store: rank 2 stops beating at second 0. Rank 0 says nothing through second 29 and names
    rank 2 at second 30 (``heartbeat_timeout_s``); rank 1, which watches only rank 0, reads rank 0's verdict."""
    store, clock = dist.PrefixStore("test", dist.HashStore()), Clock()
    watches = [PeerWatch(store, rank, 3, heartbeat_timeout_s=30, collective_timeout_s=600, clock=clock)
               for rank in range(3)]
    for watch in watches:
        watch.beat()
    for second in range(30):
        clock.now = second
        watches[0].beat()
        watches[1].beat()
        assert watches[0].check() is None and watches[1].check() is None, second
    clock.now = 30
    assert watches[0].check() == ("rank 2", "no heartbeat for 30 s")
    assert watches[1].check() == ("rank 2", "no heartbeat for 30 s")


def test_a_rank_that_stops_hearing_rank_0_names_it() -> None:
    """Rank 1 watches rank 0's counter: still for ``heartbeat_timeout_s`` (5 s here), it names rank 0."""
    store, clock = dist.HashStore(), Clock()
    watches = [PeerWatch(store, rank, 2, heartbeat_timeout_s=5, collective_timeout_s=600, clock=clock)
               for rank in range(2)]
    for watch in watches:
        watch.beat()
    assert watches[1].check() is None
    clock.now = 5
    assert watches[1].check() == ("rank 0", "no heartbeat for 5 s")


def test_the_error_line() -> None:
    assert failure_line("rank 1", 37, "no heartbeat for 30 s", "step00000032") == (
        "error: rank 1 stopped responding at step 37 (no heartbeat for 30 s); the last checkpoint is step00000032; "
        "resume with --resume auto")
    assert failure_line("rank 0", None, "a collective timed out after 600 s", None) == (
        "error: rank 0 stopped responding during start-up (a collective timed out after 600 s); no checkpoint was "
        "saved yet: train again into another --output-dir (or remove this one)")


@pytest.mark.parametrize(("message", "cause"), [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:436: Connection reset by "
     "peer. This is typically caused by a remote worker hanging or bugs in the application.",
     "a collective failed: Read error [127.0.0.1]:436: Connection reset by peer"),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv "
     "operation to complete", "a collective timed out after 60 s"),
], ids=["peer-gone", "timeout"])
def test_a_failed_collective_in_a_few_words(message: str, cause: str) -> None:
    assert collective_cause(RuntimeError(message), 60.0) == cause
