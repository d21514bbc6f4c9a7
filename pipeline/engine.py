"""The engine room: process setup, the DeepSpeed engine around the model and its loss, one training step,
evaluation, compilation, and every touch of DeepSpeed internals. ``train``, ``bench`` and ``lr-find`` call it.

One training step (``Engine.train_step``), the same wherever it runs:

1. forward and backward over the step's micro-batches (DeepSpeed's ``step`` after each but the last keeps its
   counters in step; the gradients are accumulated, and reduced over ranks at the last one);
2. the step's one host synchronisation: one all-reduce of ``[loss, stop request, gradient norm]`` read back with
   one ``.tolist()``, so the loop knows the mean loss over ranks before the update;
3. the caller decides (``decide``, the spike guard): apply the update (``engine.step()`` at the accumulation
   boundary) or drop the gradients.

With ``run.precision: bf16-autocast`` (the default on GPUs) and ZeRO stage 0 nothing else waits for the GPU (nor
does DeepSpeed's throughput timer, which is off): the gradient norm is computed on the device before the update and
read with the loss, the gradients are clipped with it in one fused multiply (DeepSpeed's own fp32 clip, parameter by
parameter, is switched off), and DeepSpeed steps the optimizer directly; with one rank it skips its gradient
all-reduce. DeepSpeed's bf16 mode and ZeRO read their overflow flags and gradient norms on the host inside
``engine.step()``; the loop then reads the norm they computed after the update. With CUDA graphs, accumulated
gradients live in buffers of their own (``_give_gradients_buffers``).

Compilation (``kernels.compile``): ``torch.compile`` takes the model and its loss (or the decoder body when the loss
is fused). With ``kernels.dynamic_shapes`` the training batches' stage-varying sizes are marked dynamic, so one graph
serves every stage (``Schedule.compiled_graphs``); without it each distinct training shape is one graph. Evaluation
(no gradients, eval mode, full length) is one more, static. ``warm_up`` builds them all before step 0 by running the
real step and the real evaluation once per shape (which also records each shape's CUDA graph); dynamo's recompile
limit is the static count plus a margin of two, and ``CompileMonitor`` reports any graph built after the warm-up and
any fallback to eager in the log and as a ``kind: compile`` metrics line.

DeepSpeed internals: ``setup.py`` pins DeepSpeed to the tested range (``>=0.19.8,<0.20``) because of these, each
touched here and nowhere else; ``tests/test_deepspeed_internals.py`` checks that the installed version is inside the
pin and that each exists on a real engine.

- ``engine._config.gradient_clipping`` (``enter_stage``): the engine reads its clip from its config at every step
  and has no setter, and the clip changes per stage. Where the norm is known before the update (fp32 weights, ZeRO
  stage 0) it is 0: ``apply_update`` clips in one fused call with that norm instead of DeepSpeed's per-parameter
  clip.
- ``engine.optimizer.clip_grad`` (``enter_stage``): DeepSpeed's bf16/fp16 and ZeRO optimizer wrappers copy the clip
  when they are built and clip with their copy, so each stage's clip is written there too.
- ``engine.get_global_grad_norm()`` (``apply_update``): the norm those wrappers compute inside ``step()``; where the
  norm is known only after the update (``norm_follows``), the loop and the spike guard read it there.
- ``engine.set_gradient_accumulation_boundary()`` (``forward_backward``): the number of micro-batches changes from
  stage to stage, so the step says which micro-batch is its last instead of DeepSpeed counting to a fixed
  ``gradient_accumulation_steps``.
- ``engine.enable_backward_allreduce = False`` (``build_engine``; one rank, ZeRO stage 0): spares the per-step
  flatten, all-reduce and unflatten of every gradient that averaging over one rank would cost.
- the ``torch_autocast`` config section (written by ``pipeline/ds_config.py`` for ``run.precision: bf16-autocast``;
  the engine reads it as ``_config.torch_autocast_enabled``): bf16 matmuls under fp32 weights, with DeepSpeed
  stepping the optimizer directly.
- the ``timers.throughput`` config section (written by ``pipeline/ds_config.py``: ``enabled: false`` unless the
  template or overrides set it up): DeepSpeed's throughput timer is on by default and calls its accelerator's
  ``synchronize()`` at every micro-batch's forward and step, which would stop the CPU queueing the next
  micro-batch while the GPU runs this one.
- ``engine._config.load_universal_checkpoint`` (``loading_universal``): whether a load reads a universal
  checkpoint, read at every ``load_checkpoint``; on for the one load of a resume on another world size
  (``pipeline/checkpoint.py`` converts with ``deepspeed.checkpoint.ds_to_universal``).
- ZeRO stage 3 leaves each rank's module holding empty placeholders between forwards (``param.ds_numel`` keeps the
  full size): ``params_sha256`` gathers the parameters with ``deepspeed.zero.GatheredParameters`` first, and the
  parameter count reads ``ds_numel`` (``pipeline.model.param_numel``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.schedule import Schedule, Stage
from pipeline import peers
from pipeline.batches import StepBatch
from pipeline.ds_config import Precision
from pipeline.guard import APPLY, Verdict
from pipeline.kernels import KernelChoice

Log = Callable[[str], None]

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core FLOP/s of one device
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "RTX 3090": 71e12,
    "RTX 4090": 165e12,
}


@dataclass(frozen=True)
class Processes:
    """This process's place in the job: rank, world size, its device, and a printer that prints on rank 0."""

    rank: int
    world_size: int
    device: torch.device
    log: Log


def init_processes(config: Config) -> Processes:
    """Environment fixes, the process group (NCCL on GPUs, gloo on CPU) with ``run.collective_timeout_s``, the
    watch that turns a dead rank into one error line (``pipeline/peers.py``), and this rank's device."""
    from pipeline.environment import prepare_environment

    notes = prepare_environment(os.environ, torch.cuda.is_available())
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed's ZeRO calls collectives that torch 2.13 renamed: a deprecation notice per call, not the user's to fix
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=_collective_timeout(config.run.collective_timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    peers.start(rank, world_size, config.run)
    log = _rank0_printer(rank)
    for note in notes:
        log(note)
    return Processes(rank, world_size, device, log)


def close_processes() -> None:
    import torch.distributed as dist

    dist.barrier()
    peers.stop()
    dist.barrier()  # no rank leaves (rank 0 may hold the store) while another's watch still reads the store
    dist.destroy_process_group()


def _collective_timeout(seconds: float) -> timedelta:
    """``run.collective_timeout_s`` for every process group of this process: the default one, and each one created
    later without a timeout of its own, which torch gives its default (30 min for gloo, 10 for NCCL) rather than the
    default group's. DeepSpeed's data-parallel group, the one its gradient all-reduces use, is such a copy of the
    world group. Under NCCL, torch's watchdog ends a rank whose collective outlasts the timeout
    (TORCH_NCCL_ASYNC_ERROR_HANDLING, 3 by default); TORCH_NCCL_BLOCKING_WAIT stays off: it would make the host wait
    on every collective, DeepSpeed's gradient all-reduces included."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def _rank0_printer(rank: int) -> Log:
    """Print on rank 0 without breaking a progress bar."""
    from tqdm import tqdm

    def log(message: str) -> None:
        if rank == 0:
            tqdm.write(message)

    return log


def device_precision(config: Config, device: torch.device) -> Precision:
    from pipeline.ds_config import resolve_precision

    return resolve_precision(config.run.precision,
                             bf16_gpu=device.type == "cuda" and torch.cuda.is_bf16_supported())


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


# --------------------------------------------------------------------------------------------------- compilation


_CACHE_NAMES = {"aot_autograd": "AOTAutograd", "inductor": "Inductor"}
CUSTOM_OP_MODULES = ("pipeline.gelu_mlp", "pipeline.triton_kernels")
"""The modules that define this project's custom operators (``custom_op`` registrations)."""


def custom_op_cache_keys(modules: Sequence[str] = CUSTOM_OP_MODULES) -> dict[str, str]:
    """A cache key per module that defines custom operators: a hash of its source. Inductor's and AOTAutograd's
    on-disk caches key a graph by the names of the custom operators in it, not by their schema or fake
    implementation; with these keys in Inductor's ``unsafe_marked_cacheable_functions``, whose values are part of
    both caches' keys, an edit to such a module compiles again instead of loading a graph built for the old
    operator. (The names, ``<module> source``, are no function's, so they mark nothing cacheable.)"""
    import importlib.util

    keys = {}
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"{module}: no source to key its custom operators by", name=module)
        with open(spec.origin, "rb") as source:
            keys[f"{module} source"] = hashlib.sha256(source.read()).hexdigest()[:16]
    return keys


class CompileMonitor:
    """The ``torch.compile`` backend of a run, wrapped to count the graphs dynamo hands it.

    Before ``freeze()`` (the warm-up) every graph is expected; afterwards each new graph is a surprise, reported
    once by ``surprises()`` together with dynamo's fallbacks to eager (a ``hit config.recompile_limit`` warning)
    and graph breaks."""

    def __init__(self, backend: str, cuda_graphs: bool, coordinate_descent_tuning: bool = False) -> None:
        from torch import _dynamo

        self.graphs: list[str] = []  # one description per graph: the shapes of its tensor inputs
        self.frozen_at: Optional[int] = None
        self.fallbacks: list[str] = []
        self._reported = 0
        self._reported_fallbacks = 0
        self._breaks_at_freeze = 0
        self._caches_at_start = _compile_cache_counts() if backend == "inductor" else None
        self.compile_caches: Optional[dict[str, dict[str, int]]] = None
        """The on-disk caches that are on, over the warm-up (set by ``freeze``; None with another backend):
        AOTAutograd's (one graph per dynamo graph) and Inductor's (forward and backward apart), each with the graphs
        it found (``hit``), compiled (``miss``) and could not take (``bypass``)."""
        if backend == "inductor":
            from functools import partial

            from torch._functorch import config as functorch_config
            from torch._inductor.compile_fx import compile_fx

            # Without this AOTAutograd's cache refuses any graph holding an autograd.Function (the output layer's
            # loss, the fused MLP), and a process with a warm cache traces the whole model again. The key holds the
            # Function's traced forward and backward; TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD=0 opts out.
            if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):  # torch >= 2.7
                functorch_config.autograd_cache_allow_custom_autograd_functions = True

            from torch._inductor import config as inductor_config

            patches: dict[str, Any] = {"triton.cudagraphs": cuda_graphs}
            if hasattr(inductor_config, "unsafe_marked_cacheable_functions"):  # else clear the cache after an edit
                patches["unsafe_marked_cacheable_functions"] = {**inductor_config.unsafe_marked_cacheable_functions,
                                                                **custom_op_cache_keys()}
            if coordinate_descent_tuning:  # only when asked: TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 still works
                patches["coordinate_descent_tuning"] = True
            self._inner = partial(compile_fx, config_patches=patches)
        else:
            self._inner = _dynamo.lookup_backend(backend)
        logging.getLogger("torch._dynamo").addHandler(_FallbackHandler(self.fallbacks))

    def backend(self, graph: Any, example_inputs: Sequence[Any]) -> Any:
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        shapes = [v.shape for v in values if isinstance(v, torch.Tensor) and v.dim() == 2
                  and not v.is_floating_point()]  # the token inputs; parameters are floating point
        sizes = ["*" if isinstance(size, torch.SymInt) else str(size) for size in shapes[0]] if shapes else ["?"]
        self.graphs.append("x".join(sizes) + ("" if torch.is_grad_enabled() else " (no grad)"))  # *: symbolic
        return self._inner(graph, example_inputs)

    def freeze(self) -> None:
        if self._caches_at_start is not None:
            now, start = _compile_cache_counts(), self._caches_at_start
            self.compile_caches = {cache: {kind: count - start[cache][kind] for kind, count in now[cache].items()}
                                   for cache in _caches_on()}
        self.frozen_at = len(self.graphs)
        self._reported = len(self.graphs)
        self._reported_fallbacks = len(self.fallbacks)
        self._breaks_at_freeze = _graph_breaks()

    def surprises(self) -> list[str]:
        """What happened since the warm-up (or the last call): graphs built, fallbacks to eager, graph breaks."""
        if self.frozen_at is None:
            return []
        found = [f"graph built after the warm-up: {graph}" for graph in self.graphs[self._reported:]]
        found += [f"dynamo gave up and runs eager: {fallback}"
                  for fallback in self.fallbacks[self._reported_fallbacks:]]
        breaks = _graph_breaks()
        if breaks > self._breaks_at_freeze:
            found.append(f"{breaks - self._breaks_at_freeze} new graph break(s) after the warm-up")
        self._reported, self._reported_fallbacks, self._breaks_at_freeze = len(self.graphs), len(self.fallbacks), breaks
        return found

    def graph_breaks(self) -> int:
        return _graph_breaks()

    def describe_caches(self) -> str:
        """What the on-disk caches did for the warm-up, for its log line: from a warm cache, every graph found."""
        if self.compile_caches is None:
            return ""
        if not self.compile_caches:
            return "; the on-disk compile caches are off"
        counts = [(_CACHE_NAMES[cache], kinds) for cache, kinds in self.compile_caches.items()]
        used = "; ".join(f"{name} {kinds['hit']} found, {kinds['miss']} compiled" for name, kinds in counts)
        refused = ", ".join(f"{kinds['bypass']} {name}" for name, kinds in counts if kinds["bypass"])
        return f"; the on-disk caches: {used}" + (f"; not cacheable: {refused}" if refused else "")


class _FallbackHandler(logging.Handler):
    """Catches dynamo's one warning when it stops compiling a function: ``torch._dynamo hit config.<limit>``."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.sink.append(message.splitlines()[0])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _compile_cache_counts() -> dict[str, dict[str, int]]:
    """AOTAutograd's and Inductor's on-disk caches so far in this process: graphs found, compiled, not cacheable."""
    from torch._dynamo.utils import counters

    kinds = ("hit", "miss", "bypass")
    return {"aot_autograd": {kind: counters["aot_autograd"][f"autograd_cache_{kind}"] for kind in kinds},
            "inductor": {kind: counters["inductor"][f"fxgraph_cache_{kind}"] for kind in kinds}}


def _caches_on() -> list[str]:
    """The on-disk compile caches this process uses: Inductor's, and AOTAutograd's, which needs Inductor's."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    if getattr(inductor_config, "force_disable_caches", False) or not inductor_config.fx_graph_cache:
        return []
    return ["aot_autograd", "inductor"] if getattr(functorch_config, "enable_autograd_cache", False) else ["inductor"]


# --------------------------------------------------------------------------------------------------- the engine


@dataclass
class StepValues:
    """What the step's one host synchronisation read: means over ranks."""

    loss: float
    grad_norm: Optional[float]
    """Before the update where the engine can tell (fp32 weights without ZeRO), else None."""
    stop: bool
    """Some rank was asked to stop (SIGTERM/SIGUSR1)."""


@dataclass
class Engine:
    """The DeepSpeed engine around ``CausalLMWithLoss``, with what a run needs to know about it."""

    ds: Any
    lm: Any
    """The transformers model (for its config and parameter counts)."""
    optimizer_name: str
    kernels: KernelChoice
    precision: Precision
    processes: Processes
    monitor: Optional[CompileMonitor] = None
    dynamic_dims: tuple[int, ...] = ()
    """The training batches' dimensions marked dynamic for ``torch.compile`` (``Schedule.varying_dims``)."""
    warmup_s: float = 0.0
    grad_clip: float = 0.0
    _stats: Optional[torch.Tensor] = field(default=None, repr=False)
    _grad_buffers: Optional[list[torch.Tensor]] = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.processes.device

    def describe(self) -> str:
        """One line for the log: the model, optimizer, precision, devices, ZeRO stage and kernels."""
        kernels = self.kernels
        from pipeline.model import param_numel

        return (f"model: {self.lm.config.model_type}, "
                f"{sum(param_numel(p) for p in self.lm.parameters()):,} parameters; "
                f"optimizer {self.optimizer_name}; {self.precision} on {self.device.type} x "
                f"{self.processes.world_size}; ZeRO stage {self.zero_stage}; kernels: fused cross-entropy "
                f"{kernels.fused_cross_entropy}, liger {kernels.liger}, apex {kernels.apex}, compile {kernels.compile}"
                + (", dynamic shapes" if self.dynamic_dims else "")
                + (", CUDA graphs" if kernels.cuda_graphs else "")
                + (", FP8 output layer" if kernels.fp8_lm_head else "")
                + (", output layer's gradient in the forward" if kernels.logits_gradient_in_forward else ""))

    @property
    def zero_stage(self) -> int:
        return self.ds.zero_optimization_stage()

    # --------------------------------------------------------------------------------------------- a step

    def enter_stage(self, stage: Stage) -> None:
        """At a step boundary: the stage's micro-batch, gradient accumulation and clip."""
        self.ds.set_train_micro_batch_size(stage.micro_batch)
        self.ds.set_train_batch_size(stage.global_batch)  # grad_accum = global / (micro x world)
        self.grad_clip = stage.grad_clip
        # DeepSpeed's fp32 path clips parameter by parameter (two kernels and a norm each); where the norm is
        # known before the update the engine clips with it in one fused call instead (apply_update)
        self.ds._config.gradient_clipping = stage.grad_clip if self.norm_follows else 0.0
        if hasattr(self.ds.optimizer, "clip_grad"):  # DeepSpeed's bf16 and ZeRO optimizers keep their own copy
            self.ds.optimizer.clip_grad = stage.grad_clip

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    def forward_backward(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward over one step's micro-batches; the update is neither applied nor dropped yet.
        Returns this rank's mean micro-batch loss as a float64 device tensor (no host synchronisation)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.kernels.cuda_graphs and len(micro_batches) > 1:
            self._give_gradients_buffers()
        for i, (inputs, labels) in enumerate(micro_batches):
            mark_dynamic((inputs, labels), self.dynamic_dims)
            boundary = i == len(micro_batches) - 1
            self.ds.set_gradient_accumulation_boundary(boundary)
            loss = self.ds(inputs, labels)
            self.ds.backward(loss)
            if not boundary:
                self.ds.step()  # no update before the accumulation boundary; keeps DeepSpeed's counters in step
            total += loss.detach()
        return total / len(micro_batches)

    @property
    def norm_follows(self) -> bool:
        """Whether the gradient norm is known only after the update: DeepSpeed's bf16 and ZeRO optimizers hold
        the gradients themselves and compute the norm inside their step."""
        return self.zero_stage > 0 or self.precision == "bf16"

    def _give_gradients_buffers(self) -> None:
        """With CUDA graphs a backward writes its gradients into the graph's memory, which the next replay reuses.
        A parameter without a ``.grad`` takes that memory as its ``.grad`` (autograd steals the tensor), and the next
        micro-step would overwrite it; so when a step accumulates, every parameter starts it with a zeroed buffer
        of its own, which autograd adds into."""
        params = [p for p in self.ds.module.parameters() if p.requires_grad]
        if self._grad_buffers is None:
            self._grad_buffers = [torch.zeros_like(p) for p in params]
        else:
            torch._foreach_zero_(self._grad_buffers)
        for param, buffer in zip(params, self._grad_buffers):
            param.grad = buffer

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.ds.module.parameters() if p.grad is not None]

    def _grad_norm_before_update(self) -> Optional[torch.Tensor]:
        """Global L2 norm of the (already averaged) gradients, on the device, where the engine can tell."""
        if self.norm_follows:
            return None
        grads = self._grads()
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None

    def synchronize(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor], stop: bool) -> StepValues:
        """The step's one host synchronisation: mean loss, any stop request and the gradient norm over ranks."""
        import torch.distributed as dist

        if self._stats is None:
            self._stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        stats = self._stats
        stats[0].copy_(loss)
        stats[1].fill_(float(stop))  # a kernel argument, not a host-to-device copy
        if grad_norm is None:
            stats[2].fill_(0.0)
        else:
            stats[2].copy_(grad_norm)
        if self.processes.world_size > 1:
            dist.all_reduce(stats)
        loss_sum, stops, norm_sum = stats.tolist()
        world = self.processes.world_size
        return StepValues(loss_sum / world, None if grad_norm is None else norm_sum / world, stops > 0)

    def apply_update(self, grad_norm: Optional[torch.Tensor] = None) -> Optional[float]:
        """The optimizer update at the accumulation boundary, the gradients clipped to the stage's ``grad_clip``
        first (with ``grad_norm``, on the device, where the norm is known before the update); returns the gradient
        norm DeepSpeed computed inside its step where it did (``norm_follows``), else None."""
        if grad_norm is not None and self.grad_clip > 0:
            torch._foreach_mul_(self._grads(), (self.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
        self.ds.step()
        if not self.norm_follows:
            return None
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def drop_update(self) -> None:
        """Discard the accumulated gradients of this step instead of applying them."""
        if self.norm_follows:  # DeepSpeed's bf16 and ZeRO optimizers hold gradients of their own
            self.ds.optimizer.zero_grad(set_to_none=True)
        self.ds.zero_grad()  # every parameter's .grad to None

    def train_step(self, batch: StepBatch, stop: bool = False,
                   decide: Optional[Callable[..., Verdict]] = None) -> tuple[StepValues, Verdict]:
        """One optimizer step: forward/backward, the one synchronisation, then the update unless ``decide(values)``
        (the spike guard) says no; where the gradient norm is known only after the update, ``decide(values,
        after_update=True)`` judges it then. Without ``decide`` every update is applied."""
        loss = self.forward_backward(batch.micro_batches)
        norm = self._grad_norm_before_update()
        values = self.synchronize(loss, norm, stop)
        verdict = decide(values) if decide is not None else APPLY
        if not verdict.update_applies:
            self.drop_update()
            return values, verdict
        after = self.apply_update(norm)
        if self.norm_follows:
            values.grad_norm = after
            if decide is not None and verdict.action == "apply":
                verdict = decide(values, after_update=True)
        return values, verdict

    # --------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean loss over the evaluation set (every rank holds its share of each batch), one synchronisation."""
        import torch.distributed as dist

        self.ds.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of row losses, rows]
        with torch.no_grad():
            for inputs, labels in batches:
                total[0] += self.ds(inputs, labels).double() * inputs.shape[0]
                total[1] += inputs.shape[0]
        dist.all_reduce(total)
        self.ds.train()
        loss_sum, rows = total.tolist()
        return loss_sum / rows

    # --------------------------------------------------------------------------------------------- warm-up

    def warm_up(self, schedule: Schedule, load: Callable[[Stage, int], StepBatch],
                eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Build every compiled graph before step 0: per distinct training shape, the real step's micro-steps
        (one before the accumulation boundary where the stage accumulates, and one at it) on real batches from
        ``load``, gradients dropped; then one real evaluation batch. With CUDA graphs each runs three times (the
        graph trees record on the second call). Returns seconds per shape; the total is ``warmup_s``."""
        start = time.perf_counter()
        repeats = 3 if self.kernels.cuda_graphs else 1
        seconds: dict[str, float] = {}
        for stage in first_stage_per_shape(schedule):
            shape_start = time.perf_counter()
            self.enter_stage(stage)
            micro_batches = load(stage, 0).micro_batches[:2]
            for _ in range(repeats):
                self.forward_backward(micro_batches)
                self.drop_update()
            self._sync_device()
            seconds[f"{stage.micro_batch}x{stage.seq_len}"] = time.perf_counter() - shape_start
        eval_start = time.perf_counter()
        for _ in range(repeats):
            self.evaluate(eval_batches[:1])
        seconds[f"eval {eval_batches[0][0].shape[0]}x{eval_batches[0][0].shape[1]}"] = time.perf_counter() - eval_start
        if self.monitor is not None:
            self.monitor.freeze()
        self.warmup_s = time.perf_counter() - start
        return seconds

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # --------------------------------------------------------------------------------------------- state

    @functools.cached_property
    def _flops_shape(self) -> tuple[int, int, int]:
        from pipeline.model import matmul_params

        return matmul_params(self.lm), self.lm.config.num_hidden_layers, self.lm.config.hidden_size

    def mfu(self, seq_len: int, tok_per_s: float, peak: Optional[float]) -> Optional[float]:
        """Model FLOPs utilisation of a step at ``seq_len`` (the length trained, never the maximum)."""
        from pipeline.model import flops_per_token

        if not peak:
            return None
        return flops_per_token(*self._flops_shape, seq_len) * tok_per_s / (self.processes.world_size * peak)

    def peak_memory_gib(self) -> Optional[float]:
        """This rank's peak GPU memory allocated so far (None off CUDA)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def params_sha256(self) -> str:
        """The hash of the module's whole state. Under ZeRO-3 each parameter is gathered in turn (never the whole
        model at once), a collective: every rank calls this at the same point; and since the ranks then hash the
        same gathered tensors, the replica report's ``params_identical`` holds by construction there."""
        import deepspeed

        params = hashlib.sha256()
        for tensor in self.ds.module.state_dict(keep_vars=True).values():
            with (deepspeed.zero.GatheredParameters([tensor]) if hasattr(tensor, "ds_id")
                  else contextlib.nullcontext()):
                params.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return params.hexdigest()

    def replica_report(self, data_sha256: str) -> dict[str, Any]:
        """Every rank's parameter hash and data fingerprint: data-parallel replicas must hold identical parameters
        after training on different data."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.processes.world_size
        dist.all_gather_object(gathered, {"params_sha256": self.params_sha256(), "data_sha256": data_sha256})
        return {"params_sha256": [g["params_sha256"] for g in gathered],
                "data_sha256": [g["data_sha256"] for g in gathered],
                "params_identical": len({g["params_sha256"] for g in gathered}) == 1}


@contextlib.contextmanager
def loading_universal(ds: Any) -> Iterator[None]:
    """DeepSpeed decides at every ``load_checkpoint`` whether the checkpoint is universal from its config
    (``_config.load_universal_checkpoint``): on for one load of a converted checkpoint (a resume on another world
    size), off again for the run's own checkpoints (rollbacks)."""
    before = ds._config.load_universal_checkpoint
    ds._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        ds._config.load_universal_checkpoint = before


def compile_forward(forward: Callable[..., Any], backend: Any, dynamic: bool) -> Callable[..., Any]:
    """``torch.compile`` of a forward as the engine compiles it: with ``dynamic`` only the sizes ``mark_dynamic``
    marks are symbolic (evaluation, and a size dynamo sees change, stay static), otherwise every size is static.
    The no-automatic-dynamic setting holds during this function's calls, when dynamo compiles, and nowhere else
    in the process."""
    from torch import _dynamo

    return _dynamo.config.patch(automatic_dynamic_shapes=False)(
        torch.compile(forward, backend=backend, dynamic=None if dynamic else False))


def mark_dynamic(tensors: Sequence[torch.Tensor], dims: Sequence[int]) -> None:
    """Mark ``dims`` of each tensor symbolic for ``compile_forward`` (dynamo keeps a size of 1 static)."""
    for tensor, dim in itertools.product(tensors, dims):
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def first_stage_per_shape(schedule: Schedule) -> list[Stage]:
    """The first stage of each distinct (micro-batch, seq_len), in order of use."""
    return list({(s.micro_batch, s.seq_len): s for s in reversed(schedule.stages)}.values())[::-1]


def build_engine(config: Config, schedule: Schedule, ds_config: dict[str, Any], manifest: dict[str, Any],
                 processes: Processes) -> Engine:
    """A freshly initialised model with the kernels the config asks for, wrapped with its loss, its optimizer and
    the DeepSpeed engine around them. The weights are drawn on the run's device (on the host under ZeRO-3): the same
    on every rank and for every call with the same seed and device kind, not the same on a GPU as on the CPU."""
    import deepspeed

    from pipeline.ds_config import cpu_offload, zero_stage
    from pipeline.kernels import (CausalLMWithLoss, choose_kernels, fp8_shape_problem, gelu_mlp_problem,
                                  patch_model_classes, swap_apex_norms)
    from pipeline.model import WIDTH_FIELD, build_model, model_config_dict

    device, log = processes.device, processes.log
    on_cuda = device.type == "cuda"
    vocab_size, eot_id = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eot_id"]
    fields = model_config_dict(config.model, vocab_size, schedule.max_seq_len, eot_id)
    precision: Precision = ("bf16" if ds_config["bf16"]["enabled"]
                            else "bf16-autocast" if "torch_autocast" in ds_config else "fp32")
    choice = choose_kernels(config.kernels, config.model.arch, on_cuda,  # ROCm's FP8 types differ: not verified
                            fp8_matmuls=on_cuda and torch.version.hip is None
                            and torch.cuda.get_device_capability(device) >= (8, 9),
                            fp8_shapes=fp8_shape_problem(fields[WIDTH_FIELD[config.model.arch]], fields["vocab_size"]),
                            mlp_problem=gelu_mlp_problem(config.model.arch, fields, precision))
    for note in choice.notes:
        log(note)
    zero3 = zero_stage(ds_config) == 3
    if zero3:
        choice = _kernels_for_zero3(choice, config, log)
    if choice.fused_mlp:
        choice = _build_gelu_mlp(choice, config, log)
    patch_model_classes(choice)
    torch.manual_seed(config.run.seed)
    # built where it trains (a 124M model's initialisation took 1.6 s on the host); ZeRO-3 partitions a model that
    # may not fit on one device, so it starts on the host
    with torch.device("cpu" if zero3 else device):
        model = build_model(config.model, vocab_size, schedule.max_seq_len, eot_id)
    if choice.apex:
        log(f"kernels.apex: {swap_apex_norms(model)} norm layers replaced by apex fused ones")
    if choice.fused_mlp:
        from pipeline.gelu_mlp import fuse_gelu_mlps

        log(f"kernels.fused_mlp: {fuse_gelu_mlps(model)} MLPs with the GELU in cuBLASLt's matmul epilogues")
    module = CausalLMWithLoss(model, fused_cross_entropy=choice.fused_cross_entropy, fp8_lm_head=choice.fp8_lm_head,
                              logits_gradient_in_forward=choice.logits_gradient_in_forward)
    optimizer, optimizer_name = _build_optimizer(module, config, choice.fused_adam, cpu_offload(ds_config))
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    if processes.world_size == 1 and ds_engine.zero_optimization_stage() == 0:
        ds_engine.enable_backward_allreduce = False  # nothing to average: no flatten, all-reduce, unflatten per step
    if choice.cuda_graphs and ds_engine.zero_optimization_stage() > 0:
        if config.kernels.cuda_graphs is True:
            raise ConfigError("kernels.cuda_graphs", True, "verified with ZeRO stage 0 only; set it to auto or false")
        log("kernels.cuda_graphs: not used (verified with ZeRO stage 0 only)")
        choice = dataclasses.replace(choice, cuda_graphs=False)
    monitor, dynamic_dims = None, ()
    if choice.compile:
        from torch import _dynamo

        monitor = CompileMonitor(config.kernels.compile_backend, choice.cuda_graphs, choice.coordinate_descent_tuning)
        # every train shape as a graph of its own and the evaluation shape, and two spare: whatever dynamo
        # specialises, a later graph is reported, not refused
        static_graphs = schedule.compiled_graphs(dynamic=False)
        _dynamo.config.recompile_limit = static_graphs + 2
        _dynamo.config.accumulated_recompile_limit = max(256, 4 * static_graphs)
        dynamic_dims = schedule.varying_dims() if choice.dynamic_shapes else ()
        # the forward only: DeepSpeed's forward hooks on the module stay outside the graph (traced, they break it)
        part = module.compiled_part
        part.forward = compile_forward(part.forward, monitor.backend, dynamic=bool(dynamic_dims))
    return Engine(ds_engine, model, optimizer_name, choice, precision, processes, monitor, dynamic_dims)


def _build_gelu_mlp(choice: KernelChoice, config: Config, log: Callable[[str], None]) -> KernelChoice:
    """Build (or load from torch's extension cache) ``kernels.fused_mlp``'s C++ extension; where it does not build
    (no compiler, no CUDA headers), ``auto`` goes on without it and says so, ``true`` is an error."""
    from pipeline.gelu_mlp import extension

    try:
        extension()
    except Exception as err:  # a failed build raises RuntimeError, OSError or CalledProcessError, among others
        last_line = (str(err).strip().splitlines() or [""])[-1]
        why = f"its cuBLASLt extension did not build: {type(err).__name__}: {last_line}"
        if config.kernels.fused_mlp is True:
            raise ConfigError("kernels.fused_mlp", True, f"required but unavailable ({why})") from None
        log(f"kernels.fused_mlp: not used ({why})")
        return dataclasses.replace(choice, fused_mlp=False)
    return choice


def _kernels_for_zero3(choice: KernelChoice, config: Config, log: Callable[[str], None]) -> KernelChoice:
    """ZeRO-3 gathers a layer's parameters in hooks around that layer's forward: the fused loss reads the output
    embedding outside its module, and ``torch.compile`` would trace the hooks. Neither is verified with it: ``auto``
    turns them off (with a note), ``true`` is an error."""
    for name, why in (("fused_cross_entropy", "it reads the output embedding outside its module"),
                      ("fp8_lm_head", "it reads the output embedding outside its module"),
                      ("logits_gradient_in_forward", "it reads the output embedding outside its module"),
                      ("fused_mlp", "it reads the MLP's weights outside their modules"),
                      ("compile", "it would trace DeepSpeed's parameter-gathering hooks")):
        if getattr(choice, name):
            if getattr(config.kernels, name) is True:
                raise ConfigError(f"kernels.{name}", True, f"not verified with ZeRO stage 3 ({why}); set it to auto "
                                                           "or false")
            log(f"kernels.{name}: not used (ZeRO stage 3: {why})")
            choice = dataclasses.replace(choice, **{name: False})
    if choice.coordinate_descent_tuning and not choice.compile:
        raise ConfigError("kernels.coordinate_descent_tuning", True, "needs kernels.compile, which ZeRO stage 3 turns "
                                                                     "off; set it to false")
    if choice.dynamic_shapes and not choice.compile:  # auto: only when compiling
        if config.kernels.dynamic_shapes is True:
            raise ConfigError("kernels.dynamic_shapes", True, "needs kernels.compile, which ZeRO stage 3 turns off; "
                                                              "set it to auto or false")
        choice = dataclasses.replace(choice, dynamic_shapes=False)
    return choice  # CUDA graphs: build_engine keeps them to ZeRO stage 0


def _build_optimizer(model: Any, config: Config, fused_adam: bool, offload: bool) -> tuple[Any, str]:
    """AdamW with weight decay on matrices only (biases and norm weights are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.optimizer.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = {"lr": 0.0, "betas": config.optimizer.betas, "eps": config.optimizer.eps}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs), "DeepSpeedCPUAdam (ZeRO-Offload)"
    if fused_adam:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs), "DeepSpeed FusedAdam"
    return torch.optim.AdamW(groups, **kwargs), "torch AdamW"
