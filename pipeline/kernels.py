"""Fused kernels, one switch each, and the module the DeepSpeed engine wraps (the model plus its loss).

Switches (``kernels`` section): ``auto`` uses a kernel where it can run and says once in the log when it cannot;
``true`` makes it required (bad input where it cannot run); ``false`` never uses it.

- ``fused_adam``: DeepSpeed's FusedAdam (CUDA; JIT-built). Fallback: ``torch.optim.AdamW``.
- ``fused_cross_entropy``: Liger's fused linear cross-entropy, for any decoder: the loss comes from the last
  hidden states and the output embedding chunk by chunk, so the ``tokens x vocab`` logits (3.3 GB in bf16 for
  32 x 1024 tokens of GPT-2's 50,304-way vocabulary) are never materialised. It runs beside the compiled region:
  ``torch.compile`` takes the decoder body, the loss stays eager (Liger's Triton kernels do not trace under
  dynamo). CUDA only.
- ``liger``: Liger's Triton kernels inside Llama blocks (RMSNorm, SwiGLU, RoPE). Llama only, CUDA only, and not
  under ``compile`` in ``auto`` (they break the graph; Inductor fuses these operations itself).
- ``apex``: NVIDIA apex's fused RMSNorm / LayerNorm, swapped in when apex is importable (it is not on PyPI); in
  ``auto`` not under ``compile``.
- ``compile``: ``torch.compile``: one training graph per distinct (micro-batch, seq_len), or with
  ``dynamic_shapes`` one whose stage-varying sizes are symbolic, and one for evaluation, all built before step 0
  (``pipeline.engine``); ``cuda_graphs`` replays them as CUDA graphs, one per shape (Inductor's CUDA graph trees,
  torch.compile's ``reduce-overhead``); ``coordinate_descent_tuning`` lets Inductor search the block sizes of its
  generated kernels.
Attention is PyTorch SDPA with ``is_causal=True`` in every configuration (``pipeline.model``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from curriculum.config import KernelsConfig
from curriculum.errors import ConfigError


@dataclass(frozen=True)
class KernelChoice:
    """What a run uses, and a note for each ``auto`` kernel that fell back."""

    fused_adam: bool
    liger: bool
    apex: bool
    compile: bool
    notes: tuple[str, ...] = field(default=())
    fused_cross_entropy: bool = False
    cuda_graphs: bool = False
    coordinate_descent_tuning: bool = False
    dynamic_shapes: bool = False


def importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a dotted name whose parent is missing too)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # raised for ``a.b`` when ``a`` itself is missing
        return False


def choose_kernels(config: KernelsConfig, arch: str, on_cuda: bool,
                   is_importable: Callable[[str], bool] = importable) -> KernelChoice:
    """Resolve the switches for this machine and model architecture."""
    notes: list[str] = []

    def pick(name: str, switch: Union[str, bool], missing: Optional[str]) -> bool:
        if switch is False:
            return False
        if missing is None:
            return True
        if switch is True:
            raise ConfigError(f"kernels.{name}", True, f"required but unavailable: {missing}")
        notes.append(f"kernels.{name}: not used ({missing})")
        return False

    no_liger = "liger-kernel is not installed (pip install liger-kernel)"
    fused_adam = pick("fused_adam", config.fused_adam, None if on_cuda else "needs CUDA; using torch AdamW")
    liger_missing = ("needs CUDA" if not on_cuda else no_liger if not is_importable("liger_kernel")
                     else "only for arch: llama" if arch != "llama"
                     else "its Triton kernels break torch.compile's graph; Inductor fuses RMSNorm, SwiGLU and RoPE"
                     if config.compile is not False and config.liger == "auto" else None)
    liger = pick("liger", config.liger, liger_missing)
    apex_missing = ("needs CUDA" if not on_cuda else "apex is not importable (NVIDIA apex is built from source; "
                    "the PyPI package named apex is unrelated)" if not is_importable("apex.normalization")
                    else "Liger's RMSNorm is used instead" if liger
                    else "its fused norms break torch.compile's graph; Inductor fuses norms itself"
                    if config.compile is not False and config.apex == "auto" else None)
    apex = pick("apex", config.apex, apex_missing)
    fused_ce = pick("fused_cross_entropy", config.fused_cross_entropy,
                    "needs CUDA" if not on_cuda else no_liger if not is_importable("liger_kernel") else None)
    compile = config.compile is True or (config.compile == "auto" and on_cuda)  # auto: not on a CPU (too slow)
    if config.cuda_graphs is True and not (on_cuda and compile):
        raise ConfigError("kernels.cuda_graphs", True, "needs CUDA and kernels.compile")
    cuda_graphs = config.cuda_graphs is True or (config.cuda_graphs == "auto" and on_cuda and compile)
    if config.dynamic_shapes is True and not compile:
        raise ConfigError("kernels.dynamic_shapes", True, "needs kernels.compile (true, or auto on CUDA)")
    if config.coordinate_descent_tuning and not (compile and config.compile_backend == "inductor"):
        raise ConfigError("kernels.coordinate_descent_tuning", True,
                          "needs kernels.compile (true, or auto on CUDA) with compile_backend: inductor")
    return KernelChoice(fused_adam, liger, apex, compile, tuple(notes), fused_ce, cuda_graphs,
                        config.coordinate_descent_tuning, compile and config.dynamic_shapes is not False)


def patch_model_classes(choice: KernelChoice) -> None:
    """Swap in Liger's Llama kernels (before the model is built: Liger patches the transformers classes)."""
    if choice.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # the loss is computed in CausalLMWithLoss, so the model's own forward stays as transformers wrote it
        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def swap_apex_norms(model: Any) -> int:
    """Replace RMSNorm / LayerNorm modules with apex's fused ones, weights kept; returns how many."""
    from apex.normalization import FusedLayerNorm, FusedRMSNorm

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps)
            elif type(child).__name__.endswith("RMSNorm"):
                eps = getattr(child, "variance_epsilon", getattr(child, "eps", 1e-6))
                fused = FusedRMSNorm(child.weight.shape, eps=eps)
            else:
                continue
            fused.load_state_dict(child.state_dict(), strict=False)
            setattr(parent, name, fused.to(child.weight.device, child.weight.dtype))
            swapped += 1
    return swapped


class CausalLMWithLoss(torch.nn.Module):
    """The module the engine trains: ``forward(input_ids, labels) -> mean loss`` (labels already shifted).

    With the fused linear cross-entropy the loss comes from the decoder's last hidden states and the output
    embedding, chunk by chunk, accumulated in fp32; otherwise from the full logits, in fp32. ``compiled_part``
    is what ``torch.compile`` takes: the whole module, or the decoder body when the loss is fused.
    """

    def __init__(self, lm: torch.nn.Module, fused_cross_entropy: bool) -> None:
        super().__init__()
        self.lm = lm
        self.fused: Optional[torch.nn.Module] = None
        if fused_cross_entropy:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)

    @property
    def compiled_part(self) -> torch.nn.Module:
        return self.lm.base_model if self.fused is not None else self

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.fused is None:
            logits = self.lm(input_ids=input_ids).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        hidden = self.lm.base_model(input_ids=input_ids).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        if torch.is_autocast_enabled(hidden.device.type):  # bf16 logits chunks, as the unfused matmul would give
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return self.fused(weight, hidden.flatten(0, 1), labels.flatten())
