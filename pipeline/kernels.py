"""Fused kernels, one switch each, and the module the DeepSpeed engine wraps (the model plus its loss).

Switches (``kernels`` section): ``auto`` uses a kernel where it can run and says once in the log when it cannot;
``true`` makes it required (bad input where it cannot run); ``false`` never uses it.

- ``fused_adam``: DeepSpeed's FusedAdam (CUDA; JIT-built). Fallback: ``torch.optim.AdamW``.
- ``liger``: Liger's Triton kernels for Llama blocks (RMSNorm, SwiGLU, RoPE) and its fused linear cross-entropy,
  which computes the loss from the last hidden states in chunks so the ``tokens x vocab`` logits are never
  materialised. Llama only, CUDA only. Fallback: the transformers modules and a plain cross-entropy.
- ``apex``: NVIDIA apex's fused RMSNorm / LayerNorm, swapped in when apex is importable (it is not on PyPI).
- ``compile``: ``torch.compile`` of the model with static shapes: one compile per distinct (micro-batch, seq_len),
  the set of which ``plan`` knows in advance (``Schedule.distinct_shapes``); ``compile_warmup`` compiles them all
  before step 0 so no stage switch pays for it during training.
Attention is PyTorch SDPA (flash attention on GPUs that have it) in every configuration.
"""

from __future__ import annotations

import importlib.util
import time
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

    fused_adam = pick("fused_adam", config.fused_adam, None if on_cuda else "needs CUDA; using torch AdamW")
    liger_missing = ("needs CUDA" if not on_cuda else "liger-kernel is not installed (pip install liger-kernel)"
                     if not is_importable("liger_kernel") else "only for arch: llama" if arch != "llama" else None)
    liger = pick("liger", config.liger, liger_missing)
    apex_missing = ("needs CUDA" if not on_cuda else "apex is not importable (NVIDIA apex is built from source; "
                    "the PyPI package named apex is unrelated)" if not is_importable("apex.normalization")
                    else "Liger's RMSNorm is used instead" if liger else None)
    apex = pick("apex", config.apex, apex_missing)
    return KernelChoice(fused_adam, liger, apex, config.compile, tuple(notes))


def patch_model_classes(choice: KernelChoice, arch: str) -> None:
    """Swap in Liger's Llama kernels (before the model is built: Liger patches the transformers classes)."""
    if choice.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # the loss is fused here, in CausalLMWithLoss, so the model's own forward stays as transformers wrote it
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

    With Liger's fused linear cross-entropy the loss comes from the decoder's last hidden states and the output
    embedding, chunk by chunk; otherwise from the full logits, in fp32.
    """

    def __init__(self, lm: torch.nn.Module, fused_cross_entropy: bool) -> None:
        super().__init__()
        self.lm = lm
        self.fused: Optional[torch.nn.Module] = None
        if fused_cross_entropy:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.fused is None:
            logits = self.lm(input_ids=input_ids).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        hidden = self.lm.base_model(input_ids=input_ids).last_hidden_state
        return self.fused(self.lm.get_output_embeddings().weight, hidden.flatten(0, 1), labels.flatten())


def compile_engine(engine: Any, shapes: list[tuple[int, int]]) -> None:
    """``torch.compile`` with static shapes, allowed one graph per shape of the run (dynamo's default limit of 8
    recompiles would otherwise send later stages back to eager)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(8, 2 * len(shapes))
    engine.compile(compile_kwargs={"dynamic": False})


def warm_up_shapes(engine: Any, shapes: list[tuple[int, int]], vocab_size: int, device: Any) -> dict[str, float]:
    """Run forward + backward once per shape on random tokens so every compile happens before step 0; the
    gradients are dropped. Returns seconds per shape."""
    seconds = {}
    for micro_batch, seq_len in shapes:
        start = time.perf_counter()
        tokens = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), device=device)
        engine.set_gradient_accumulation_boundary(False)
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[f"{micro_batch}x{seq_len}"] = time.perf_counter() - start
    engine.optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
    return seconds
