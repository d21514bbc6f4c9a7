"""The loss kernel of ``kernels.logits_gradient_in_forward`` alone at GPT-2 124M's shape on one GPU (65,536 rows of
50,304 bf16 logits): ms per call for several logits per iteration (``BLOCK``) and warps per row, the shipped pair
(``pipeline/triton_kernels.py``) among them (docs/BENCHMARKS.md, "DeepSpeed's throughput timer, off"):

    PYTHONPATH=. python3 bench/loss_kernel_ab.py OUT.json

Each call first restores the logits (the kernel overwrites them); that copy is timed alone and subtracted.
"""
import json
import sys

import torch
from triton.testing import do_bench

from pipeline.triton_kernels import BLOCK, WARPS, _cross_entropy_rows_kernel

ROWS, VOCAB = 65536, 50304
SETTINGS = [(4096, 8), (4096, 16), (2048, 4), (8192, 16), (8192, 32)]  # (BLOCK, warps)


def main(out_path: str) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(ROWS, VOCAB, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (ROWS,), device="cuda")
    loss = torch.empty(ROWS, device="cuda")
    work = logits.clone()
    copy_ms = do_bench(lambda: work.copy_(logits), warmup=50, rep=300)

    def call(block: int, warps: int) -> None:
        work.copy_(logits)
        _cross_entropy_rows_kernel[(ROWS,)](work, labels, loss, work.stride(0), VOCAB, BLOCK=block, num_warps=warps)

    rows = []
    for block, warps in SETTINGS:
        ms = do_bench(lambda: call(block, warps), warmup=30, rep=200) - copy_ms
        rows.append({"block": block, "warps": warps, "ms": ms, "shipped": (block, warps) == (BLOCK, WARPS)})
        print(f"BLOCK {block:5d}, {warps:2d} warps: {ms:.3f} ms" + ("  (shipped)" if rows[-1]["shipped"] else ""))
    report = {"rows": ROWS, "vocab": VOCAB, "device": torch.cuda.get_device_name(), "copy_ms": copy_ms,
              "settings": rows}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
