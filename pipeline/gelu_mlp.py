"""GPT-2's MLP with its GELU inside the matmuls (``kernels.fused_mlp``).

Inductor calls cuBLAS for a block's matmuls and fuses only around them, so GPT-2's tanh GELU and its gradient are
two passes of their own over the 4x-wide activations (26.0 and 35.3 ms of a 960.9 ms step of GPT-2 124M at 1024 on
an H200). Here cuBLASLt does them in the matmuls' epilogues, as TransformerEngine and apex's fused dense do:

- forward, ``c_fc``: one matmul writes ``gelu(x @ w + b)`` and keeps ``x @ w + b`` for the backward
  (``GELU_AUX_BIAS``);
- backward, ``c_proj``'s input gradient: one matmul multiplies it by ``gelu'`` of that saved pre-activation
  (``DGELU``); ``c_fc``'s bias gradient is its sum over the tokens, apart (cuBLASLt's ``DGELU_BGRAD``, which sums
  in the matmul, took 2.4x as long).

The first call of each shape times cuBLASLt's candidate algorithms and keeps the fastest (outside CUDA graph
capture). On an H200, GPT-2 124M's MLP forward and backward on 65,536 tokens took 3.44 ms against 3.74 ms compiled
from transformers' (``bench/gelu_mlp_ab.py``).

The two operators (``torch.ops.curriculum_pretrain.gelu_up`` / ``dgelu_down``) are kept whole by
``torch.compile``; on CUDA they run ``csrc/gelu_mlp.cpp``, built on first use with torch's C++ extension loader
(a host compiler and the CUDA toolkit's headers, as DeepSpeed's FusedAdam needs), elsewhere the same arithmetic
in torch (the CPU tests use it). bf16 only: the run's autocast dtype or DeepSpeed's bf16 weights.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import library


@functools.cache
def extension() -> Any:
    """The compiled ``csrc/gelu_mlp.cpp`` (built once per machine into torch's extension cache)."""
    from torch.utils.cpp_extension import load

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "gelu_mlp.cpp")
    return load(name="curriculum_pretrain_gelu_mlp", sources=[source], extra_ldflags=["-lcublasLt"],
                with_cuda=True, extra_cflags=["-O2"], verbose=False)


def _check(**tensors: torch.Tensor) -> None:
    """What the cuBLASLt calls assume (they do not check): contiguous bf16 on one CUDA device."""
    for name, tensor in tensors.items():
        if tensor.dtype != torch.bfloat16 or not tensor.is_contiguous() or not tensor.is_cuda:
            raise ValueError(f"{name}: needs a contiguous bf16 CUDA tensor, got {tensor.dtype} {tuple(tensor.shape)} "
                             f"strides {tensor.stride()} on {tensor.device}")


@library.custom_op("curriculum_pretrain::gelu_up", mutates_args=())
def gelu_up(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gelu(x @ w + b)`` and ``x @ w + b`` (``x`` ``[tokens, width]``, ``w`` ``[width, features]``, bf16)."""
    if x.shape[1] != w.shape[0] or b.shape != (w.shape[1],):
        raise ValueError(f"gelu_up: x {tuple(x.shape)}, w {tuple(w.shape)} and b {tuple(b.shape)} do not match")
    if x.is_cuda:
        _check(x=x, w=w, b=b)
        act, pre = extension().gelu_up(x, w, b)
        return act, pre
    pre = torch.addmm(b.float(), x.float(), w.float())
    return F.gelu(pre, approximate="tanh").to(x.dtype), pre.to(x.dtype)


@gelu_up.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], w.shape[1]), x.new_empty(x.shape[0], w.shape[1])


@library.custom_op("curriculum_pretrain::dgelu_down", mutates_args=())
def dgelu_down(g: torch.Tensor, w: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The gradient of ``gelu(pre) @ w`` with respect to ``pre``, given ``g``, the gradient of its result
    (``g`` ``[tokens, width]``, ``w`` ``[features, width]``, ``pre`` ``[tokens, features]``, bf16)."""
    if g.shape[1] != w.shape[1] or pre.shape != (g.shape[0], w.shape[0]):
        raise ValueError(f"dgelu_down: g {tuple(g.shape)}, w {tuple(w.shape)} and pre {tuple(pre.shape)} do not "
                         "match")
    if g.is_cuda:
        _check(g=g, w=w, pre=pre)
        return extension().dgelu_down(g, w, pre)
    grad_pre = torch.ops.aten.gelu_backward(g.float() @ w.float().t(), pre.float(), approximate="tanh")
    return grad_pre.to(g.dtype)


@dgelu_down.register_fake
def _(g: torch.Tensor, w: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return g.new_empty(pre.shape)


class _GeluMLP(torch.autograd.Function):
    """``gelu(x @ w_fc + b_fc) @ w_proj + b_proj`` on 2-D bf16 inputs, the GELU in the matmuls both ways."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor, w_proj: torch.Tensor,
                b_proj: torch.Tensor) -> torch.Tensor:
        act, pre = torch.ops.curriculum_pretrain.gelu_up(x, w_fc, b_fc)
        ctx.save_for_backward(x, w_fc, w_proj, act, pre)
        return torch.addmm(b_proj, act, w_proj)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, w_fc, w_proj, act, pre = ctx.saved_tensors
        grad = grad.contiguous()
        grad_pre = torch.ops.curriculum_pretrain.dgelu_down(grad, w_proj, pre)
        return grad_pre @ w_fc.t(), x.t() @ grad_pre, grad_pre.sum(0), act.t() @ grad, grad.sum(0)


def gelu_mlp_forward(mlp: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``GPT2MLP.forward`` through ``_GeluMLP``: the input and weights in the autocast dtype (bf16), the output
    in it too, as the autocast matmul's would be; dropout after, as GPT-2 has it."""
    on = torch.is_autocast_enabled(hidden_states.device.type)
    dtype = torch.get_autocast_dtype(hidden_states.device.type) if on else hidden_states.dtype
    shape = hidden_states.shape
    out = _GeluMLP.apply(hidden_states.reshape(-1, shape[-1]).to(dtype).contiguous(), mlp.c_fc.weight.to(dtype),
                         mlp.c_fc.bias.to(dtype), mlp.c_proj.weight.to(dtype), mlp.c_proj.bias.to(dtype))
    return mlp.dropout(out.view(*shape[:-1], out.shape[-1]))


def fuse_gelu_mlps(model: Any) -> int:
    """Route every ``GPT2MLP`` of ``model`` through ``gelu_mlp_forward`` (the modules and their weights stay, so
    checkpoints and exports are unchanged); returns how many."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlps = [module for module in model.modules() if isinstance(module, GPT2MLP)]
    for mlp in mlps:
        mlp.forward = functools.partial(gelu_mlp_forward, mlp)
    return len(mlps)
