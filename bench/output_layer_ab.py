"""The output layer and its loss alone at GPT-2 124M's shape on one GPU: forward and backward of
``hidden [65536, 768] @ weight[50304, 768].T`` and the mean cross-entropy, compiled, under bf16 autocast as
``train`` runs them, three ways: the plain loss, the loss's gradient made in the forward (``HeadCrossEntropy``,
the default on CUDA) and the FP8 output layer (docs/BENCHMARKS.md, "The loss's gradient in the forward" and "The
output layer in FP8"):

    PYTHONPATH=. python3 bench/output_layer_ab.py OUT.json

For each variant: ms per call (20 timed after 3), peak memory, the loss and both gradients against the plain loss,
and the GPU time of its ten largest kernels in one profiled call. (The FP8 section's run kept the first variant's
gradients on the GPU, 0.33 GiB in the FP8 variant's peak, timed the FP8 layer's first version, with fast
accumulation in the input gradient too, and two variants that were not shipped.)
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

from pipeline.kernels import FP8HeadCrossEntropy, HeadCrossEntropy

TOKENS, WIDTH, VOCAB = 65536, 768, 50304
VARIANTS = {
    "stock": lambda hidden, weight, labels: F.cross_entropy(F.linear(hidden, weight).float(), labels),  # bf16
    "logits_gradient_in_forward": lambda hidden, weight, labels: HeadCrossEntropy.apply(hidden, weight, labels),
    "fp8_head": lambda hidden, weight, labels: FP8HeadCrossEntropy.apply(hidden, weight, labels),
}


def main(out_path: str) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, WIDTH, device="cuda", requires_grad=True)  # fp32, as a LayerNorm gives it
    weight = (torch.randn(VOCAB, WIDTH, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    report, reference = {}, None
    for name, loss_fn in VARIANTS.items():
        compiled = torch.compile(loss_fn)

        def call() -> torch.Tensor:
            with torch.autocast("cuda", torch.bfloat16):
                loss = compiled(hidden, weight, labels)
            loss.backward()
            return loss

        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        for _ in range(3):
            call()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(20):
            loss = call()
        end.record()
        torch.cuda.synchronize()
        grads = (hidden.grad / 20).cpu(), (weight.grad / 20).cpu()  # off the GPU: not in the next peak
        hidden.grad = weight.grad = None
        row = {"ms": round(begin.elapsed_time(end) / 20, 3), "compile_s": round(compile_s, 1), "loss": loss.item(),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if reference is None:
            reference = (loss.item(), *grads)
        else:
            row["loss_diff"] = loss.item() - reference[0]
            row["grad_hidden_rel"] = ((grads[0] - reference[1]).norm() / reference[1].norm()).item()
            row["grad_weight_rel"] = ((grads[1] - reference[2]).norm() / reference[2].norm()).item()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            call()
            torch.cuda.synchronize()
        hidden.grad = weight.grad = None
        kernels = sorted(((event.key, event.device_time_total / 1000) for event in profile.key_averages()),
                         key=lambda kernel: -kernel[1])
        row["kernels_ms"] = {key[:110]: round(ms, 3) for key, ms in kernels[:10]}
        report[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
