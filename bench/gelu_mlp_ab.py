"""GPT-2's MLP with the GELU in cuBLASLt's epilogues (``pipeline.gelu_mlp``) against the compiled transformers MLP,
one CUDA GPU: the extension's build time, the operators' error against fp32 arithmetic from the same bf16 inputs,
each matmul's time against cuBLAS without an epilogue, and the forward + backward time of one 124M-shaped MLP
(768 -> 3072 -> 768) on 65,536 tokens under bf16 autocast, both under torch.compile.

    PYTHONPATH=. python3 bench/gelu_mlp_ab.py OUT.json
"""

import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from pipeline import gelu_mlp

TOKENS, WIDTH = 65536, 768


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def operator_errors() -> dict:
    """Each output of the two operators against the same arithmetic in fp32 from the same bf16 inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, WIDTH, device="cuda", generator=g).bfloat16()
    w = (torch.randn(WIDTH, 4 * WIDTH, device="cuda", generator=g) * 0.02).bfloat16()
    b = (torch.randn(4 * WIDTH, device="cuda", generator=g) * 0.02).bfloat16()
    act, pre = gelu_mlp.gelu_up(x, w, b)
    want_pre = torch.addmm(b.float(), x.float(), w.float())
    out = {"gelu_up.pre": relative_error(pre, want_pre),
           "gelu_up.act (tanh GELU)": relative_error(act, F.gelu(want_pre, approximate="tanh")),
           "gelu_up.act against erf GELU": relative_error(act, F.gelu(want_pre))}
    w2 = (torch.randn(4 * WIDTH, WIDTH, device="cuda", generator=g) * 0.02).bfloat16()
    grad = torch.randn(4096, WIDTH, device="cuda", generator=g).bfloat16()
    grad_pre = gelu_mlp.dgelu_down(grad, w2, pre)
    want = torch.ops.aten.gelu_backward(grad.float() @ w2.float().t(), pre.float(), approximate="tanh")
    out["dgelu_down"] = relative_error(grad_pre, want)
    return out


def time_mlp(fused: bool, steps: int = 30) -> dict:
    """Milliseconds per forward + backward of one compiled MLP, and its input's gradient for a cross-check."""
    torch.manual_seed(0)
    mlp = GPT2MLP(4 * WIDTH, GPT2Config(n_embd=WIDTH, resid_pdrop=0.0)).cuda()
    if fused:
        gelu_mlp.fuse_gelu_mlps(mlp)
    step = torch.compile(lambda x: mlp(x))
    x = torch.randn(TOKENS // 1024, 1024, WIDTH, device="cuda", requires_grad=True)
    grad = torch.randn(TOKENS // 1024, 1024, WIDTH, device="cuda")

    def run() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            out = step(x)
        out.backward(grad)

    for _ in range(3):
        run()
    x.grad = None
    for p in mlp.parameters():
        p.grad = None
    run()
    check = {"x.grad": x.grad.clone(), "c_fc.weight.grad": mlp.c_fc.weight.grad.clone(),
             "c_fc.bias.grad": mlp.c_fc.bias.grad.clone()}
    return {"ms": timed(run, steps), "grads": check}


def timed(fn, steps: int = 20) -> float:
    """Milliseconds per call of ``fn``, on the GPU's clock."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def operator_times() -> dict:
    """Milliseconds of each matmul alone at 65,536 tokens: cuBLAS without an epilogue, and the two cuBLASLt calls."""
    x = torch.randn(TOKENS, WIDTH, device="cuda").bfloat16()
    w = (torch.randn(WIDTH, 4 * WIDTH, device="cuda") * 0.02).bfloat16()
    b = torch.zeros(4 * WIDTH, device="cuda").bfloat16()
    w2 = (torch.randn(4 * WIDTH, WIDTH, device="cuda") * 0.02).bfloat16()
    g = torch.randn(TOKENS, WIDTH, device="cuda").bfloat16()
    pre = torch.randn(TOKENS, 4 * WIDTH, device="cuda").bfloat16()
    ext = gelu_mlp.extension()
    ext.gelu_up(x, w, b), ext.dgelu_down(g, w2, pre)  # the first call of a shape picks its algorithm
    return {"mm up (cuBLAS)": timed(lambda: torch.mm(x, w)), "addmm up (cuBLAS)": timed(lambda: torch.addmm(b, x, w)),
            "gelu_up": timed(lambda: ext.gelu_up(x, w, b)),
            "mm down^T (cuBLAS)": timed(lambda: torch.mm(g, w2.t())),
            "dgelu_down": timed(lambda: ext.dgelu_down(g, w2, pre)),
            "tokens' sum of dgelu_down (the bias gradient)": timed(lambda: pre.sum(0))}


def main() -> None:
    started = time.perf_counter()
    gelu_mlp.extension()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "build_s": time.perf_counter() - started, "errors": operator_errors()}
    result["operator_ms"] = operator_times()
    plain, fused = time_mlp(False), time_mlp(True)
    result["ms"] = {"compiled transformers MLP": plain["ms"], "GELU in the epilogues": fused["ms"]}
    result["grad_difference"] = {name: relative_error(fused["grads"][name], plain["grads"][name].float())
                                 for name in plain["grads"]}
    flop = 3 * 2 * 2 * TOKENS * WIDTH * 4 * WIDTH
    result["tflops"] = {name: flop / ms / 1e9 for name, ms in result["ms"].items()}
    assert all(math.isfinite(v) for v in result["errors"].values())
    print(json.dumps(result, indent=2))
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
