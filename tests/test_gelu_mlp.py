"""GPT-2's MLP with its GELU in cuBLASLt's matmul epilogues (``kernels.fused_mlp``): when a run uses it, what it
says when it cannot, and its training arithmetic through the torch form of the same two operators on the CPU.
The cuBLASLt calls themselves need a CUDA GPU: one test, skipped without one (none on CI)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_config
from curriculum.config import KernelsConfig
from curriculum.errors import ConfigError
from pipeline import gelu_mlp
from pipeline.engine import _build_gelu_mlp, _kernels_for_zero3
from pipeline.kernels import choose_kernels, gelu_mlp_problem

STAGES = [{"until_step": 4, "seq_len": 32, "global_batch": 8}]


def test_it_is_for_gpt2s_tanh_gelu_in_bf16_with_sizes_in_multiples_of_8() -> None:
    """GPT-2's default activation (``gelu_new``) and its alias in bf16 or bf16 autocast fit; Llama, fp32, the erf
    GELU and sizes cuBLASLt cannot align do not, each with its reason."""
    gpt2 = {"n_embd": 768}
    assert gelu_mlp_problem("gpt2", gpt2, "bf16-autocast") is None
    assert gelu_mlp_problem("gpt2", {**gpt2, "activation_function": "gelu_pytorch_tanh"}, "bf16") is None
    assert gelu_mlp_problem("llama", {"hidden_size": 768}, "bf16-autocast").startswith("GPT-2's MLP only")
    assert gelu_mlp_problem("gpt2", gpt2, "fp32") == "needs run.precision bf16 or bf16-autocast"
    assert gelu_mlp_problem("gpt2", {**gpt2, "activation_function": "gelu"}, "bf16").startswith(
        "activation_function 'gelu' is not the tanh GELU")
    assert gelu_mlp_problem("gpt2", {"n_embd": 101}, "bf16") == "needs multiples of 8, got width 101 and inner size 404"
    inner = gelu_mlp_problem("gpt2", {"n_embd": 64, "n_inner": 100}, "bf16")
    assert inner == "needs multiples of 8, got inner size 100"


def test_auto_uses_it_on_cuda_only_and_true_where_it_cannot_run_is_bad_input() -> None:
    """``auto``: on for GPT-2 on CUDA, off with one note on a CPU or where the model does not fit it; ``true``
    there is an error naming the switch and the reason."""
    assert choose_kernels(KernelsConfig(), "gpt2", on_cuda=True).fused_mlp
    cpu = choose_kernels(KernelsConfig(), "gpt2", on_cuda=False)
    assert not cpu.fused_mlp and "kernels.fused_mlp: not used (needs CUDA)" in cpu.notes
    fp32 = choose_kernels(KernelsConfig(), "gpt2", on_cuda=True, mlp_problem=gelu_mlp_problem("gpt2", {"n_embd": 8},
                                                                                              "fp32"))
    assert not fp32.fused_mlp
    assert "kernels.fused_mlp: not used (needs run.precision bf16 or bf16-autocast)" in fp32.notes
    with pytest.raises(ConfigError, match="kernels.fused_mlp = True: required but unavailable: GPT-2's MLP only"):
        choose_kernels(KernelsConfig(fused_mlp=True), "llama", on_cuda=True,
                       mlp_problem=gelu_mlp_problem("llama", {}, "bf16"))
    assert not choose_kernels(KernelsConfig(fused_mlp=False), "gpt2", on_cuda=True).fused_mlp


def test_zero3_and_a_failed_build_turn_auto_off_with_a_note_and_make_true_an_error(monkeypatch) -> None:
    """Under ZeRO stage 3 (the weights are read outside their modules, where ZeRO gathers them) and where the
    extension does not build, ``auto`` goes on without it and says why; ``true`` is an error."""
    notes: list[str] = []
    auto, required = (make_config({"stages": STAGES}, kernels={"fused_mlp": switch}) for switch in ("auto", True))
    assert not _kernels_for_zero3(choose_kernels(auto.kernels, "gpt2", on_cuda=True), auto, notes.append).fused_mlp
    assert "kernels.fused_mlp: not used (ZeRO stage 3: it reads the MLP's weights outside their modules)" in notes
    with pytest.raises(ConfigError, match="kernels.fused_mlp = True: not verified with ZeRO stage 3"):
        _kernels_for_zero3(choose_kernels(required.kernels, "gpt2", on_cuda=True), required, notes.append)

    def no_compiler() -> None:
        raise RuntimeError("Error building extension 'curriculum_pretrain_gelu_mlp'\nninja: build stopped")

    monkeypatch.setattr(gelu_mlp, "extension", no_compiler)
    assert not _build_gelu_mlp(choose_kernels(auto.kernels, "gpt2", on_cuda=True), auto, notes.append).fused_mlp
    assert notes[-1] == ("kernels.fused_mlp: not used (its cuBLASLt extension did not build: RuntimeError: ninja: "
                         "build stopped)")
    with pytest.raises(ConfigError, match="kernels.fused_mlp = True: required but unavailable \\(its cuBLASLt"):
        _build_gelu_mlp(choose_kernels(required.kernels, "gpt2", on_cuda=True), required, notes.append)


def _twins() -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    """Two tiny GPT-2s with the same weights, the second with its MLPs fused."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    plain, fused = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    fused.load_state_dict(plain.state_dict())
    assert gelu_mlp.fuse_gelu_mlps(fused) == 2
    return plain, fused


def _loss_and_grads(model: GPT2LMHeadModel, forward, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        loss = forward(tokens)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_fused_mlp_trains_like_transformers_mlp(compiled: bool) -> None:
    """Under bf16 autocast, a tiny GPT-2 with its MLPs fused (the operators' torch form) gives the same loss and
    every parameter the same gradient as transformers' MLP, up to bf16 rounding (the fused form rounds once where
    autocast rounds the pre-activation first), also compiled as one graph (``fullgraph``: the operators and the
    autograd function trace without a break). Its weights and their names are transformers', so checkpoints and
    exports do not change."""
    plain, fused = _twins()
    assert list(fused.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))

    def loss_of(model: GPT2LMHeadModel):
        def loss(t: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=t).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), t[:, 1:].flatten())

        return loss

    want_loss, want = _loss_and_grads(plain, loss_of(plain), tokens)
    forward = loss_of(fused)
    if compiled:
        forward = torch.compile(forward, backend="aot_eager", fullgraph=True)
    got_loss, got = _loss_and_grads(fused, forward, tokens)
    assert got_loss == pytest.approx(want_loss, rel=1e-2)
    for name, grad in want.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (got[name] - grad).abs().max().item() <= 0.03 * scale, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt calls need a CUDA GPU (none on CI)")
def test_the_cublaslt_operators_give_the_torch_arithmetic() -> None:
    """On a GPU, each operator against its own torch form (the CPU's) on the same bf16 inputs, at GPT-2 124M's
    MLP shape: within bf16 rounding of the largest value."""
    torch.manual_seed(0)
    x = torch.randn(2048, 768).bfloat16()
    w_fc, b_fc = (torch.randn(768, 3072) * 0.02).bfloat16(), (torch.randn(3072) * 0.02).bfloat16()
    w_proj, grad = (torch.randn(3072, 768) * 0.02).bfloat16(), torch.randn(2048, 768).bfloat16()
    act, pre = gelu_mlp.gelu_up(x, w_fc, b_fc)
    grad_pre = gelu_mlp.dgelu_down(grad, w_proj, pre)
    cuda = [t.cuda() for t in (x, w_fc, b_fc, w_proj, grad, pre)]
    got = [*gelu_mlp.gelu_up(*cuda[:3]), gelu_mlp.dgelu_down(cuda[4], cuda[3], cuda[5])]
    for name, want, value in zip(("gelu", "pre-activation", "its gradient"), (act, pre, grad_pre), got):
        assert (value.cpu().float() - want.float()).abs().max() <= 0.01 * want.float().abs().max(), name
