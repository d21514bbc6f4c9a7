"""Kernel switches without CUDA: which kernels a run uses, the fallback notes, compile bookkeeping, and the losses'
gradients (the FP8 output layer through ``torch._scaled_mm``'s CPU implementation)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO_ROOT, make_config
from curriculum.config import KernelsConfig
from curriculum.errors import ConfigError
from curriculum.schedule import build_schedule
from pipeline.kernels import (CausalLMWithLoss, FP8HeadCrossEntropy, HeadCrossEntropy, KernelChoice,
                              choose_kernels, cross_entropy_rows_, fp8_shape_problem, importable)


def everything_importable(module: str) -> bool:
    return True


def test_on_cpu_every_auto_kernel_falls_back_with_one_note_each() -> None:
    """No CUDA: FusedAdam, Liger, apex and the fused MLP all fall back, each saying why once; compile stays as
    configured."""
    choice = choose_kernels(KernelsConfig(), "llama", on_cuda=False, is_importable=everything_importable)
    assert (choice.fused_adam, choice.liger, choice.apex, choice.compile) == (False, False, False, False)
    assert [note.split(":")[0] for note in choice.notes] == ["kernels.fused_adam", "kernels.liger", "kernels.apex",
                                                             "kernels.fused_mlp"]
    assert all("needs CUDA" in note for note in choice.notes)


def test_on_cuda_liger_is_llama_only_and_apex_yields_to_liger_rmsnorm() -> None:
    """With CUDA and both packages, eager: Llama gets Liger (and not apex, whose RMSNorm Liger replaces); GPT-2
    gets apex."""
    eager = KernelsConfig(compile=False)
    llama = choose_kernels(eager, "llama", on_cuda=True, is_importable=everything_importable)
    assert (llama.fused_adam, llama.liger, llama.apex) == (True, True, False)
    gpt2 = choose_kernels(eager, "gpt2", on_cuda=True, is_importable=everything_importable)
    assert (gpt2.fused_adam, gpt2.liger, gpt2.apex) == (True, False, True)
    assert any("only for arch: llama" in note for note in gpt2.notes)


def test_compiled_runs_leave_in_block_kernels_to_inductor_and_replay_cuda_graphs() -> None:
    """``compile: auto`` on CUDA compiles, with CUDA graphs; Liger's in-block kernels and apex's norms (which break
    the graph) are not used in ``auto``, each saying why; the fused cross-entropy (beside the graph) is off unless
    asked for. On a CPU ``auto`` neither compiles nor replays graphs."""
    gpu = choose_kernels(KernelsConfig(), "llama", on_cuda=True, is_importable=everything_importable)
    assert (gpu.compile, gpu.cuda_graphs, gpu.liger, gpu.apex, gpu.fused_cross_entropy) == (
        True, True, False, False, False)
    assert any(note.startswith("kernels.liger: not used (its Triton kernels break") for note in gpu.notes)
    assert any(note.startswith("kernels.apex: not used (its fused norms break") for note in gpu.notes)
    asked = choose_kernels(KernelsConfig(fused_cross_entropy=True, liger=True), "llama", on_cuda=True,
                           is_importable=everything_importable)
    assert (asked.fused_cross_entropy, asked.liger, asked.compile) == (True, True, True)
    cpu = choose_kernels(KernelsConfig(), "llama", on_cuda=False, is_importable=everything_importable)
    assert (cpu.compile, cpu.cuda_graphs) == (False, False)


def test_dynamic_shapes_follow_compile() -> None:
    """Off by default; ``dynamic_shapes: auto`` marks sizes dynamic whenever the run compiles, never without
    compiling; ``true`` without compiling is bad input naming the switch."""
    assert not choose_kernels(KernelsConfig(), "gpt2", on_cuda=True).dynamic_shapes
    assert choose_kernels(KernelsConfig(dynamic_shapes="auto"), "gpt2", on_cuda=True).dynamic_shapes
    assert not choose_kernels(KernelsConfig(dynamic_shapes="auto"), "gpt2", on_cuda=False).dynamic_shapes
    assert not choose_kernels(KernelsConfig(compile=False, dynamic_shapes="auto"), "gpt2", on_cuda=True).dynamic_shapes
    assert choose_kernels(KernelsConfig(compile=True, dynamic_shapes=True), "gpt2", on_cuda=False).dynamic_shapes
    with pytest.raises(ConfigError, match="kernels.dynamic_shapes = True: needs kernels.compile"):
        choose_kernels(KernelsConfig(dynamic_shapes=True), "gpt2", on_cuda=False)


def test_cuda_graphs_need_cuda_and_compile() -> None:
    with pytest.raises(ConfigError, match="kernels.cuda_graphs = True: needs CUDA and kernels.compile"):
        choose_kernels(KernelsConfig(compile=False, cuda_graphs=True), "gpt2", on_cuda=True)
    with pytest.raises(ConfigError, match="kernels.cuda_graphs = True: needs CUDA"):
        choose_kernels(KernelsConfig(compile=True, cuda_graphs=True), "gpt2", on_cuda=False)


def test_coordinate_descent_tuning_needs_inductor_compile() -> None:
    assert choose_kernels(KernelsConfig(coordinate_descent_tuning=True), "gpt2", on_cuda=True).coordinate_descent_tuning
    assert not choose_kernels(KernelsConfig(), "gpt2", on_cuda=True).coordinate_descent_tuning  # off by default
    with pytest.raises(ConfigError, match="kernels.coordinate_descent_tuning = True: needs kernels.compile"):
        choose_kernels(KernelsConfig(coordinate_descent_tuning=True), "gpt2", on_cuda=False)  # auto: no compile on CPU
    with pytest.raises(ConfigError, match="kernels.coordinate_descent_tuning = True: needs kernels.compile"):
        choose_kernels(KernelsConfig(compile=True, compile_backend="aot_eager", coordinate_descent_tuning=True),
                       "gpt2", on_cuda=True)


def test_coordinate_descent_tuning_reaches_inductor_only_when_asked() -> None:
    """The compile backend patches Inductor's ``coordinate_descent_tuning`` in only when the switch is on; off, it
    leaves Inductor's own setting (``TORCHINDUCTOR_COORDINATE_DESCENT_TUNING``) alone."""
    from torch._inductor import config as inductor_config

    from pipeline.engine import CompileMonitor, custom_op_cache_keys

    keys = {"unsafe_marked_cacheable_functions": custom_op_cache_keys()}  # the custom operators' keys (below)
    patches = CompileMonitor("inductor", False, coordinate_descent_tuning=True)._inner.keywords["config_patches"]
    assert patches == {"triton.cudagraphs": False, **keys, "coordinate_descent_tuning": True}
    assert CompileMonitor("inductor", True)._inner.keywords["config_patches"] == {"triton.cudagraphs": True, **keys}
    with inductor_config.patch(unsafe_marked_cacheable_functions={"a.function": "its key"}):  # a user's, kept
        marked = CompileMonitor("inductor", True)._inner.keywords["config_patches"]["unsafe_marked_cacheable_functions"]
    assert marked == {"a.function": "its key", **custom_op_cache_keys()}


CACHE_PROBE = """
import json, torch
from pipeline.engine import CompileMonitor
from pipeline.kernels import HeadCrossEntropy
torch.manual_seed(0)
monitor = CompileMonitor("inductor", False)
layer, head = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.randn(16, 8))
loss = torch.compile(lambda x, labels: HeadCrossEntropy.apply(layer(x), head, labels), backend=monitor.backend)(
    torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
loss.backward()
monitor.freeze()
print(json.dumps({"caches": monitor.compile_caches, "line": monitor.describe_caches(), "loss": loss.item(),
                  "grad": head.grad.tolist()}))
"""


def test_a_warm_cache_holds_every_graph_with_an_autograd_function_in_it(tmp_path: Path) -> None:
    """A real Inductor compile on the CPU of a layer and the output layer's loss (``HeadCrossEntropy``, an
    autograd.Function, which AOTAutograd's cache skips unless told otherwise), forward and backward, in two fresh
    processes sharing one cache directory: the first compiles its one AOTAutograd graph and its two Inductor graphs
    and stores them, the second finds them all, compiles none and computes the same loss and gradient; the warm-up
    line's text says so, and says the caches are off in a third process with Inductor's cache off. Another backend
    has no cache to report."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}

    def probe(**settings: str) -> dict[str, Any]:
        run = subprocess.run([sys.executable, "-c", CACHE_PROBE], env={**env, **settings}, cwd=REPO_ROOT,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout.splitlines()[-1])

    first, second = probe(), probe()
    assert first["caches"] == {"aot_autograd": {"hit": 0, "miss": 1, "bypass": 0},
                               "inductor": {"hit": 0, "miss": 2, "bypass": 0}}
    assert first["line"] == "; the on-disk caches: AOTAutograd 0 found, 1 compiled; Inductor 0 found, 2 compiled"
    assert second["caches"] == {"aot_autograd": {"hit": 1, "miss": 0, "bypass": 0},
                                "inductor": {"hit": 2, "miss": 0, "bypass": 0}}
    assert second["line"] == "; the on-disk caches: AOTAutograd 1 found, 0 compiled; Inductor 2 found, 0 compiled"
    assert (second["loss"], second["grad"]) == (first["loss"], first["grad"])
    off = probe(TORCHINDUCTOR_FX_GRAPH_CACHE="0")  # AOTAutograd's cache needs Inductor's: both off
    assert (off["caches"], off["line"]) == ({}, "; the on-disk compile caches are off")
    from pipeline.engine import CompileMonitor

    eager = CompileMonitor("eager", False)
    eager.freeze()
    assert (eager.compile_caches, eager.describe_caches()) == (None, "")


OP_CACHE_PROBE = """
import json, sys, torch
from pipeline import engine
from pipeline.gelu_mlp import _GeluMLP
if sys.argv[1:] == ["edited"]:  # what an edit to pipeline/gelu_mlp.py changes
    engine.custom_op_cache_keys = lambda: {"pipeline.gelu_mlp source": "edited"}
monitor = engine.CompileMonitor("inductor", False)
x, w_fc, b_fc, w_proj, b_proj = (torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
                                 for shape in [(4, 8), (8, 16), (16,), (16, 8), (8,)])
torch.compile(lambda *tensors: _GeluMLP.apply(*tensors).float().sum(), backend=monitor.backend)(
    x, w_fc, b_fc, w_proj, b_proj).backward()
monitor.freeze()
print(json.dumps(monitor.compile_caches))
"""


def test_an_edited_custom_operator_module_compiles_again_from_a_warm_cache(tmp_path: Path) -> None:
    """The fused MLP's graph (its two custom operators inside an autograd.Function), compiled by Inductor on the
    CPU in fresh processes sharing one cache directory: the second process finds every graph the first stored; a
    third whose custom-operator module key differs, as after an edit to ``pipeline/gelu_mlp.py``, finds none and
    compiles them again, in both caches (without the keys it would load the first process's graphs)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}

    def probe(*args: str) -> dict[str, dict[str, int]]:
        run = subprocess.run([sys.executable, "-c", OP_CACHE_PROBE, *args], env=env, cwd=REPO_ROOT,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout.splitlines()[-1])

    compiled = {"aot_autograd": {"hit": 0, "miss": 1, "bypass": 0}, "inductor": {"hit": 0, "miss": 2, "bypass": 0}}
    found = {"aot_autograd": {"hit": 1, "miss": 0, "bypass": 0}, "inductor": {"hit": 2, "miss": 0, "bypass": 0}}
    assert (probe(), probe(), probe("edited"), probe("edited")) == (compiled, found, compiled, found)


def test_custom_operator_keys_hash_each_defining_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every module of the project that defines or registers an operator is keyed, and a key follows its source."""
    from pipeline.engine import CUSTOM_OP_MODULES, custom_op_cache_keys

    registers = re.compile(r"custom_op\(|triton_op\(|Library\(|\.define\(|register_fake")
    defining = sorted(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
                      for path in (REPO_ROOT / "pipeline").rglob("*.py") if registers.search(path.read_text()))
    assert sorted(CUSTOM_OP_MODULES) == defining
    assert sorted(custom_op_cache_keys()) == [f"{module} source" for module in defining]
    module = tmp_path / "ops_probe.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = custom_op_cache_keys(["ops_probe"])
    module.write_text("X = 2\n")
    assert before != custom_op_cache_keys(["ops_probe"]) and len(before["ops_probe source"]) == 16


def test_zero3_turns_compile_off_and_so_refuses_coordinate_descent_tuning() -> None:
    """Under ZeRO stage 3 ``compile: auto`` is turned off (with a note); ``coordinate_descent_tuning: true`` then
    has nothing to tune, and ``dynamic_shapes: true`` nothing to mark: one error naming each, not a setting silently
    ignored; ``dynamic_shapes: auto`` follows compile off."""
    from pipeline.engine import _kernels_for_zero3

    stages = [{"until_step": 4, "seq_len": 32, "global_batch": 8}]
    notes: list[str] = []
    plain = make_config({"stages": stages}, kernels={"compile": "auto", "fused_mlp": False})
    choice = _kernels_for_zero3(choose_kernels(plain.kernels, "gpt2", on_cuda=True), plain, notes.append)
    assert not choice.compile and notes == ["kernels.compile: not used (ZeRO stage 3: it would trace DeepSpeed's "
                                            "parameter-gathering hooks)"]
    tuned = make_config({"stages": stages}, kernels={"compile": "auto", "coordinate_descent_tuning": True})
    with pytest.raises(ConfigError, match="kernels.coordinate_descent_tuning = True: needs kernels.compile, which "
                                          "ZeRO stage 3 turns off"):
        _kernels_for_zero3(choose_kernels(tuned.kernels, "gpt2", on_cuda=True), tuned, notes.append)
    auto = make_config({"stages": stages}, kernels={"compile": "auto", "dynamic_shapes": "auto"})
    assert not _kernels_for_zero3(choose_kernels(auto.kernels, "gpt2", on_cuda=True), auto, notes.append).dynamic_shapes
    marked = make_config({"stages": stages}, kernels={"compile": "auto", "dynamic_shapes": True})
    with pytest.raises(ConfigError, match="kernels.dynamic_shapes = True: needs kernels.compile, which ZeRO stage 3 "
                                          "turns off"):
        _kernels_for_zero3(choose_kernels(marked.kernels, "gpt2", on_cuda=True), marked, notes.append)


def test_missing_packages_fall_back_and_say_which() -> None:
    """CUDA but neither liger-kernel nor apex installed: both fall back, naming the package."""
    choice = choose_kernels(KernelsConfig(), "llama", on_cuda=True, is_importable=lambda module: False)
    assert (choice.fused_adam, choice.liger, choice.apex) == (True, False, False)
    assert any("liger-kernel is not installed" in note for note in choice.notes)
    assert any("apex is not importable" in note for note in choice.notes)


def test_a_required_kernel_that_cannot_run_is_bad_input() -> None:
    """``liger: true`` on a machine without CUDA is an error naming the switch, not a silent fallback."""
    with pytest.raises(ConfigError, match="kernels.liger = True: required but unavailable: needs CUDA"):
        choose_kernels(KernelsConfig(liger=True), "llama", on_cuda=False)


def test_switched_off_kernels_are_not_used_and_not_mentioned() -> None:
    """``false`` switches produce no fallback notes."""
    choice = choose_kernels(KernelsConfig(fused_adam=False, liger=False, apex=False), "llama", on_cuda=True,
                            is_importable=everything_importable)
    assert (choice.fused_adam, choice.liger, choice.apex, choice.notes) == (False, False, False, ())


def test_fp8_lm_head_needs_fp8_tensor_cores_and_its_own_loss() -> None:
    """``fp8_lm_head``: off by default; ``auto`` without FP8 matmuls falls back with a note, ``true`` there is an
    error; with them it is used. Beside the fused loss (each computes the loss) the switch set to ``true`` wins
    and an ``auto`` one steps aside with a note, both ``true`` is an error; under ZeRO stage 3 ``auto`` turns it
    off and ``true`` is an error."""
    assert not choose_kernels(KernelsConfig(), "gpt2", on_cuda=True, fp8_matmuls=True).fp8_lm_head
    auto = choose_kernels(KernelsConfig(fp8_lm_head="auto"), "gpt2", on_cuda=True)
    assert not auto.fp8_lm_head and any(note.startswith("kernels.fp8_lm_head: not used (needs an NVIDIA GPU with FP8")
                                        for note in auto.notes)
    assert choose_kernels(KernelsConfig(fp8_lm_head="auto"), "gpt2", on_cuda=True, fp8_matmuls=True).fp8_lm_head
    with pytest.raises(ConfigError, match="kernels.fp8_lm_head = True: required but unavailable"):
        choose_kernels(KernelsConfig(fp8_lm_head=True), "gpt2", on_cuda=False)
    for fp8, fused in (("auto", True), (True, "auto")):  # the one set to true wins, the other steps aside
        both = choose_kernels(KernelsConfig(fp8_lm_head=fp8, fused_cross_entropy=fused), "gpt2", on_cuda=True,
                              is_importable=everything_importable, fp8_matmuls=True)
        assert (both.fp8_lm_head, both.fused_cross_entropy) == (fp8 is True, fused is True)
        assert [note for note in both.notes if "computes the loss" in note and "logits_gradient" not in note] == [
            "kernels.fp8_lm_head: not used (kernels.fused_cross_entropy computes the loss)" if fused is True
            else "kernels.fused_cross_entropy: not used (kernels.fp8_lm_head computes the loss)"]
    with pytest.raises(ConfigError, match="kernels.fp8_lm_head = True: computes the loss itself; set "
                                          "kernels.fused_cross_entropy to false"):
        choose_kernels(KernelsConfig(fp8_lm_head=True, fused_cross_entropy=True), "gpt2", on_cuda=True,
                       is_importable=everything_importable, fp8_matmuls=True)
    from pipeline.engine import _kernels_for_zero3

    stages = [{"until_step": 4, "seq_len": 32, "global_batch": 8}]
    for switch in ("auto", True):  # ZeRO-3: reads the output embedding outside its module, as the fused loss does
        config = make_config({"stages": stages}, kernels={"fp8_lm_head": switch})
        choice = choose_kernels(config.kernels, "gpt2", on_cuda=True, fp8_matmuls=True)
        if switch is True:
            with pytest.raises(ConfigError, match="kernels.fp8_lm_head = True: not verified with ZeRO stage 3"):
                _kernels_for_zero3(choice, config, print)
        else:
            assert not _kernels_for_zero3(choice, config, print).fp8_lm_head


def test_the_loss_gradient_in_the_forward_is_on_by_default_on_cuda_beside_the_plain_loss_only() -> None:
    """``logits_gradient_in_forward``: on by default on CUDA with Triton, off on a CPU unless set to ``true`` (there
    the plain loss was faster); an ``auto`` one steps aside with a note where another kernel computes the loss or
    CUDA has no Triton (``true`` there is an error); under ZeRO stage 3 ``auto`` turns it off and ``true`` is an
    error."""
    from pipeline.engine import _kernels_for_zero3

    cpu = choose_kernels(KernelsConfig(), "gpt2", on_cuda=False)
    assert not cpu.logits_gradient_in_forward and not any("logits_gradient" in note for note in cpu.notes)
    assert choose_kernels(KernelsConfig(logits_gradient_in_forward=True), "gpt2",
                          on_cuda=False).logits_gradient_in_forward
    assert choose_kernels(KernelsConfig(), "gpt2", on_cuda=True, is_importable=everything_importable,
                          fp8_matmuls=True).logits_gradient_in_forward
    for other in ({"fused_cross_entropy": True}, {"fp8_lm_head": True}):
        choice = choose_kernels(KernelsConfig(**other), "gpt2", on_cuda=True, is_importable=everything_importable,
                                fp8_matmuls=True)
        assert not choice.logits_gradient_in_forward
        assert [note for note in choice.notes if note.startswith("kernels.logits_gradient")] == [
            f"kernels.logits_gradient_in_forward: not used (kernels.{next(iter(other))} computes the loss)"]
    no_triton = choose_kernels(KernelsConfig(), "gpt2", on_cuda=True, is_importable=lambda module: module != "triton")
    assert not no_triton.logits_gradient_in_forward
    assert "kernels.logits_gradient_in_forward: not used (needs Triton on CUDA (torch's CUDA builds bring it))" in (
        no_triton.notes)
    with pytest.raises(ConfigError, match="kernels.logits_gradient_in_forward = True: required but unavailable: "
                                          "needs Triton on CUDA"):
        choose_kernels(KernelsConfig(logits_gradient_in_forward=True), "gpt2", on_cuda=True,
                       is_importable=lambda module: module != "triton")
    stages = [{"until_step": 4, "seq_len": 32, "global_batch": 8}]
    for switch in ("auto", True):
        config = make_config({"stages": stages}, kernels={"logits_gradient_in_forward": switch})
        choice = choose_kernels(config.kernels, "gpt2", on_cuda=True, is_importable=everything_importable)
        if switch is True:
            with pytest.raises(ConfigError, match="kernels.logits_gradient_in_forward = True: not verified with ZeRO "
                                                  "stage 3"):
                _kernels_for_zero3(choice, config, print)
        else:
            assert not _kernels_for_zero3(choice, config, print).logits_gradient_in_forward


@pytest.mark.parametrize("triton", [False, True])
def test_fp8_needs_a_width_and_vocabulary_in_multiples_of_16(triton: bool) -> None:
    """The FP8 matmuls' fixed dimensions: GPT-2 124M's width and padded vocabulary pass; an odd one is named.
    ``auto`` drops the FP8 layer with a note, and ``logits_gradient_in_forward`` (which steps aside for an FP8
    layer) runs where Triton is; ``true`` is an error naming the size."""
    assert fp8_shape_problem(768, 50304) is None
    assert fp8_shape_problem(760, 50257) == "needs multiples of 16, got hidden size 760 and vocabulary 50257"

    def choose(switch: object, vocab: int) -> KernelChoice:
        return choose_kernels(KernelsConfig(fp8_lm_head=switch), "gpt2", on_cuda=True, fp8_matmuls=True,
                              fp8_shapes=fp8_shape_problem(64, vocab),
                              is_importable=lambda module: triton or module != "triton")

    with pytest.raises(ConfigError, match="kernels.fp8_lm_head = True: required but unavailable: needs multiples of "
                                          "16, got vocabulary 120"):
        choose(True, 120)
    fits, odd = choose("auto", 128), choose("auto", 120)
    assert (fits.fp8_lm_head, fits.logits_gradient_in_forward) == (True, False)
    assert (odd.fp8_lm_head, odd.logits_gradient_in_forward) == (False, triton)
    assert "kernels.fp8_lm_head: not used (needs multiples of 16, got vocabulary 120)" in odd.notes
    assert not any(note.startswith("kernels.fp8_lm_head") for note in fits.notes)


def _head_problem(tokens: int = 96, width: int = 64, vocab: int = 160) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = (torch.randn(vocab, width) * 0.05).requires_grad_()
    return hidden, weight, torch.randint(0, vocab, (tokens,))


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``F.cross_entropy`` on fp32 logits: the loss and the gradients of hidden and weight."""
    loss = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def _scaled_mm_as_cuda_checks_it(real: object) -> object:
    """``torch._scaled_mm`` with the checks its CUDA implementation makes and its CPU one does not: the first
    operand row-major with its columns a multiple of 16, the second column-major with both sizes multiples of 16."""

    def checked(a: torch.Tensor, b: torch.Tensor, **kwargs: object) -> torch.Tensor:
        assert a.is_contiguous() and b.t().is_contiguous(), (a.stride(), b.stride())
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, (a.shape, b.shape)
        return real(a, b, **kwargs)

    return checked


@pytest.mark.parametrize("autocast", [False, True])
def test_the_loss_gradient_made_in_the_forward_is_the_plain_loss_gradient(autocast: bool) -> None:
    """``HeadCrossEntropy`` against ``F.cross_entropy(F.linear(...).float())``, eager and compiled, with the
    incoming gradient applied: the loss within 1e-6 of it, both gradients within 1e-6 of the largest in fp32 (the
    same sums in another order) and within 1 % under bf16 autocast (the logits' gradient is rounded to bf16 from
    an fp32 value computed another way, and before the ``grad / tokens`` factor rather than after it). A missing
    scale, a transposed weight gradient or a gradient taken before the overwrite would be off by far more."""
    for tokens in (96, 64):
        hidden, weight, labels = _head_problem(tokens)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), labels)
        expected = (plain, *torch.autograd.grad(0.5 * plain, (hidden, weight)))
        for head in (HeadCrossEntropy.apply, torch.compile(HeadCrossEntropy.apply, backend="aot_eager")):
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                loss = head(hidden, weight, labels)
            ours = (loss, *torch.autograd.grad(0.5 * loss, (hidden, weight)))
            assert [value.dtype for value in ours] == [torch.float32] * 3
            for value, reference in zip(ours, expected):
                bound = 1e-2 if autocast and value is not loss else 1e-6
                assert ((value - reference).abs().max() / reference.abs().max()).item() < bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU (none on CI)")
def test_the_triton_kernel_gives_the_torch_arithmetic() -> None:
    """On a GPU, ``cross_entropy_rows_``'s Triton kernel against its torch form on the same bf16 logits (rows of
    a vocabulary that is no multiple of its block, and one shorter than a block): the losses within 1e-5, the
    gradient within one bf16 rounding. Then ``HeadCrossEntropy`` compiled by Inductor under bf16 autocast (the
    operator's in-place write kept in place or not) against the plain loss, as on the CPU."""
    torch.manual_seed(0)
    for vocab in (50304, 1000):
        logits = (torch.randn(300, vocab, device="cuda") * 3).to(torch.bfloat16)
        labels = torch.randint(0, vocab, (300,), device="cuda")
        gradient, reference = logits.clone(), logits.cpu()
        loss = cross_entropy_rows_(gradient, labels)
        expected = cross_entropy_rows_(reference, labels.cpu())
        assert torch.allclose(loss.cpu(), expected, rtol=1e-5, atol=1e-5)
        assert (gradient.float().cpu() - reference.float()).abs().max().item() <= 2**-8
    hidden, weight, labels = (tensor.cuda() for tensor in _head_problem(4096, 256, 8192))
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), labels)
        ours = torch.compile(HeadCrossEntropy.apply)(hidden, weight, labels)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-5)
    expected_grads = torch.autograd.grad(plain, (hidden, weight))
    for grad, expected in zip(torch.autograd.grad(ours, (hidden, weight)), expected_grads):
        assert ((grad - expected).abs().max() / expected.abs().max()).item() < 1e-2


@pytest.mark.parametrize("tokens, dtype", [(96, torch.float32), (40, torch.float32), (96, torch.bfloat16)])
def test_fp8_head_is_within_fp8_rounding_of_the_fp32_loss(monkeypatch, tokens: int, dtype: torch.dtype) -> None:
    """The FP8 output layer (real ``torch._scaled_mm``, here its CPU implementation, with CUDA's layout and size
    checks added) against fp32: the loss within 0.1 %, both gradients within 6 % in norm (e4m3 keeps 3 mantissa
    bits, the gradient's e5m2 2; measured 2.8 %), the incoming gradient applied, the gradients in the inputs'
    dtypes (fp32 under autocast, bf16 under DeepSpeed's bf16 mode). 40 tokens are padded to 48 for the weight
    gradient's sum. A transposed weight gradient or a missing scale would be off by 100 % or more."""
    monkeypatch.setattr(torch, "_scaled_mm", _scaled_mm_as_cuda_checks_it(torch._scaled_mm))
    hidden, weight, labels = _head_problem(tokens)
    loss, grad_hidden, grad_weight = _reference(hidden, weight, labels)
    low_hidden, low_weight = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
    ours = FP8HeadCrossEntropy.apply(low_hidden, low_weight, labels)
    ours_hidden, ours_weight = torch.autograd.grad(0.5 * ours, (low_hidden, low_weight))
    assert ours.item() == pytest.approx(loss.item(), rel=1e-3)
    assert (ours_hidden.dtype, ours_weight.dtype) == (dtype, dtype)
    assert (ours_hidden.shape, ours_weight.shape) == (hidden.shape, weight.shape)
    for ours_grad, grad in ((ours_hidden, grad_hidden), (ours_weight, grad_weight)):
        assert ((2 * ours_grad.float() - grad).norm() / grad.norm()).item() < 0.06


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_loss_module_trains_every_parameter_through_each_output_layer(arch: str) -> None:
    """``CausalLMWithLoss`` on a tiny GPT-2 (input and output embedding tied) and a tiny Llama (untied): through
    the model's own output layer it gives the stock loss on transformers' logits, with the loss's gradient made in
    the forward the same gradients (and, without gradients, the plain loss); the FP8 output layer gives it within
    0.5 %, a finite gradient for every parameter, and the output weight's within 10 % in norm."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=32,
                                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                          bos_token_id=0, eos_token_id=0))
    tokens = torch.randint(0, 128, (4, 17))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    expected = torch.nn.functional.cross_entropy(lm(input_ids=inputs).logits.flatten(0, 1), labels.flatten())
    plain, fp8 = CausalLMWithLoss(lm, fused_cross_entropy=False), CausalLMWithLoss(lm, False, fp8_lm_head=True)
    plain_loss = plain(inputs, labels)
    assert plain_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain_grads = torch.autograd.grad(plain_loss, list(lm.parameters()))
    early = CausalLMWithLoss(lm, False, logits_gradient_in_forward=True)
    early_loss = early(inputs, labels)
    assert early_loss.grad_fn.name() == "HeadCrossEntropyBackward"
    for grad, plain_grad in zip(torch.autograd.grad(early_loss, list(lm.parameters())), plain_grads):
        assert torch.allclose(grad, plain_grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # evaluation: nothing to differentiate, the plain loss
        assert early(inputs, labels).item() == pytest.approx(plain_loss.item(), rel=1e-6)
    fp8_loss = fp8(inputs, labels)
    fp8_grads = torch.autograd.grad(fp8_loss, list(lm.parameters()))  # raises if a parameter got no gradient
    assert fp8_loss.item() == pytest.approx(plain_loss.item(), rel=5e-3)
    assert all(torch.isfinite(grad).all() for grad in fp8_grads)
    head = [p is lm.get_output_embeddings().weight for p in lm.parameters()].index(True)
    assert ((fp8_grads[head] - plain_grads[head]).norm() / plain_grads[head].norm()).item() < 0.1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_loss_module_builds_no_key_value_cache(monkeypatch, arch: str) -> None:
    """transformers' decoders build a key/value cache unless told not to (``use_cache`` is on in their configs),
    and filling it copies every layer's keys and values: the loss module's forward, training or evaluating,
    builds none, where the stock call does."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache

    built = []
    init = DynamicCache.__init__
    monkeypatch.setattr(DynamicCache, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    if arch == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=32))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    inputs = torch.randint(0, 128, (2, 16))
    lm(input_ids=inputs)
    assert len(built) == 1  # the stock call: what the loss module must not do
    model = CausalLMWithLoss(lm, fused_cross_entropy=False, logits_gradient_in_forward=True)
    model(inputs, inputs).backward()
    with torch.no_grad():
        model(inputs, inputs)
    assert len(built) == 1


def test_importable_handles_a_missing_parent_package() -> None:
    """``apex.normalization`` without apex is simply not importable (find_spec would raise)."""
    assert importable("torch.nn") and not importable("surely_not_a_package.normalization")


@pytest.mark.parametrize("dynamic", [False, True])
def test_one_compiled_graph_per_shape_or_one_for_all(dynamic: bool) -> None:
    """The shapes compile warms up are the stages' (micro-batch, seq_len), one per stage when they all differ. The
    loss module compiled and its batches marked as the engine does (``compile_forward``, ``mark_dynamic``) builds
    exactly ``Schedule.compiled_graphs`` minus evaluation: with static shapes one graph per shape, with the varying
    sizes marked dynamic one for all three (counted with a backend that records each graph it is given; every
    shape runs twice)."""
    from pipeline.engine import compile_forward, mark_dynamic

    schedule = build_schedule(make_config({"stages": [
        {"until_step": 2, "seq_len": 16, "global_batch": 8, "micro_batch": 8},
        {"until_step": 4, "seq_len": 32, "global_batch": 4, "micro_batch": 4},
        {"until_step": 6, "seq_len": 64, "global_batch": 2, "micro_batch": 2}]}))
    shapes = schedule.distinct_shapes()
    assert shapes == [(8, 16), (4, 32), (2, 64)] and schedule.varying_dims() == (0, 1)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    graphs = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    compiled = compile_forward(CausalLMWithLoss(lm, fused_cross_entropy=False).forward, counting_backend, dynamic)
    for micro_batch, seq_len in shapes * 2:  # every shape twice: the second pass must not compile again
        tokens = torch.randint(0, 64, (micro_batch, seq_len + 1))
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        mark_dynamic((inputs, labels), schedule.varying_dims() if dynamic else ())  # as Engine.forward_backward does
        compiled(inputs, labels)
    assert len(graphs) == schedule.compiled_graphs(dynamic) - 1 == (1 if dynamic else 3)


def test_bench_reports_every_stage_shape(tmp_path, data_dir) -> None:
    """``bench`` on the CPU, through the real engine: one row per distinct stage shape with tok/s, step time and
    the first step's cost, written as JSON (no MFU and no peak memory without a GPU; baseline skipped for time)."""
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT, process_env

    config = tmp_path / "tiny.yaml"
    config.write_text(f"""\
name: bench-test
model: {{arch: llama, preset: tiny, overrides: {{num_hidden_layers: 1, hidden_size: 64, intermediate_size: 128}}}}
data: {{dir: {data_dir}}}
curriculum:
  stages:
    - {{until_step: 4, seq_len: 32, global_batch: 8, micro_batch: 4}}
    - {{until_step: 8, seq_len: 64, global_batch: 4, micro_batch: 4}}
""")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--config", str(config), "--steps", "2",
                           "--warmup", "1", "--no-baseline", "--profile", "--output", str(out)],
                          cwd=REPO_ROOT, env=process_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["micro_batch"], r["grad_accum"], r["seq_len"]) for r in report["shapes"]] == [(4, 2, 32), (4, 1, 64)]
    for row in report["shapes"]:
        assert row["tok_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_time_s"])
        assert row["mfu"] is None and "baseline" not in row
        assert row["peak_memory_gib"] is None and row["peak_reserved_gib"] is None
    assert report["time_to_first_step_s"] > 0 and report["stage_switch_cost_s"] >= 0
    # the profiler sees GPU kernels only, and there is no GPU here
    assert (report["profile"]["by_kind_ms"], report["profile"]["idle_ms"]) == ({}, 0.0)


def test_kernel_gaps_count_overlapping_kernels_once_and_name_their_neighbours() -> None:
    """A kernel that overlaps another (a second stream) leaves no gap; a gap is measured from the end of the kernel
    that ends last (not the one that started last, when it sits inside a longer one); longest gap first."""
    from pipeline.bench import kernel_gaps

    assert kernel_gaps([]) == (0.0, [])
    assert kernel_gaps([(5.0, 6.0, "c"), (0.0, 2.0, "a"), (1.0, 3.0, "b")]) == (6.0, [(3.0, 2.0, "b", "c")])
    # the profiler's times are absolute: offsets count from the first kernel's start
    span, gaps = kernel_gaps([(100.0, 110.0, "long"), (102.0, 103.0, "inside"), (112.0, 113.0, "next"),
                              (116.0, 117.0, "end")])
    assert span == 17.0 and gaps == [(13.0, 3.0, "next", "end"), (10.0, 2.0, "long", "next")]
