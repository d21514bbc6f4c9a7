"""The Triton kernel behind ``HeadCrossEntropy`` on CUDA, registered as ``torch.ops.curriculum_pretrain
.cross_entropy_rows_`` (an operator ``torch.compile`` keeps whole, with any symbolic sizes, and whose in-place
write Inductor keeps in place). Imported only where Triton is (``pipeline.kernels``); checked against the torch
form of the same arithmetic on a GPU (``tests/test_kernels.py``, skipped without one)."""

import torch
import triton
import triton.language as tl
from torch import library

BLOCK = 4096
WARPS = 16
"""Logits read per iteration of a row, and warps per row: at GPT-2 124M's shape on an H200 (65,536 rows of 50,304)
the kernel took 4.80 ms (8 warps: 5.09 ms; blocks of 2,048 with 4 warps 4.78 ms, of 8,192 with 16 or 32 warps 5.23
or 6.32 ms: ``bench/loss_kernel_ab.py``), against 6.8 ms for Inductor's fusion of the same arithmetic (which also
kept the logits and their gradient at once)."""


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, loss_ptr, stride, vocab, BLOCK: tl.constexpr):
    """One program per row: the label's logit, the log-sum-exp in one pass (a running maximum and sum per lane),
    the row's loss, then ``softmax - one_hot`` written over the row in a second pass."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    target = tl.load(row_ptr + label).to(tl.float32)  # before the reductions: their barriers order it before any store
    maximum = tl.full([BLOCK], -1e30, tl.float32)  # finite: lanes past the vocabulary never give inf - inf
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_maximum = tl.maximum(maximum, x)
        total = total * tl.exp(maximum - new_maximum) + tl.exp(x - new_maximum)
        maximum = new_maximum
    row_maximum = tl.max(maximum, 0)
    lse = row_maximum + tl.log(tl.sum(total * tl.exp(maximum - row_maximum), 0))
    tl.store(loss_ptr + row, lse - target)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        gradient = tl.exp(x - lse) - (cols == label).to(tl.float32)
        tl.store(row_ptr + cols, gradient.to(logits_ptr.dtype.element_ty), mask=mask)


@library.custom_op("curriculum_pretrain::cross_entropy_rows_", mutates_args=("logits",), device_types="cuda")
def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy in fp32; ``logits`` is overwritten with ``softmax - one_hot``. Every label must be
    in ``[0, vocabulary)`` (not checked on the GPU: the pipeline's always are, it has no ignored positions)."""
    if logits.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows_ needs rows stored contiguously, got strides {logits.stride()}")
    loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    _cross_entropy_rows_kernel[(logits.shape[0],)](logits, labels, loss, logits.stride(0), logits.shape[1],
                                                   BLOCK=BLOCK, num_warps=WARPS)
    return loss


@cross_entropy_rows_.register_fake
def _(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
