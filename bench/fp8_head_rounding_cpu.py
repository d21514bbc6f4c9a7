"""Does the FP8 output layer's rounding alone cost held-out loss? A small study on the CPU (docs/BENCHMARKS.md, "The
output layer in FP8"): a tiny GPT-2 (4 layers, d_model 128, tied embeddings, its 16,384-way output layer padded
from the embedded corpus' 4,096 tokens) trained on data/python-stdlib, 600 steps of 8 x 256 tokens, AdamW at 3e-3
(warm-up 30, cosine to 0.1x), clipping 1.0, with one of three output layers:

    bf16           bf16 operands, fp32 accumulation, bf16 logits, the loss in fp32 (``train``'s forward under
                   autocast; the backward here keeps the logits' gradient in fp32 where autocast rounds it to bf16)
    fp8            ``FP8HeadCrossEntropy``'s arithmetic: e4m3 operands with one scale each, the gradient of the
                   logits in e5m2 with its fixed scale, every sum accumulated exactly (as the CPU does)
    fp8-fastaccum  the same, with the input gradient's sum over the vocabulary in a model of accumulation without
                   promotion (the layer's first version used fast accumulation there): a running sum cut toward
                   zero to 13 mantissa bits after every 32 products

    PYTHONPATH=. python3 bench/fp8_head_rounding_cpu.py VARIANT SEED OUT.json   # 20-30 min on one core
    PYTHONPATH=. python3 bench/fp8_head_rounding_cpu.py gradients OUT.json        # 1 min

``gradients`` compares the gradients with ``bench/output_layer_ab.py``'s inputs (GPT-2 124M's output layer, 1,024
tokens here) against its reference, the output layer under bf16 autocast: exact accumulation, and the model of fast
accumulation, beside what that script measured on an H200 with the layer's first version.

The matmuls run in fp32 on values already rounded to their format, which gives the exact-accumulation result
(the CPU's own bf16 and FP8 matmuls are several times slower); the script first checks that its ``fp8`` layer
gives the committed class's loss and gradients bit for bit. Evaluations (12 x 2,048 held-out tokens every 50
steps) go through the bf16 and the FP8 layer both. The fast-accumulation variant is a model: how Hopper's tensor
cores accumulate FP8 products is not documented to the bit, and the input-gradient error the H200 gave in
``bench/output_layer_ab.py`` is smaller than the model's in ``gradients``.
"""
import json
import math
import sys
import time
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.data import load_tokens
from pipeline.kernels import GRADIENT_SCALE, FP8HeadCrossEntropy, _to_e4m3

VOCAB, WIDTH, LAYERS, SEQ_LEN, BATCH = 16384, 128, 4, 256, 8
STEPS, LR, WARMUP, EVAL_EVERY, EVAL_BATCHES = 600, 3e-3, 30, 50, 12
DATA = "data/python-stdlib"
VARIANTS = ("bf16", "fp8", "fp8-fastaccum")


def bf16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.bfloat16().float()


def truncated_matmul(a: torch.Tensor, b: torch.Tensor, group: int = 32, mantissa_bits: int = 13) -> torch.Tensor:
    """``a @ b`` with the running sum cut toward zero to ``mantissa_bits`` after each ``group`` products along the
    summed dimension (fp32 has 23: the low 10 bits are cleared)."""
    mask = ~((1 << (23 - mantissa_bits)) - 1)
    total = torch.zeros(a.shape[0], b.shape[1])
    for k in range(0, a.shape[1], group):
        total = ((total + a[:, k:k + group] @ b[k:k + group]).view(torch.int32) & mask).view(torch.float32)
    return total


class EmulatedFP8Head(torch.autograd.Function):
    """``FP8HeadCrossEntropy`` in fp32 arithmetic on FP8-rounded values; ``fast_accumulation`` sums the input
    gradient with ``truncated_matmul``."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                fast_accumulation: bool) -> torch.Tensor:
        hidden8, hidden_scale = _to_e4m3(hidden)
        weight8, weight_scale = _to_e4m3(weight)
        hidden_q, weight_q = hidden8.float() * hidden_scale, weight8.float() * weight_scale
        logits = (hidden_q @ weight_q.t()).bfloat16()
        lse = torch.logsumexp(logits.float(), dim=-1)
        ctx.fast_accumulation = fast_accumulation
        ctx.save_for_backward(hidden_q, weight_q, logits, labels, lse)
        return (lse - logits.gather(-1, labels[:, None]).squeeze(-1).float()).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        hidden_q, weight_q, logits, labels, lse = ctx.saved_tensors
        softmax_minus_one_hot = torch.exp(logits.float() - lse[:, None]) - F.one_hot(labels, logits.shape[-1])
        scaled = (softmax_minus_one_hot * GRADIENT_SCALE).to(torch.float8_e5m2).float()
        grad_hidden = (truncated_matmul(scaled, weight_q) if ctx.fast_accumulation else scaled @ weight_q)
        factor = grad / (logits.shape[0] * GRADIENT_SCALE)
        return bf16(grad_hidden * factor), scaled.t() @ hidden_q * factor, None, None


def loss_of(model: GPT2LMHeadModel, input_ids: torch.Tensor, labels: torch.Tensor, variant: str) -> torch.Tensor:
    hidden = model.transformer(input_ids=input_ids).last_hidden_state.flatten(0, 1)
    weight, labels = model.lm_head.weight, labels.flatten()
    if variant == "bf16":
        return F.cross_entropy((bf16(hidden) @ bf16(weight).t()).bfloat16().float(), labels)
    return EmulatedFP8Head.apply(hidden, weight, labels, variant == "fp8-fastaccum")


def check_emulation() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(64, WIDTH, requires_grad=True)
    weight = (torch.randn(VOCAB, WIDTH) * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (64,))
    committed = FP8HeadCrossEntropy.apply(hidden, weight, labels)
    emulated = EmulatedFP8Head.apply(hidden, weight, labels, False)
    pairs = zip(torch.autograd.grad(committed, (hidden, weight)), torch.autograd.grad(emulated, (hidden, weight)))
    if committed.item() != emulated.item() or not all(torch.equal(a, b) for a, b in pairs):
        sys.exit("the emulated FP8 layer does not match FP8HeadCrossEntropy")


def gradient_errors(out_path: str, tokens: int = 1024, width: int = 768, vocab: int = 50304) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    hidden, weight = torch.randn(tokens, width), torch.randn(vocab, width) * 0.02
    labels = torch.randint(0, vocab, (tokens,))
    hidden_b, weight_b = bf16(hidden), bf16(weight)  # autocast's casts, and its bf16 gradient and outputs
    logits = bf16(hidden_b @ weight_b.t())
    grad_logits = bf16((torch.softmax(logits, -1) - F.one_hot(labels, vocab)) / tokens)
    reference = bf16(grad_logits @ weight_b), bf16(grad_logits.t() @ hidden_b)

    def relative(grad: torch.Tensor, ref: torch.Tensor) -> float:
        return ((grad - ref).norm() / ref.norm()).item()

    def fp8_gradients(fast_accumulation: bool) -> tuple[torch.Tensor, torch.Tensor]:
        leaves = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        return torch.autograd.grad(EmulatedFP8Head.apply(*leaves, labels, fast_accumulation), leaves)

    exact, fast = fp8_gradients(False), fp8_gradients(True)
    report = {"shape": f"hidden [{tokens}, {width}], weight [{vocab}, {width}], random as in output_layer_ab.py",
              "grad_hidden_rel": {"exact": relative(exact[0], reference[0]),
                                  "fast_accumulation_model": relative(fast[0], reference[0])},
              "grad_weight_rel": {"exact": relative(exact[1], reference[1])}}
    print(json.dumps(report, indent=1))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def windows(tokens: np.ndarray, starts: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.stack([tokens[s:s + SEQ_LEN + 1].astype(np.int64) for s in starts]))
    return rows[:, :-1], rows[:, 1:]


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP))))


def main(variant: str, seed: int, out_path: str) -> None:
    torch.set_num_threads(1)  # before the check: with two threads its sums now and then differ by an ulp
    check_emulation()
    torch.manual_seed(seed)
    train, held_out = load_tokens(DATA, "train"), load_tokens(DATA, "val")
    eval_batches = [windows(held_out, range(i * SEQ_LEN * BATCH, (i + 1) * SEQ_LEN * BATCH, SEQ_LEN))
                    for i in range(EVAL_BATCHES)]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_positions=SEQ_LEN,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0}],
                                  lr=LR, betas=(0.9, 0.95))
    rng, evals, train_losses, start = np.random.default_rng(seed), [], [], time.time()
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_of(model, *windows(train, rng.integers(0, len(train) - SEQ_LEN - 1, BATCH)), variant)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_losses.append(round(loss.item(), 4))
        if (step + 1) % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                held_out_loss = {f"eval_{layer}": float(np.mean([loss_of(model, x, y, layer).item()
                                                                 for x, y in eval_batches]))
                                 for layer in ("bf16", "fp8")}
            model.train()
            evals.append({"step": step + 1, "train_loss": loss.item(), "grad_norm": grad_norm.item(),
                         **held_out_loss, "elapsed_s": round(time.time() - start, 1)})
            print(variant, evals[-1], flush=True)
    with open(out_path, "w") as f:
        json.dump({"variant": variant, "seed": seed, "evals": evals, "train_losses": train_losses}, f)


if __name__ == "__main__":
    if sys.argv[1] == "gradients":
        gradient_errors(sys.argv[2])
    elif sys.argv[1] in VARIANTS:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(f"variant {sys.argv[1]!r}: must be gradients or one of {', '.join(VARIANTS)}")
