"""``doctor``: each planted mistake is flagged with its check id and severity, the shipped recipes pass, and the CLI
exits 0 (warnings only), 1 (an error finding) or 2 (a config that does not load).

Configs point ``data.dir`` at a directory without a manifest, so the vocabulary is GPT-2's 50,257 (padded to
50,304) unless a test writes a manifest. The parameter count is checked against ``transformers`` models built on
the meta device (shapes only, no memory, no weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import make_config, run_cli

from curriculum.config import Config, ModelConfig
from curriculum.loading import load_config, recipe_names
from pipeline import doctor
from pipeline.doctor import Finding, check_config, parameter_count, reference_lr
from pipeline.model import model_config_dict

NO_DATA = {"dir": "no-such-data-dir"}
GPU_ENV = {"CUDA_HOME": "/opt/cuda", "PATH": ""}
"""A GPU machine with a CUDA toolkit and nothing else set."""


def config(stages: list[dict[str, Any]], *, arch: str = "gpt2", preset: str = "tiny", base_lr: float = 1e-3,
           rule: str = "none", data: Optional[dict[str, str]] = None, **sections: Any) -> Config:
    return make_config({"base_lr": base_lr, "lr_scaling": {"rule": rule}, "stages": stages},
                       model={"arch": arch, "preset": preset}, data=data or NO_DATA, **sections)


def findings_of(cfg: Config, device: str = "cpu", environ: Optional[dict[str, str]] = None,
                world_size: int = 1) -> list[Finding]:
    return check_config(cfg, world_size, device, GPU_ENV if environ is None else environ)  # type: ignore[arg-type]


def only(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check]


def one(findings: list[Finding], check: str, severity: str) -> Finding:
    found = only(findings, check)
    assert len(found) == 1, findings
    assert found[0].severity == severity
    return found[0]


# 1.3B llama: 2 x 50,304 x 2,048 embeddings + 24 layers x 50.6M = 1.42B parameters; GPT-3 gives 2e-4 at 1.3B
LLAMA_13B_STAGE = {"until_step": 1000, "seq_len": 1024, "global_batch": 512, "warmup_steps": 100}


def llama_13b(lr: float) -> Config:
    return config([{**LLAMA_13B_STAGE, "lr": lr}], arch="llama", preset="1.3b", base_lr=lr)


# --------------------------------------------------------------------------------------------------- model size


@pytest.mark.parametrize(("arch", "preset", "overrides"), [
    ("llama", "tiny", {}),
    ("llama", "tiny", {"num_key_value_heads": 2, "tie_word_embeddings": True, "attention_bias": True,
                       "mlp_bias": True}),
    ("llama", "1.3b", {}),
    ("gpt2", "tiny", {}),
    ("gpt2", "tiny", {"n_inner": 256, "tie_word_embeddings": False, "num_hidden_layers": 2}),
    ("gpt2", "124m", {}),
])
def test_parameter_count_matches_transformers(arch: str, preset: str, overrides: dict[str, Any]) -> None:
    """The analytic count equals ``sum(p.numel())`` of the model ``build_model`` makes (tied weights once)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from pipeline.model import build_model

    model_config = ModelConfig(arch=arch, preset=preset, overrides=overrides)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = build_model(model_config, 4096, 512, 0)
    expected = sum(p.numel() for p in model.parameters())
    assert parameter_count(model_config_dict(model_config, 4096, 512, 0)) == expected


def test_gpt2_small_count_by_hand() -> None:
    """GPT-2 small with its unpadded vocabulary is the published 124,439,808; padding to 50,304 adds 47 x 768."""
    fields = model_config_dict(ModelConfig(arch="gpt2", preset="124m"), 50257, 1024, 50256)
    assert parameter_count({**fields, "vocab_size": 50257}) == 124_439_808
    assert parameter_count(fields) == 124_439_808 + 47 * 768


def test_reference_lr_follows_gpt3_table() -> None:
    """Table 2.1 values at its own sizes, log-log in between, capped at 3e-3 for very small models."""
    for n_params, lr in doctor.GPT3_LRS:
        assert reference_lr(n_params) == pytest.approx(lr, rel=1e-9)
    assert 2.0e-4 > reference_lr(1.42e9) > 1.6e-4
    assert 6e-4 < reference_lr(89e6) < 1e-3
    assert reference_lr(1.9e6) == doctor.SMALL_MODEL_LR_CAP


def test_vocab_comes_from_the_manifest(tmp_path: Path) -> None:
    """With a manifest the model has its vocabulary (4,096), and the message says where the number came from."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "tokenizer": {"vocab_size": 4096, "eot_id": 0}}))
    stages = [{"until_step": 10, "seq_len": 64, "global_batch": 8, "lr": 1e-3}]
    with_manifest = one(findings_of(config(stages, data={"dir": str(tmp_path)})), "token-budget", "warning")
    assert "vocab 4,096 from" in with_manifest.message and "manifest.json" in with_manifest.message
    without = one(findings_of(config(stages)), "token-budget", "warning")
    assert "vocab 50,257, GPT-2's" in without.message


# --------------------------------------------------------------------------------------------------- LR


def test_lr_ten_times_too_low_on_13b_is_an_error() -> None:
    """2e-5 where GPT-3 used 2e-4 (the exponent slipped by one) is outside [ref / 5, ...]."""
    finding = one(findings_of(llama_13b(2e-5)), "lr-range", "error")
    assert finding.field == "curriculum.stages.0.lr"
    assert "2e-5" in finding.message and "1.42B parameters" in finding.message
    assert "10x too low" in finding.suggestion


def test_lr_ten_times_too_high_on_13b_is_an_error() -> None:
    """2e-3 at full length is 10x the usual LR: above ref x 5 (no short-sequence boost at seq_len == max)."""
    finding = one(findings_of(llama_13b(2e-3)), "lr-range", "error")
    assert "10x too high" in finding.suggestion


def test_usual_lr_on_13b_passes() -> None:
    """2e-4 on the 1.3B preset is GPT-3's own choice: no LR finding."""
    assert not only(findings_of(llama_13b(2e-4)), "lr-range")


def test_short_stages_may_use_up_to_4x_more_lr() -> None:
    """At seq_len 256 of 1024 the upper bound is ref x 5 x 4: 2e-3 passes there and fails at full length."""
    stages = [{"until_step": 500, "seq_len": 256, "global_batch": 512, "lr": 2e-3, "warmup_steps": 100},
              {**LLAMA_13B_STAGE, "lr": 2e-3}]
    found = only(findings_of(config(stages, arch="llama", preset="1.3b")), "lr-range")
    assert [f.field for f in found] == ["curriculum.stages.1.lr"]


def test_hand_lr_three_times_the_rule_is_a_warning() -> None:
    """lr 3e-3 where the rule (none: base_lr) gives 1e-3; within the model's LR range, so only a warning."""
    cfg = config([{"until_step": 100, "seq_len": 256, "global_batch": 16, "lr": 3e-3, "warmup_steps": 10}])
    findings = findings_of(cfg)
    finding = one(findings, "lr-vs-rule", "warning")
    assert "3.00x" in finding.message and "1e-3" in finding.message
    assert not only(findings, "lr-range")


def test_auto_lr_is_not_compared_with_its_own_rule() -> None:
    """lr: auto equals the rule's LR by definition; lr_mult 3 is hand-set and is compared."""
    stages = [{"until_step": 100, "seq_len": 256, "global_batch": 16, "lr": "auto"},
              {"until_step": 200, "seq_len": 256, "global_batch": 16, "lr_mult": 3.0}]
    assert [f.field for f in only(findings_of(config(stages)), "lr-vs-rule")] == ["curriculum.stages.1.lr_mult"]


# --------------------------------------------------------------------------------------------------- schedule


def test_warmup_sixty_percent_of_stage_is_a_warning() -> None:
    """60 warmup steps in a 100-step stage: more than half."""
    cfg = config([{"until_step": 100, "seq_len": 256, "global_batch": 16, "warmup_steps": 60}])
    finding = one(findings_of(cfg), "warmup-share", "warning")
    assert finding.field == "curriculum.stages.0.warmup_steps" and "60%" in finding.message


def test_warmup_longer_than_stage_is_an_error_finding() -> None:
    """build_schedule's ConfigError becomes a finding (no crash); the schedule's checks are skipped."""
    cfg = config([{"until_step": 100, "seq_len": 256, "global_batch": 16, "warmup_steps": 150}])
    findings = findings_of(cfg, "gpu", {"TORCH_CUDA_ARCH_LIST": "9.0a", "CUDA_HOME": "/opt/cuda"})
    finding = one(findings, "warmup-too-long", "error")
    assert finding.field == "curriculum.stages.0.warmup_steps" and "150" in finding.message
    assert {f.check for f in findings} == {"warmup-too-long", "gpu-env"}  # environment checks still ran


def test_batch_not_divisible_by_world_size_is_an_error_finding() -> None:
    cfg = config([{"until_step": 100, "seq_len": 256, "global_batch": 6}])
    finding = one(findings_of(cfg, world_size=4), "schedule", "error")
    assert finding.field == "curriculum.stages.0.global_batch" and "world size 4" in finding.message


def test_tokens_per_step_jump_8x_is_a_warning() -> None:
    """32 x 64 = 2,048 tokens per step, then 32 x 512 = 16,384: 8x at step 100."""
    stages = [{"until_step": 100, "seq_len": 64, "global_batch": 32},
              {"until_step": 200, "seq_len": 512, "global_batch": 32}]
    finding = one(findings_of(config(stages)), "tokens-per-step-jump", "warning")
    assert finding.field == "curriculum.stages.1.global_batch"
    assert "2,048" in finding.message and "16,384" in finding.message and "8x" in finding.message


def test_seq_len_72_is_flagged_on_gpu_only() -> None:
    """72 is a multiple of 8 (valid) but not of 64: a warning when the run is on a GPU, nothing on a CPU."""
    stages = [{"until_step": 100, "seq_len": 72, "global_batch": 16},
              {"until_step": 200, "seq_len": 128, "global_batch": 16}]
    finding = one(findings_of(config(stages), "gpu"), "seq-len-multiple", "warning")
    assert finding.field == "curriculum.stages.0.seq_len"
    assert not only(findings_of(config(stages), "cpu"), "seq-len-multiple")


def test_pacing_lengths_are_one_finding() -> None:
    """A pacing function in steps of 8 has many odd lengths: one finding on its step_size, not one per length."""
    cfg = make_config({"base_lr": 1e-3, "lr_scaling": {"rule": "none"},
                       "pacing": {"type": "fixed_linear", "min_seq_len": 64, "max_seq_len": 256, "step_size": 8,
                                  "total_curriculum_steps": 50, "global_batch": 16, "lr": 1e-3,
                                  "until_step": 100}},
                      model={"arch": "gpt2", "preset": "tiny"}, data=NO_DATA)
    finding = one(findings_of(cfg, "gpu"), "seq-len-multiple", "warning")
    assert finding.field == "curriculum.pacing.step_size"


@pytest.mark.parametrize(("steps", "says"), [(10, "below"), (1_000_000, "above")])
def test_token_budget_far_from_20_per_param_is_a_warning(steps: int, says: str) -> None:
    """tiny gpt2 (7.27M parameters): 10 x 4,096 tokens is 0.006 per parameter; 4.1B tokens is 564."""
    cfg = config([{"until_step": steps, "seq_len": 256, "global_batch": 16}])
    finding = one(findings_of(cfg), "token-budget", "warning")
    assert finding.field == "curriculum.stages.0.until_step"
    assert "145,300,480 tokens" in finding.suggestion  # 20 x 7,265,024


def test_token_budget_near_20_per_param_passes() -> None:
    """35,000 steps x 4,096 tokens = 143M tokens for 7.27M parameters: 19.7 per parameter."""
    assert not only(findings_of(config([{"until_step": 35_000, "seq_len": 256, "global_batch": 16}])),
                    "token-budget")


# --------------------------------------------------------------------------------------------------- deepspeed


STAGE = [{"until_step": 100, "seq_len": 256, "global_batch": 16}]


def test_ds_override_of_an_owned_key_is_an_error_finding() -> None:
    """train_batch_size comes from the stages; setting it in the overrides is an error, not a crash."""
    cfg = config(STAGE, deepspeed={"overrides": {"train_batch_size": 64}})
    finding = one(findings_of(cfg), "ds-config", "error")
    assert finding.field == "deepspeed.overrides.train_batch_size"


def test_a_zero_stage_that_does_not_exist_is_an_error_finding() -> None:
    cfg = config(STAGE, deepspeed={"overrides": {"zero_optimization": {"stage": 4}}})
    assert one(findings_of(cfg), "ds-config", "error").field == "deepspeed.overrides.zero_optimization.stage"


def test_zero3_is_no_finding() -> None:
    cfg = config(STAGE, deepspeed={"overrides": {"zero_optimization": {"stage": 3}}})
    assert [f for f in findings_of(cfg) if f.check == "ds-config"] == []


def test_offload_with_zero0_is_an_error() -> None:
    """The default template is ZeRO stage 0; optimizer offload needs stage 1 or 2."""
    cfg = config(STAGE, deepspeed={"overrides": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}})
    finding = one(findings_of(cfg, "gpu"), "ds-config", "error")
    assert "stage 0" in finding.message


def test_offload_with_zero2_warns_on_cpu_only() -> None:
    """zero2 + offload is a valid GPU setup; on a CPU-only device the offload buys nothing."""
    cfg = config(STAGE, deepspeed={"template": "zero2",
                                   "overrides": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}})
    one(findings_of(cfg, "cpu"), "ds-config", "warning")
    assert not only(findings_of(cfg, "gpu"), "ds-config")


def test_bf16_on_cpu_is_a_warning() -> None:
    cfg = config(STAGE, run={"precision": "bf16"})
    assert one(findings_of(cfg, "cpu"), "ds-config", "warning").field == "run.precision"
    assert not only(findings_of(cfg, "gpu"), "ds-config")


# --------------------------------------------------------------------------------------------------- GPU environment


def test_arch_suffix_is_flagged_on_gpu() -> None:
    """TORCH_CUDA_ARCH_LIST=9.0a crashes DeepSpeed's op builder; the suggestion gives the cleaned value."""
    finding = one(findings_of(config(STAGE), "gpu", {**GPU_ENV, "TORCH_CUDA_ARCH_LIST": "9.0a"}), "gpu-env",
                  "warning")
    assert finding.field == "TORCH_CUDA_ARCH_LIST" and "'9.0'" in finding.suggestion
    assert not only(findings_of(config(STAGE), "cpu", {"TORCH_CUDA_ARCH_LIST": "9.0a"}), "gpu-env")


@pytest.mark.parametrize("value", ["8.0;9.0", "8.6 9.0+PTX", "9.0"])
def test_parseable_arch_lists_pass(value: str) -> None:
    """Separators and +PTX are fine for DeepSpeed; only arch suffixes are flagged."""
    assert not only(findings_of(config(STAGE), "gpu", {**GPU_ENV, "TORCH_CUDA_ARCH_LIST": value}), "gpu-env")


def test_missing_cuda_toolkit_is_flagged_on_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CUDA_HOME, no nvcc on PATH, no default toolkit directory: FusedAdam cannot be compiled."""
    monkeypatch.setattr(doctor, "DEFAULT_CUDA_HOME", str(tmp_path / "no-cuda"))
    finding = one(findings_of(config(STAGE), "gpu", {"PATH": str(tmp_path)}), "gpu-env", "warning")
    assert finding.field == "CUDA_HOME"
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert not only(findings_of(config(STAGE), "gpu", {"PATH": str(tmp_path)}), "gpu-env")


# --------------------------------------------------------------------------------------------------- recipes, CLI


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("name", recipe_names())
def test_shipped_recipes_have_no_errors(name: str, device: str, data_dir: Path) -> None:
    """Every shipped recipe passes (warnings allowed) on prepared data."""
    findings = findings_of(load_config(name, [f"data.dir={data_dir}"], environ={}), device)
    assert not [f for f in findings if f.severity == "error"], findings


def test_missing_data_is_an_error(tmp_path: Path) -> None:
    """No data directory, or one without a manifest: an error (train would stop there), exit status 1."""
    finding = one(findings_of(config(STAGE)), "data", "error")
    assert finding.field == "data.dir" and "no-such-data-dir does not exist" in finding.message
    empty = one(findings_of(config(STAGE, data={"dir": str(tmp_path)})), "data", "error")
    assert "has no manifest.json" in empty.message and "prepare-data" in empty.suggestion
    result = run_cli(["doctor", "--config", "tiny-cpu", "--device", "cpu", "--set", f"data.dir={tmp_path}"])
    assert result.returncode == 1 and "error: data (data.dir)" in result.stdout


def test_cli_exit_statuses(data_dir: Path) -> None:
    """0 for a recipe, 1 for a planted error (LR 10x too high), 2 for a config that does not load."""
    ok = run_cli(["doctor", "--config", "gpt2-124m-baseline", "--device", "cpu", "--set", f"data.dir={data_dir}"])
    assert ok.returncode == 0, ok.stderr
    assert "0 errors" in ok.stdout
    bad = run_cli(["doctor", "--config", "gpt2-124m-baseline", "--device", "cpu", "--json",
                   "--set", f"data.dir={data_dir}", "--set", "curriculum.stages.0.lr=6e-2"])
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["errors"] == 1 and report["findings"][0]["check"] == "lr-range"
    unknown = run_cli(["doctor", "--config", "tiny-cpu", "--device", "cpu", "--set", "curriculum.bogus=1"])
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: curriculum.bogus")


def test_without_deepspeed_doctor_warns_and_runs_its_other_checks(data_dir: Path, tmp_path: Path) -> None:
    """Where DeepSpeed does not import, doctor says so in one warning (its config classes' checks skipped) and runs
    the rest, for a run config and for a DeepSpeed JSON: no traceback; a planted LR error is still found."""
    run = run_cli(["doctor", "--config", "tiny-cpu", "--device", "cpu", "--json", "--set", f"data.dir={data_dir}",
                   "--set", "curriculum.stages.0.lr=5"], not_installed=["deepspeed"])
    assert run.returncode == 1, run.stderr
    findings = json.loads(run.stdout)["findings"]
    assert [f["check"] for f in findings if f["check"] in ("deepspeed", "lr-range")] == ["lr-range", "deepspeed"]
    assert "DeepSpeed cannot be imported here" in next(f["message"] for f in findings if f["check"] == "deepspeed")
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 8, "zero_optimisation": {"stage": 2}}))
    tool = run_cli(["doctor", "--ds-config", str(ds_json), "--params", "124e6"], not_installed=["deepspeed"])
    assert tool.returncode == 0 and "Traceback" not in tool.stderr, tool.stderr
    assert "warning: deepspeed (ds.json)" in tool.stdout
    assert "unknown key" not in tool.stdout  # the misspelt key is DeepSpeed's classes' to find


def test_a_command_without_a_required_package_is_one_line(tmp_path: Path) -> None:
    """train where DeepSpeed is not installed, and plan where numpy is not (imported while the commands are
    gathered): one line naming the package and the README's setup, exit status 4."""
    for args, package in ((["train", "--config", "tiny-cpu", "--output-dir", str(tmp_path / "run")], "deepspeed"),
                          (["plan", "--config", "tiny-cpu"], "numpy")):
        result = run_cli(args, not_installed=[package])
        assert result.returncode == 4, result.stderr
        assert result.stderr.startswith(f"error: {package} is not installed (") and "Traceback" not in result.stderr
        assert "README, Quick start" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_module_missing_inside_an_installed_package_stays_a_traceback(tmp_path: Path) -> None:
    """A module that does not import inside this project (or inside any installed package) is a bug in the import,
    not an installation to fix: the traceback stays, ending in that module's error."""
    result = run_cli(["train", "--config", "tiny-cpu", "--output-dir", str(tmp_path / "run")],
                     not_installed=["pipeline.engine"])
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "is not installed" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ModuleNotFoundError: import of pipeline.engine halted")


def test_ds_config_without_deepspeed_prints_the_json_and_says_it_is_unchecked() -> None:
    """ds-config where DeepSpeed is not installed: the derived JSON (a misspelt key in it unjudged) and a warning
    on stderr that DeepSpeed's own checks did not run."""
    result = run_cli(["ds-config", "--config", "tiny-cpu", "--set", "deepspeed.overrides.zero_optimization.stagee=1"],
                     not_installed=["deepspeed"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["zero_optimization"]["stagee"] == 1
    assert result.stderr.startswith("warning: DeepSpeed cannot be imported here (")
    assert result.stderr.rstrip().endswith("was not checked")


def test_a_compiled_run_with_many_shapes_is_a_warning_on_gpu() -> None:
    """Li et al.'s pacing at step 8 builds 121 + 1 graphs before step 0 on a GPU: a warning that names the bucket
    (and mentions dynamic shapes, which still warm up 121 lengths, so the warning stays with them); with ``bucket:
    64`` (16 + 1 graphs), on a CPU (no compile) or with ``compile: false`` there is none."""
    pacing = {"type": "fixed_linear", "min_seq_len": 64, "max_seq_len": 1024, "step_size": 8,
              "total_curriculum_steps": 150, "global_batch": 64, "lr": 6e-4, "until_step": 450}
    many = make_config({"pacing": pacing}, data=NO_DATA)
    finding = one(findings_of(many, device="gpu"), "compile-shapes", "warning")
    assert finding.field == "curriculum.pacing.bucket" and "122 graphs" in finding.message
    assert "bucket: 64" in finding.suggestion and "dynamic_shapes: auto" in finding.suggestion
    bucketed = make_config({"pacing": {**pacing, "bucket": 64}}, data=NO_DATA)
    assert only(findings_of(bucketed, device="gpu"), "compile-shapes") == []
    dynamic = make_config({"pacing": pacing}, data=NO_DATA, kernels={"dynamic_shapes": "auto"})
    assert one(findings_of(dynamic, device="gpu"), "compile-shapes", "warning") == finding
    assert only(findings_of(many, device="cpu"), "compile-shapes") == []
    eager = make_config({"pacing": pacing}, data=NO_DATA, kernels={"compile": False})
    assert only(findings_of(eager, device="gpu"), "compile-shapes") == []


def test_doctor_and_plan_read_the_same_config_under_an_overlay(tmp_path: Path) -> None:
    """An overlay capping stage 0's LR at 1e-5 is in what `plan` shows and in what `doctor` checks (a peak LR far
    below the usual one for the model), and neither sees it without the overlay."""
    overlay = tmp_path / "caps.yaml"
    overlay.write_text("curriculum:\n  stages:\n    - {lr_max: 1.0e-5}\n")
    plan = run_cli(["plan", "--config", "tiny-cpu", "--overlay", str(overlay)])
    assert plan.returncode == 0, plan.stderr
    assert "1.00e-05 (cap)" in plan.stdout
    capped = run_cli(["doctor", "--config", "tiny-cpu", "--overlay", str(overlay), "--json"])
    fields = [f["field"] for f in json.loads(capped.stdout)["findings"] if f["check"] == "lr-range"]
    assert fields == ["curriculum.stages.0.lr_max"], capped.stdout
    plain = run_cli(["doctor", "--config", "tiny-cpu", "--json"])
    assert [f for f in json.loads(plain.stdout)["findings"] if f["check"] == "lr-range"] == []
    assert "1.00e-05" not in run_cli(["plan", "--config", "tiny-cpu"]).stdout
