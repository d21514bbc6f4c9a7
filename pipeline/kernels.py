"""Fused kernels, one switch each, and the module the DeepSpeed engine wraps (the model plus its loss).

Switches (``kernels`` section): ``auto`` uses a kernel where it can run and says once in the log when it cannot;
``true`` makes it required (bad input where it cannot run); ``false`` never uses it.

- ``fused_adam``: DeepSpeed's FusedAdam (CUDA; JIT-built). Fallback: ``torch.optim.AdamW``.
- ``fused_cross_entropy``: Liger's fused linear cross-entropy, for any decoder: the loss comes from the last
  hidden states and the output embedding chunk by chunk, so the ``tokens x vocab`` logits (3.3 GB in bf16 for
  32 x 1024 tokens of GPT-2's 50,304-way vocabulary) are never materialised. It runs beside the compiled region:
  ``torch.compile`` takes the decoder body, the loss stays eager (Liger's Triton kernels do not trace under
  dynamo). CUDA only.
- ``fp8_lm_head``: the output layer's three matmuls in FP8 (``torch._scaled_mm``; its input and weight in e4m3
  with one scale per tensor from the largest magnitude, the logits' gradient in e5m2) inside the compiled region,
  the loss from its bf16 logits in fp32. NVIDIA GPUs with FP8 tensor cores (compute capability 8.9 or newer).
- ``logits_gradient_in_forward``: the model's own output layer with its loss's gradient made in the forward pass,
  while the logits are read for the loss, and written over them (``HeadCrossEntropy``; on CUDA one Triton kernel,
  ``pipeline.triton_kernels``, in place of the two Inductor generates for the loss and its gradient). ``auto``: on
  CUDA (on the CPU its torch form was slower). Not under ZeRO stage 3 (it reads the output embedding outside its
  module).
- ``fused_mlp``: GPT-2's MLP with its tanh GELU in cuBLASLt's matmul epilogues, forward and backward
  (``pipeline.gelu_mlp``; a C++ extension built on first use). ``auto``: on CUDA, GPT-2 with ``gelu_new``, bf16.
  Not under ZeRO stage 3 (it reads the MLP's weights outside their modules).
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
    fp8_lm_head: bool = False
    logits_gradient_in_forward: bool = False
    fused_mlp: bool = False


def importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a dotted name whose parent is missing too)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # raised for ``a.b`` when ``a`` itself is missing
        return False


def choose_kernels(config: KernelsConfig, arch: str, on_cuda: bool,
                   is_importable: Callable[[str], bool] = importable, fp8_matmuls: bool = False,
                   fp8_shapes: Optional[str] = None, mlp_problem: Optional[str] = None) -> KernelChoice:
    """Resolve the switches for this machine and model architecture (``fp8_matmuls``: the GPU has FP8 tensor
    cores; ``fp8_shapes``: why the model's width and vocabulary do not fit them, ``fp8_shape_problem``;
    ``mlp_problem``: why its MLP cannot have the GELU in its matmuls, ``gelu_mlp_problem``)."""
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
    no_fp8 = "needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer)" if not fp8_matmuls \
        else fp8_shapes
    fp8_asked = config.fp8_lm_head is True and no_fp8 is None
    if fp8_asked and config.fused_cross_entropy is True:
        raise ConfigError("kernels.fp8_lm_head", True, "computes the loss itself; set kernels.fused_cross_entropy "
                                                       "to false")
    fused_ce = pick("fused_cross_entropy", config.fused_cross_entropy,
                    "needs CUDA" if not on_cuda else no_liger if not is_importable("liger_kernel")
                    else "kernels.fp8_lm_head computes the loss" if fp8_asked else None)
    fp8_lm_head = pick("fp8_lm_head", config.fp8_lm_head,
                       no_fp8 or ("kernels.fused_cross_entropy computes the loss" if fused_ce else None))
    logits_gradient = (on_cuda or config.logits_gradient_in_forward is True) and pick(  # auto: on CUDA only
        "logits_gradient_in_forward", config.logits_gradient_in_forward,
        "kernels.fused_cross_entropy computes the loss" if fused_ce else "kernels.fp8_lm_head computes the loss"
        if fp8_lm_head else "needs Triton on CUDA (torch's CUDA builds bring it)"
        if on_cuda and not is_importable("triton") else None)
    fused_mlp = pick("fused_mlp", config.fused_mlp, "needs CUDA" if not on_cuda else mlp_problem)
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
                        config.coordinate_descent_tuning, compile and config.dynamic_shapes is not False,
                        fp8_lm_head, logits_gradient, fused_mlp)


def fp8_shape_problem(hidden_size: int, vocab_size: int) -> Optional[str]:
    """Why the FP8 output layer cannot run this model, or None: cuBLAS's FP8 matmuls need the dimensions they sum
    over and the second operand's to be multiples of 16: the width and the vocabulary (a micro-batch's token count
    is padded to one in the backward, ``FP8HeadCrossEntropy``)."""
    return _not_multiples_of(16, (("hidden size", hidden_size), ("vocabulary", vocab_size)))


def _not_multiples_of(multiple: int, sizes: tuple[tuple[str, int], ...]) -> Optional[str]:
    """``needs multiples of N, got ...`` naming each of the ``(name, size)`` pairs that is not one, or None."""
    odd = [f"{name} {size}" for name, size in sizes if size % multiple]
    return f"needs multiples of {multiple}, got {' and '.join(odd)}" if odd else None


def gelu_mlp_problem(arch: str, fields: dict[str, Any], precision: str) -> Optional[str]:
    """Why ``kernels.fused_mlp`` cannot run this model, or None (``fields``: its transformers config fields): GPT-2's
    MLP, the tanh GELU that cuBLASLt's epilogues compute, bf16, and a width and an inner size in multiples of 8
    (cuBLASLt's 16-byte alignment)."""
    if arch != "gpt2":
        return "GPT-2's MLP only (cuBLASLt's epilogues have GELU, not SwiGLU)"
    if precision == "fp32":
        return "needs run.precision bf16 or bf16-autocast"
    activation = fields.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"activation_function {activation!r} is not the tanh GELU (gelu_new) that cuBLASLt computes"
    width = fields["n_embd"]
    return _not_multiples_of(8, (("width", width), ("inner size", fields.get("n_inner") or 4 * width)))


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


E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn``: each FP8 input is scaled so that its largest magnitude lands here."""
GRADIENT_SCALE = 2.0**15
"""The logits' gradient before its ``1 / tokens`` factor, ``softmax - one_hot``, lies in [-1, 1]: times 2^15 it
stays under ``float8_e5m2``'s largest 57,344 and keeps values down to 2^-31 (e5m2's smallest is 2^-16), so it
needs no scale measured at run time."""


def _log_sum_exp_and_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp and cross-entropy, in fp32."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return lse, lse - logits.gather(-1, labels[:, None]).squeeze(-1).float()


def _softmax_minus_one_hot(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The gradient of each row's cross-entropy with respect to its logits, in fp32 (``lse``: the rows'
    log-sum-exp): every entry in [-1, 1]."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    return torch.exp(logits.float() - lse[:, None]) - (labels[:, None] == vocab).float()


def _to_e4m3(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` in ``float8_e4m3fn`` scaled to its largest magnitude, and the fp32 scale that undoes it."""
    scale = tensor.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (tensor.detach() / scale).to(torch.float8_e4m3fn), scale


def _column_major(tensor: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column by column: the layout ``torch._scaled_mm`` wants its second operand in."""
    return tensor.t().contiguous().t()


class FP8HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden [tokens, d] @ weight[vocab, d].T`` with the output layer's three matmuls in FP8
    (``torch._scaled_mm``, one scale per tensor): the forward's (a sum over the width) with fast accumulation, both
    gradients' (sums over the vocabulary and over every token) with full accumulation (fast accumulation in the
    input gradient cost 0.11-0.22 in held-out loss on GPT-2 124M, full 0.008-0.023: docs/BENCHMARKS.md). The logits
    come out in bf16 and the loss is computed from them in fp32, as ``F.cross_entropy(logits.float(), labels)``
    does; their gradient goes straight into e5m2, in both layouts the two backward matmuls read (FP8 matmuls on
    Hopper take both operands contiguous along the summed dimension)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = hidden.dtype, weight.dtype
        hidden8, hidden_scale = _to_e4m3(hidden)
        weight8, weight_scale = _to_e4m3(weight)
        logits = torch._scaled_mm(hidden8, weight8.t(), scale_a=hidden_scale, scale_b=weight_scale,
                                  out_dtype=torch.bfloat16, use_fast_accum=True)
        lse, losses = _log_sum_exp_and_losses(logits, labels)
        loss = losses.mean()
        ctx.save_for_backward(hidden8, hidden_scale, weight8, weight_scale, logits, labels, lse)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        hidden8, hidden_scale, weight8, weight_scale, logits, labels, lse = ctx.saved_tensors
        # softmax - one_hot, recomputed from the bf16 logits in fp32; the transposed copy is made from the e5m2
        # tensor (1 byte an element) rather than recomputed with a strided walk over the logits
        scaled = _softmax_minus_one_hot(logits, labels, lse) * GRADIENT_SCALE
        # the weight gradient sums over the tokens, which cuBLAS wants in a multiple of 16: zero rows make up the
        # difference (none at the recipes' shapes; padded before the cast, as FP8 padding is not verified on GPUs)
        tokens = logits.shape[0]
        pad = -tokens % 16
        grad8 = (F.pad(scaled, (0, 0, 0, pad)) if pad else scaled).to(torch.float8_e5m2)
        grad8_t = grad8.t().contiguous()
        if pad:
            grad8, hidden8 = grad8[:tokens], F.pad(hidden8.float(), (0, 0, 0, pad)).to(torch.float8_e4m3fn)
        grad_scale = (grad / (tokens * GRADIENT_SCALE)).float()
        grad_hidden = torch._scaled_mm(grad8, _column_major(weight8), scale_a=grad_scale, scale_b=weight_scale,
                                       out_dtype=torch.bfloat16, use_fast_accum=False)
        grad_weight = torch._scaled_mm(grad8_t, _column_major(hidden8), scale_a=grad_scale, scale_b=hidden_scale,
                                       out_dtype=torch.float32)
        return grad_hidden.to(ctx.dtypes[0]), grad_weight.to(ctx.dtypes[1]), None


if importable("triton"):  # registers cross_entropy_rows_'s CUDA kernel (Triton comes with torch's CUDA builds)
    importlib.import_module("pipeline.triton_kernels")


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy in fp32, with ``logits`` overwritten by the loss's gradient ``softmax - one_hot``
    in their dtype. On CUDA one Triton kernel that reads each row twice and writes it once (``pipeline
    .triton_kernels``); elsewhere the same arithmetic in torch."""
    if logits.is_cuda:
        return torch.ops.curriculum_pretrain.cross_entropy_rows_(logits, labels)
    lse, losses = _log_sum_exp_and_losses(logits, labels)
    logits.copy_(_softmax_minus_one_hot(logits, labels, lse))
    return losses


class HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden [tokens, d] @ weight[vocab, d].T``, the output layer's matmuls in the autocast
    dtype (the inputs' dtype without autocast) and the loss from those logits in fp32, as
    ``F.cross_entropy(F.linear(hidden, weight).float(), labels)`` computes it, in another order: the loss's gradient
    with respect to the logits, ``softmax - one_hot``, is made in the forward, while the logits are read for the loss,
    and written over them (``cross_entropy_rows_``); the backward's matmuls read it and scale their outputs by
    ``grad / tokens`` (the same arithmetic up to rounding). Compiled, the plain loss takes two kernels (the forward
    reads the logits, the backward reads them again and writes their gradient): at GPT-2 124M's shape on an H200
    (65,536 tokens, 50,304-way vocabulary) 8.1 ms against the Triton kernel's 5.05 ms (then at 8 warps; at the 16 it
    now runs 4.80 against 5.09 ms in a later run), the output layer and its loss 30.6 ms against 27.6 ms at the same
    peak memory (docs/BENCHMARKS.md, "The loss's gradient in the forward")."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = hidden.dtype, weight.dtype
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        logits = hidden @ weight.t()
        loss = cross_entropy_rows_(logits, labels).mean()
        ctx.save_for_backward(hidden, weight, logits)  # now the gradient
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        hidden, weight, grad_logits = ctx.saved_tensors
        scale = (grad / grad_logits.shape[0]).float()
        grad_hidden = (grad_logits @ weight).float() * scale
        grad_weight = (grad_logits.t() @ hidden).float() * scale
        return grad_hidden.to(ctx.dtypes[0]), grad_weight.to(ctx.dtypes[1]), None


class CausalLMWithLoss(torch.nn.Module):
    """The module the engine trains: ``forward(input_ids, labels) -> mean loss`` (labels already shifted).

    The loss comes from the decoder's last hidden states and the output layer: through the model's own output layer,
    on fp32 logits (with ``logits_gradient_in_forward``, when gradients are on, through ``HeadCrossEntropy``: the
    same arithmetic; the output layers of GPT-2 and Llama have no bias); with ``fp8_lm_head`` through
    ``FP8HeadCrossEntropy``; with the fused linear cross-entropy chunk by chunk, accumulated in fp32.
    ``compiled_part`` is what ``torch.compile`` takes: the whole module, or the decoder body when the loss is fused.
    """

    def __init__(self, lm: torch.nn.Module, fused_cross_entropy: bool, fp8_lm_head: bool = False,
                 logits_gradient_in_forward: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.fp8_lm_head = fp8_lm_head
        self.logits_gradient_in_forward = logits_gradient_in_forward
        self.fused: Optional[torch.nn.Module] = None
        if fused_cross_entropy:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)

    @property
    def compiled_part(self) -> torch.nn.Module:
        return self.lm.base_model if self.fused is not None else self

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # no key/value cache: transformers builds one by default (``use_cache``), and filling it copies every
        # layer's keys and values each micro-batch
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
        head, labels = self.lm.get_output_embeddings(), labels.flatten()
        if self.fp8_lm_head:
            return FP8HeadCrossEntropy.apply(hidden, head.weight, labels)
        if self.fused is None:
            if self.logits_gradient_in_forward and torch.is_grad_enabled():
                return HeadCrossEntropy.apply(hidden, head.weight, labels)
            return F.cross_entropy(head(hidden).float(), labels)
        weight = head.weight
        if torch.is_autocast_enabled(hidden.device.type):  # bf16 logits chunks, as the unfused matmul would give
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return self.fused(weight, hidden, labels)
