"""``curriculum-pretrain doctor``: sanity checks of a run config before launch.

Each finding names its check, the config field, the numbers and a suggestion. Errors are settings the run should
not start with (exit status 1); warnings are worth a look (exit status 0). A config that does not load at all (bad
YAML, unknown key) is bad input, like for every other command: one line and exit status 2.

    check                 severity  flags
    schedule              error     ``build_schedule`` rejects the config (batch not divisible by the world size, ...)
    warmup-too-long       error     a warmup longer than its stage (from ``build_schedule``)
    ds-config             error     ``derive_ds_config`` rejects it (owned keys, ZeRO-3); CPU optimizer offload with
                                    ZeRO stage 0 (offload needs stage 1 or 2)
                          warning   ``run.precision: bf16`` on a CPU (slow); optimizer offload on a CPU-only device
    model                 error     the model section does not resolve (``model_config_dict`` rejects it)
    data                  error     ``<data.dir>/manifest.json`` exists but cannot be read
    lr-range              error     a peak LR outside ``[ref / 5, ref * 5 * boost]``: ``ref`` is the GPT-3 LR for the
                                    parameter count, ``boost = min(max_seq_len / seq_len, 4)`` for short stages
    lr-vs-rule            warning   a hand-set LR (``lr: <number>`` or ``lr_mult``) over 2x away from the scaling rule's
    warmup-share          warning   warmup longer than half its stage
    tokens-per-step-jump  warning   tokens per step changing by more than 4x between consecutive stages
    seq-len-multiple      warning   on GPU: a sequence length that is not a multiple of 64
    token-budget          warning   fewer than 5 or more than 200 training tokens per parameter (Chinchilla: ~20)
    gpu-env               warning   on GPU: ``TORCH_CUDA_ARCH_LIST`` with arch suffixes (``9.0a``); no CUDA toolkit
                                    for DeepSpeed's JIT builds (FusedAdam)
    compile-shapes        warning   a compiled run (``kernels.compile`` on a GPU) with more than 32 graphs to build
                                    (distinct training shapes + evaluation; 20-60 s each for a 124M model)

The parameter count is computed from the transformers config fields (``pipeline.model.model_config_dict``) without
building the model, so the command needs no torch. ``--device auto`` imports torch only to ask whether CUDA is
available, and counts as CPU when torch is missing. ``lr_events`` (multiplicative LR changes) are not part of the LR
checks: they usually anneal on purpose.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from curriculum.config import Config, SegmentSettings
from curriculum.errors import ConfigError
from curriculum.schedule import LRWindow, Schedule, Stage, build_schedule
from pipeline.commands import load_config_from_args, world_size_argument
from pipeline.data import MANIFEST_FILE, read_manifest
from pipeline.ds_config import cpu_offload, derive_ds_config, resolve_precision
from pipeline.environment import sanitize_cuda_arch_list
from pipeline.model import model_config_dict

Severity = Literal["error", "warning"]
Device = Literal["cpu", "gpu"]

# GPT-3 paper (Brown et al. 2020), table 2.1: parameter count -> peak learning rate.
GPT3_LRS: tuple[tuple[float, float], ...] = (
    (125e6, 6.0e-4), (350e6, 3.0e-4), (760e6, 2.5e-4), (1.3e9, 2.0e-4),
    (2.7e9, 1.6e-4), (6.7e9, 1.2e-4), (13e9, 1.0e-4), (175e9, 0.6e-4),
)
SMALL_MODEL_LR_CAP = 3e-3
"""Below 125M the table's trend is extrapolated, up to this LR (a 2M model's trend value is ~1e-2)."""
LR_BAND = 5.0
"""A stage's peak LR may be up to 5x below or above the reference (x boost above) before it is an error."""
SEQ_WARMUP_LR_BOOST = 4.0
"""Li, Zhang, He 2022: sequence-length warmup trained stably with 4x the baseline LR."""
LR_RULE_RATIO = 2.0
WARMUP_SHARE = 0.5
TOKENS_PER_STEP_JUMP = 4.0
GPU_SEQ_LEN_MULTIPLE = 64
CHINCHILLA_TOKENS_PER_PARAM = 20.0
TOKENS_PER_PARAM_RANGE = (5.0, 200.0)
MAX_COMPILED_GRAPHS = 32
DEFAULT_VOCAB_SIZE = 50257  # GPT-2's tokenizer, when the data is not prepared yet
DEFAULT_CUDA_HOME = "/usr/local/cuda"  # where torch's extension builder looks when CUDA_HOME is unset


@dataclass(frozen=True)
class Finding:
    """One problem: which check found it, where in the config, what the numbers are and what to do."""

    severity: Severity
    check: str
    field: str
    message: str
    suggestion: str


@dataclass(frozen=True)
class Vocab:
    """The tokenizer vocabulary the model will get, and where that number came from."""

    size: int
    eot_id: int
    source: str


# --------------------------------------------------------------------------------------------------- entry points


def check_config(config: Config, world_size: int, device: Device,
                 environ: Optional[Mapping[str, str]] = None) -> list[Finding]:
    """Every check on a loaded config; ``environ`` (default ``os.environ``) is only read."""
    environ = os.environ if environ is None else environ
    findings: list[Finding] = []
    if device == "gpu":
        findings += check_gpu_env(environ)
    findings += check_precision(config, device)
    try:
        schedule = build_schedule(config, world_size)
    except ConfigError as err:
        check = "warmup-too-long" if "warmup" in err.field.rsplit(".", 1)[-1] else "schedule"
        return [Finding("error", check, err.field, str(err),
                        "fix this first; the checks that need the resolved schedule were skipped")] + findings
    findings += check_ds_config(config, schedule, device)
    findings += check_warmup_share(config, schedule)
    findings += check_tokens_per_step_jump(config, schedule)
    if device == "gpu":
        findings += check_seq_len_multiple(config, schedule)
        findings += check_compile_shapes(config, schedule)
    vocab, data_findings = read_vocab(config)
    findings += data_findings
    try:
        n_params = parameter_count(model_config_dict(config.model, vocab.size, schedule.max_seq_len, vocab.eot_id))
    except ConfigError as err:  # overrides of the wrong kind, or a position range short of the longest stage
        return findings + [Finding("error", "model", err.field, str(err),
                                   "fix the model section; the LR and token-budget checks were skipped")]
    findings += check_lr_range(config, schedule, n_params, vocab)
    findings += check_lr_vs_rule(config, schedule)
    findings += check_token_budget(config, schedule, n_params, vocab)
    return findings


def _errors_first(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: f.severity != "error")


HELP = "sanity-check a config before launch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands import add_config_arguments, add_world_size_argument

    add_config_arguments(parser)
    add_world_size_argument(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where the run will train (auto: this machine)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    """The CLI: load (a bad config raises ``ConfigError``: exit 2), check, print; exit 1 if any error."""
    config = load_config_from_args(args)
    world_size = world_size_argument(args.world_size)
    device = resolve_device(args.device)
    findings = _errors_first(check_config(config, world_size, device, os.environ))
    if args.json:
        print(json.dumps(report_dict(findings), indent=2))
    else:
        print(f"{config.name}: {config.model.arch} {config.model.preset}, world size {world_size}, {device}")
        print(format_report(findings))
    return 1 if any(f.severity == "error" for f in findings) else 0


def resolve_device(device: str) -> Device:
    """``auto``: ``gpu`` when torch is installed and sees CUDA, else ``cpu``."""
    if device in ("cpu", "gpu"):
        return device  # type: ignore[return-value]
    try:
        import torch
    except (ImportError, OSError):  # not installed, or its CUDA libraries do not load
        return "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def report_dict(findings: list[Finding]) -> dict[str, Any]:
    return {"findings": [asdict(f) for f in findings],
            "errors": sum(f.severity == "error" for f in findings),
            "warnings": sum(f.severity == "warning" for f in findings)}


def format_report(findings: list[Finding]) -> str:
    blocks = [f"{f.severity}: {f.check} ({f.field})\n  {f.message}\n  suggestion: {f.suggestion}" for f in findings]
    counts = report_dict(findings)
    errors, warnings = counts["errors"], counts["warnings"]
    blocks.append(f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}")
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------------- model size


def read_vocab(config: Config) -> tuple[Vocab, list[Finding]]:
    """The prepared data's vocabulary, or GPT-2's 50,257 when ``data.dir`` has no manifest yet."""
    manifest_path = Path(config.data.dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        return Vocab(DEFAULT_VOCAB_SIZE, 0, f"vocab {DEFAULT_VOCAB_SIZE:,}, GPT-2's: no {manifest_path}"), []
    try:
        tokenizer = read_manifest(config.data.dir)["tokenizer"]
        return Vocab(int(tokenizer["vocab_size"]), int(tokenizer["eot_id"]),
                     f"vocab {int(tokenizer['vocab_size']):,} from {manifest_path}"), []
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        vocab = Vocab(DEFAULT_VOCAB_SIZE, 0, f"vocab {DEFAULT_VOCAB_SIZE:,}, GPT-2's: {manifest_path} is unreadable")
        return vocab, [Finding("error", "data", "data.dir", f"{manifest_path} cannot be read: {err}",
                               "prepare the data again with `curriculum-pretrain prepare-data`")]


def parameter_count(fields: Mapping[str, Any]) -> int:
    """Parameters of the ``*ForCausalLM`` that ``fields`` (from ``model_config_dict``) builds, counted by hand.

    Llama: embeddings, per layer q/k/v/o (grouped KV heads allowed) + gate/up/down + 2 RMSNorm weights, final
    norm, and an lm_head unless ``tie_word_embeddings``. GPT-2: token and position tables, per layer ln_1, c_attn,
    attn c_proj, ln_2, c_fc, mlp c_proj (Conv1D weights and biases; LayerNorm weight and bias), ln_f; the lm_head is
    tied unless ``tie_word_embeddings: false``.
    """
    vocab, arch = int(fields["vocab_size"]), fields["model_type"]
    if arch == "llama":
        d, layers = int(fields["hidden_size"]), int(fields["num_hidden_layers"])
        heads = int(fields["num_attention_heads"])
        kv_heads = int(fields.get("num_key_value_heads") or heads)
        head_dim = int(fields.get("head_dim") or d // heads)
        inner = int(fields["intermediate_size"])
        attn_bias, mlp_bias = bool(fields.get("attention_bias", False)), bool(fields.get("mlp_bias", False))
        q, kv = heads * head_dim, kv_heads * head_dim
        attention = d * q + 2 * d * kv + q * d + attn_bias * (q + 2 * kv + d)
        mlp = 3 * d * inner + mlp_bias * (2 * inner + d)
        per_layer = attention + mlp + 2 * d
        head = 0 if fields.get("tie_word_embeddings", False) else vocab * d
        return vocab * d + layers * per_layer + d + head
    d, layers, positions = int(fields["n_embd"]), int(fields["n_layer"]), int(fields["n_positions"])
    inner = int(fields.get("n_inner") or 4 * d)
    per_layer = (2 * d                    # ln_1
                 + d * 3 * d + 3 * d      # c_attn
                 + d * d + d              # attn c_proj
                 + 2 * d                  # ln_2
                 + d * inner + inner      # c_fc
                 + inner * d + d)         # mlp c_proj
    head = 0 if fields.get("tie_word_embeddings", True) else vocab * d
    return vocab * d + positions * d + layers * per_layer + 2 * d + head


def reference_lr(n_params: float) -> float:
    """GPT-3's peak LR for ``n_params``, log-log interpolated in table 2.1 (extrapolated past either end, at
    most ``SMALL_MODEL_LR_CAP``): 1.3B -> 2e-4, 125M -> 6e-4, 89M -> 7.5e-4, 2M -> 3e-3 (the cap)."""
    sizes = [math.log(n) for n, _ in GPT3_LRS]
    lrs = [math.log(lr) for _, lr in GPT3_LRS]
    x = math.log(n_params)
    i = min(max(bisect.bisect_right(sizes, x) - 1, 0), len(sizes) - 2)  # the segment, or the end one
    slope = (lrs[i + 1] - lrs[i]) / (sizes[i + 1] - sizes[i])
    return min(math.exp(lrs[i] + slope * (x - sizes[i])), SMALL_MODEL_LR_CAP)


# --------------------------------------------------------------------------------------------------- LR checks


def check_lr_range(config: Config, schedule: Schedule, n_params: int, vocab: Vocab) -> list[Finding]:
    """Each LR window's peak against GPT-3's LR for the model size, with more room above for short sequences."""
    ref = reference_lr(n_params)
    findings = []
    for stage in _peak_stages(schedule):
        boost = min(schedule.max_seq_len / stage.seq_len, SEQ_WARMUP_LR_BOOST)
        low, high = ref / LR_BAND, ref * LR_BAND * boost
        if low <= stage.peak_lr <= high:
            continue
        findings.append(Finding(
            "error", "lr-range", _lr_field(config, stage),
            f"peak LR {_lr(stage.peak_lr)} ({_lr_origin(config, stage)}) is {_times(stage.peak_lr / ref)} the usual "
            f"{_lr(ref)} for {_human(n_params)} parameters ({config.model.arch} {config.model.preset}, "
            f"{vocab.source}); at seq_len {stage.seq_len} of {schedule.max_seq_len} the allowed band is "
            f"{_lr(low)} .. {_lr(high)}",
            _lr_range_suggestion(stage.peak_lr, ref, boost, stage.seq_len)))
    return findings


def _lr_range_suggestion(peak_lr: float, ref: float, boost: float, seq_len: int) -> str:
    suggestion = f"use a peak LR near {_lr(ref)} (GPT-3 table 2.1, interpolated)"
    if boost > 1:
        suggestion += f"; sequence-length warmup allows up to {_lr(ref * boost)} at seq_len {seq_len}"
    decades = math.log10(peak_lr / ref)
    if round(decades) != 0 and abs(decades - round(decades)) < 0.2:
        direction = "high" if decades > 0 else "low"
        suggestion += f"; about {10 ** abs(round(decades)):g}x too {direction}: check the exponent"
    return suggestion


def check_lr_vs_rule(config: Config, schedule: Schedule) -> list[Finding]:
    """A hand-set peak LR more than 2x away from what ``curriculum.lr_scaling`` gives the same stage."""
    findings = []
    scaling = config.curriculum.lr_scaling
    for stage in _peak_stages(schedule):
        if stage.lr_source == "auto":
            continue
        ratio = stage.peak_lr / stage.rule_lr
        if 1 / LR_RULE_RATIO <= ratio <= LR_RULE_RATIO:
            continue
        findings.append(Finding(
            "warning", "lr-vs-rule", _lr_field(config, stage),
            f"peak LR {_lr(stage.peak_lr)} ({_lr_origin(config, stage)}) is {ratio:.2f}x the {scaling.rule} rule's "
            f"{_lr(stage.rule_lr)} for global batch {stage.global_batch} at seq_len {stage.seq_len}",
            f"if the rule is right, use lr: auto; otherwise check base_lr {_lr(config.curriculum.base_lr)} and "
            f"lr_scaling (rule {scaling.rule}, ref_batch {scaling.ref_batch})"))
    return findings


def _peak_stages(schedule: Schedule) -> list[Stage]:
    """One stage per LR window: the one where the window reaches its peak (the end of its warmup).

    Discrete stages each have their own window; a pacing function has one window over many lengths."""
    stages: list[Stage] = []
    seen: list[LRWindow] = []
    for stage in schedule.stages:
        window = stage.window
        if any(window is w for w in seen):
            continue
        seen.append(window)
        peak_step = window.start_step + max(window.warmup_steps - 1, 0)
        stages.append(schedule.stage_at(min(peak_step, schedule.total_steps - 1)))
    return stages


def _segment_path(config: Config, stage: Stage) -> str:
    return f"curriculum.stages.{stage.index}" if config.curriculum.stages is not None else "curriculum.pacing"


def _segment(config: Config, stage: Stage) -> SegmentSettings:
    """The config entry a resolved stage comes from: its stage, or the pacing section."""
    cur = config.curriculum
    segment = cur.stages[stage.index] if cur.stages is not None else cur.pacing
    assert segment is not None  # the config validator requires stages or pacing
    return segment


def _capped(config: Config, stage: Stage) -> bool:
    """Whether the segment's ``lr_max`` (where the config has one) set the peak LR."""
    lr_max = getattr(_segment(config, stage), "lr_max", None)
    return lr_max is not None and stage.peak_lr == lr_max


def _lr_field(config: Config, stage: Stage) -> str:
    if _capped(config, stage):
        name = "lr_max"
    else:
        name = "lr_mult" if stage.lr_source == "multiplier" else "lr"
    return f"{_segment_path(config, stage)}.{name}"


def _lr_origin(config: Config, stage: Stage) -> str:
    segment, base_lr = _segment(config, stage), config.curriculum.base_lr
    if _capped(config, stage):
        return "capped by lr_max"
    if stage.lr_source == "multiplier":
        return f"lr_mult {segment.lr_mult:g} x base_lr {_lr(base_lr)}"
    if stage.lr_source == "auto":
        return f"lr: auto, {config.curriculum.lr_scaling.rule} rule from base_lr {_lr(base_lr)}"
    return "set by hand"


# --------------------------------------------------------------------------------------------------- schedule


def check_warmup_share(config: Config, schedule: Schedule) -> list[Finding]:
    """A warmup over half its stage leaves little of the stage at the peak LR or decaying from it."""
    findings = []
    for stage in _peak_stages(schedule):
        window = stage.window
        steps = window.end_step - window.start_step
        if window.warmup_steps <= WARMUP_SHARE * steps:
            continue
        warmup_key = "warmup_tokens" if _segment(config, stage).warmup_tokens is not None else "warmup_steps"
        findings.append(Finding(
            "warning", "warmup-share", f"{_segment_path(config, stage)}.{warmup_key}",
            f"warmup of {window.warmup_steps} steps is {window.warmup_steps / steps:.0%} of its stage "
            f"(steps {window.start_step} .. {window.end_step - 1}, {steps} steps): stage too short for its warmup",
            f"keep warmup at most {int(WARMUP_SHARE * steps)} steps ({WARMUP_SHARE:.0%}) or lengthen the stage"))
    return findings


def check_tokens_per_step_jump(config: Config, schedule: Schedule) -> list[Finding]:
    """Tokens per step changing >4x at a stage boundary: the gradient noise scale jumps with it."""
    findings = []
    for before, after in zip(schedule.stages, schedule.stages[1:]):
        ratio = after.tokens_per_step / before.tokens_per_step
        if 1 / TOKENS_PER_STEP_JUMP <= ratio <= TOKENS_PER_STEP_JUMP:
            continue
        findings.append(Finding(
            "warning", "tokens-per-step-jump", f"{_segment_path(config, after)}.global_batch",
            f"tokens per step go from {before.tokens_per_step:,} ({before.global_batch} x {before.seq_len}) to "
            f"{after.tokens_per_step:,} ({after.global_batch} x {after.seq_len}) at step {after.start_step}: "
            f"{ratio:.3g}x",
            f"change tokens per step by at most {TOKENS_PER_STEP_JUMP:g}x per stage (scale global_batch inversely "
            f"with seq_len, or use global_batch_tokens), or add an intermediate stage"))
    return findings


def check_seq_len_multiple(config: Config, schedule: Schedule) -> list[Finding]:
    """On GPU, lengths that are not multiples of 64 leave attention and matmul tiles partly empty."""
    odd = [stage for stage in schedule.stages if stage.seq_len % GPU_SEQ_LEN_MULTIPLE]
    if not odd:
        return []
    suggestion = f"use seq_len multiples of {GPU_SEQ_LEN_MULTIPLE} on GPU (64, 128, 192, 256, ...)"
    if config.curriculum.stages is not None:
        return [Finding("warning", "seq-len-multiple", f"curriculum.stages.{stage.index}.seq_len",
                        f"seq_len {stage.seq_len} is not a multiple of {GPU_SEQ_LEN_MULTIPLE} "
                        f"({stage.seq_len % GPU_SEQ_LEN_MULTIPLE} tokens over {stage.seq_len // 64 * 64})",
                        suggestion) for stage in odd]
    lengths = ", ".join(str(stage.seq_len) for stage in odd[:5]) + (", ..." if len(odd) > 5 else "")
    return [Finding("warning", "seq-len-multiple", "curriculum.pacing.step_size",
                    f"{len(odd)} of the pacing function's {len(schedule.stages)} lengths are not multiples of "
                    f"{GPU_SEQ_LEN_MULTIPLE} ({lengths})",
                    f"{suggestion}: a step_size and min_seq_len of {GPU_SEQ_LEN_MULTIPLE}")]


def check_compile_shapes(config: Config, schedule: Schedule) -> list[Finding]:
    """A compiled run builds one graph per distinct training shape and one for evaluation before step 0."""
    graphs = len(schedule.distinct_shapes()) + 1
    if config.kernels.compile is False or graphs <= MAX_COMPILED_GRAPHS:
        return []
    pacing = config.curriculum.pacing
    field = "curriculum.pacing.bucket" if pacing is not None else "curriculum.stages"
    fix = ("set curriculum.pacing.bucket: 64 (lengths rounded down to multiples of 64)" if pacing is not None
           else "merge stages into fewer distinct (micro-batch, seq_len) shapes")
    return [Finding("warning", "compile-shapes", field,
                    f"kernels.compile builds {graphs} graphs before step 0 ({graphs - 1} training shapes + "
                    f"evaluation), 20-60 s each for a 124M model on an H100-class GPU",
                    f"{fix}, or set kernels.compile: false for a short run")]


def check_token_budget(config: Config, schedule: Schedule, n_params: int, vocab: Vocab) -> list[Finding]:
    """Training tokens per parameter far from Chinchilla's compute-optimal ~20."""
    per_param = schedule.total_tokens / n_params
    low, high = TOKENS_PER_PARAM_RANGE
    if low <= per_param <= high:
        return []
    optimal = CHINCHILLA_TOKENS_PER_PARAM * n_params
    field = _budget_field(config)
    return [Finding(
        "warning", "token-budget", field,
        f"{schedule.total_tokens:,} training tokens for {_human(n_params)} parameters ({vocab.source}) is "
        f"{per_param:.3g} tokens per parameter, outside {low:g} .. {high:g}",
        f"{CHINCHILLA_TOKENS_PER_PARAM:g} tokens per parameter (Chinchilla) would be {optimal:,.0f} tokens; fine "
        f"for a smoke test or a deliberately over-trained small model")]


def _budget_field(config: Config) -> str:
    """Where the run's length is set: ``run.total_steps``/``total_tokens``, or the last segment's end."""
    for name in ("total_steps", "total_tokens"):
        if getattr(config.run, name) is not None:
            return f"run.{name}"
    cur = config.curriculum
    if cur.stages is not None:
        last, path = cur.stages[-1], f"curriculum.stages.{len(cur.stages) - 1}"
    else:
        last, path = cur.pacing, "curriculum.pacing"
    return f"{path}.until_tokens" if last is not None and last.until_tokens is not None else f"{path}.until_step"


# --------------------------------------------------------------------------------------------------- deepspeed


def check_ds_config(config: Config, schedule: Schedule, device: Device) -> list[Finding]:
    """``derive_ds_config`` errors, and optimizer offload that cannot work or will not help."""
    try:
        ds = derive_ds_config(config, schedule, resolve_precision(config.run.precision, bf16_gpu=device == "gpu"))
    except ConfigError as err:
        return [Finding("error", "ds-config", err.field, str(err),
                        "fix deepspeed.template / deepspeed.overrides as the message says: batch sizes, clipping, "
                        "precision and the optimizer come from the run config, not the DeepSpeed JSON")]
    if not cpu_offload(ds):
        return []
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    where = ("deepspeed.overrides.zero_optimization.offload_optimizer"
             if "zero_optimization" in config.deepspeed.overrides else "deepspeed.template")
    if zero_stage == 0:
        return [Finding("error", "ds-config", where,
                        f"offload_optimizer.device is cpu with ZeRO stage {zero_stage}: optimizer offload is part of "
                        f"ZeRO and needs stage 1 or 2",
                        "set deepspeed.overrides.zero_optimization.stage to 1 or 2 (or template zero2), or drop "
                        "the offload")]
    if device == "cpu":
        return [Finding("warning", "ds-config", where,
                        "offload_optimizer.device is cpu on a CPU-only device: the optimizer state is there already, "
                        "and the offload adds DeepSpeed's CPUAdam build",
                        "drop offload_optimizer for CPU runs")]
    return []


def check_precision(config: Config, device: Device) -> list[Finding]:
    if not config.run.precision.startswith("bf16") or device != "cpu":
        return []
    return [Finding("warning", "ds-config", "run.precision",
                    f"run.precision is {config.run.precision} on a CPU: without bf16 matmul units (most CPUs) it is "
                    "slower than fp32",
                    "use run.precision: auto (bf16 with fp32 weights on a capable GPU, fp32 on CPU)")]


# --------------------------------------------------------------------------------------------------- GPU environment


def check_gpu_env(environ: Mapping[str, str]) -> list[Finding]:
    """Environment variables that break DeepSpeed's JIT op builds (FusedAdam) on a GPU machine."""
    findings = []
    arch_list = environ.get("TORCH_CUDA_ARCH_LIST", "")
    scratch = {"TORCH_CUDA_ARCH_LIST": arch_list}
    sanitize_cuda_arch_list(scratch)
    # the sanitizer also rewrites ';' separators, which DeepSpeed parses fine: flag only changed entries
    given = list(dict.fromkeys(part for part in re.split(r"[;\s]+", arch_list.strip()) if part))
    if given != scratch["TORCH_CUDA_ARCH_LIST"].split():
        findings.append(Finding(
            "warning", "gpu-env", "TORCH_CUDA_ARCH_LIST",
            f"TORCH_CUDA_ARCH_LIST={arch_list!r} has arch suffixes; DeepSpeed's op builder parses entries as "
            f"major.minor and crashes on them (invalid literal for int(): '0a')",
            f"the trainer rewrites it to {scratch['TORCH_CUDA_ARCH_LIST']!r}; export that value so that other "
            f"DeepSpeed builds (ds_report, pre-built ops) work too"))
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    cuda_home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if not cuda_home and nvcc is None and not Path(DEFAULT_CUDA_HOME).is_dir():
        findings.append(Finding(
            "warning", "gpu-env", "CUDA_HOME",
            f"CUDA_HOME is unset, no nvcc on PATH and no {DEFAULT_CUDA_HOME}: DeepSpeed's FusedAdam is compiled "
            f"on first use and needs the CUDA toolkit",
            "install the CUDA toolkit matching torch.version.cuda and set CUDA_HOME (builds are cached in "
            "TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)"))
    return findings


def _lr(value: float) -> str:
    """``6e-4``, ``2.5e-4``, ``6.78e-3``: LRs in the form they are written in configs."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _times(ratio: float) -> str:
    """``130x``, ``8x``, ``0.1x``."""
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def _human(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"
