"""``curriculum-pretrain doctor``: sanity checks of a run config before launch.

Each finding names its check, the config field, the numbers and a suggestion. Errors are settings the run should
not start with (exit status 1); warnings are worth a look (exit status 0). A config that does not load at all (bad
YAML, unknown key) is bad input, like for every other command: one line and exit status 2.

    check                 severity  flags
    schedule              error     ``build_schedule`` rejects the config (batch not divisible by the world size, ...)
    warmup-too-long       error     a warmup longer than its stage (from ``build_schedule``)
    ds-config             error     ``derive_ds_config`` rejects it (owned keys, ZeRO-3, what DeepSpeed's own config
                                    classes refuse); CPU optimizer offload with ZeRO stage 0 (offload needs stage 1
                                    or 2)
                          warning   ``run.precision: bf16`` on a CPU (slow); optimizer offload on a CPU-only device
    model                 error     the model section does not resolve (``model_config_dict`` rejects it)
    data                  error     ``data.dir`` does not exist, has no ``manifest.json``, or it cannot be read
    lr-range              error     a peak LR outside ``[ref / 5, ref * 5 * boost]``: ``ref`` is the GPT-3 LR for the
                                    parameter count, ``boost = min(max_seq_len / seq_len, 4)`` for short stages
    lr-vs-rule            warning   a hand-set LR (``lr: <number>`` or ``lr_mult``) over 2x away from the scaling rule's
    warmup-share          warning   warmup longer than half its stage
    tokens-per-step-jump  warning   tokens per step changing by more than 4x between consecutive stages
    seq-len-multiple      warning   on GPU: a sequence length that is not a multiple of 64
    token-budget          warning   fewer than 5 or more than 200 training tokens per parameter (Chinchilla: ~20)
    deepspeed             warning   DeepSpeed cannot be imported here: what its config classes refuse is not checked
    gpu-env               warning   on GPU: ``TORCH_CUDA_ARCH_LIST`` with arch suffixes (``9.0a``); no CUDA toolkit
                                    for DeepSpeed's JIT builds (FusedAdam)
    compile-shapes        warning   a compiled run (``kernels.compile`` on a GPU) with more than 32 graphs to build
                                    (distinct training shapes + evaluation; 20-60 s each for a 124M model)

Another tool's settings are checked instead of a run config with ``--hf-args`` (a HF ``TrainingArguments`` JSON, as
``TrainingArguments.to_json_string()`` writes it; fields it leaves out take the Trainer's defaults) and/or
``--ds-config`` (a DeepSpeed JSON; with ``--hf-args``, its ``"auto"`` values are filled in as the Trainer fills them).
The model size for the LR range comes from ``--params`` or from a HF model ``config.json`` (``--model-config``,
gpt2 or llama):

    check                 severity  flags
    lr-range              error     ``learning_rate`` (or the DeepSpeed optimizer's ``lr``) outside ``[ref / 5,
                                    ref * 5]``, ``ref`` the GPT-3 LR for the parameter count
                          warning   not checked: the model size is unknown (no ``--params``, or a model type that
                                    is not counted)
    warmup-too-long       error     a warmup longer than training (``max_steps``, or the DeepSpeed scheduler's
                                    ``total_num_steps``)
    warmup-share          warning   a warmup over half of training (a ``warmup_ratio`` is judged without the length)
    no-warmup             warning   no warmup at a peak LR above 1e-4
    batch-mismatch        error     a DeepSpeed batch size the Trainer would refuse (not ``per_device_train_batch_size
                                    x gradient_accumulation_steps x world size``); without ``--hf-args``, DeepSpeed's
                                    own rule (train batch = micro-batch x accumulation x world size) broken
    ds-config             error     a DeepSpeed clip, LR or precision value that differs from the Trainer's; a ZeRO
                                    stage outside 0-3; bf16 and fp16 both enabled; else a key or value DeepSpeed's
                                    own config classes refuse (``deepspeed_refusal``: a misspelt key, a section that
                                    is not a mapping, a value of the wrong type)
                          warning   ``"auto"`` values and no ``--hf-args`` to fill them: those keys are not checked
    grad-clip             warning   no gradient clipping (``gradient_clipping`` absent or <= 0, ``max_grad_norm``
                                    <= 0)

The parameter count is computed from the transformers config fields (``pipeline.model.model_config_dict``) without
building the model. The DeepSpeed JSON is checked with DeepSpeed's own config classes, which import torch (about 3 s
on a CPU); nothing is built or allocated. Where torch or DeepSpeed does not import, that check is skipped with a
warning (``deepspeed``) and the others run (``--device auto`` counts as CPU without torch). ``lr_events``
(multiplicative LR changes) are not part of the LR checks: they usually anneal on purpose.
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
from typing import Any, Callable, Literal, Mapping, Optional

from curriculum.config import Config, SegmentSettings
from curriculum.errors import ConfigError
from curriculum.schedule import LRWindow, Schedule, Stage, build_schedule
from pipeline.commands import load_config_from_args, world_size_argument
from pipeline.data import MANIFEST_FILE, read_manifest
from pipeline.ds_config import (cpu_offload, deepspeed_import_error, deepspeed_refusal, derive_ds_config,
                                resolve_precision, zero_stage)
from pipeline.environment import sanitize_cuda_arch_list
from pipeline.external import is_number, read_json_object
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
HF_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": -1,
    "warmup_steps": 0, "warmup_ratio": 0.0, "max_grad_norm": 1.0, "lr_scheduler_type": "linear", "bf16": False,
    "fp16": False,
}
"""``TrainingArguments``' defaults of the fields checked, for argument files that give only what they change
(transformers 5 has no ``warmup_ratio``: a ``warmup_steps`` below 1 is the ratio)."""
NO_WARMUP_LR = 1e-4
"""Above this peak LR a run without warmup is flagged: Adam's first updates, from second-moment estimates of a few
batches, are the largest of the run (the reason for RAdam, Liu et al. 2020); fine-tuning LRs (5e-5) are below it."""
ZERO_STAGES = (0, 1, 2, 3)
COUNTED_MODEL_TYPES = ("gpt2", "llama")
"""HF ``model_type`` values whose parameters ``parameter_count`` counts from a ``config.json``."""


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


@dataclass(frozen=True)
class ModelSize:
    """The parameter count another tool's settings are checked against, and where it came from (or why there is
    none)."""

    n_params: Optional[int]
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

    add_config_arguments(parser, required=False)
    add_world_size_argument(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where the run will train (auto: this machine); for --config")
    parser.add_argument("--hf-args", metavar="JSON",
                        help="instead of --config: check a HF TrainingArguments JSON "
                             "(TrainingArguments.to_json_string())")
    parser.add_argument("--ds-config", metavar="JSON",
                        help="instead of --config: check a DeepSpeed JSON (with --hf-args: as the Trainer fills its "
                             "\"auto\" values)")
    parser.add_argument("--params", type=float, metavar="N",
                        help="with --hf-args/--ds-config: the model's parameter count for the LR range, e.g. 124e6")
    parser.add_argument("--model-config", metavar="PATH",
                        help="with --hf-args/--ds-config: a HF model config.json (or its directory) to count the "
                             "parameters from (gpt2, llama)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    """The CLI: load (bad input raises ``ConfigError``: exit 2), check, print; exit 1 if any error.

    A run config (``--config``), or another tool's settings (``--hf-args`` and/or ``--ds-config``): one or the
    other."""
    world_size = world_size_argument(args.world_size)
    if args.hf_args is not None or args.ds_config is not None:
        title, findings = _check_tool_files(args, world_size)
    else:
        title, findings = _check_run_config(args, world_size)
    findings = _errors_first(findings)
    if args.json:
        print(json.dumps(report_dict(findings), indent=2))
    else:
        print(title)
        print(format_report(findings))
    return 1 if any(f.severity == "error" for f in findings) else 0


def _check_run_config(args: argparse.Namespace, world_size: int) -> tuple[str, list[Finding]]:
    """``--config``: the title line and the findings."""
    if args.config is None:
        raise ConfigError("--config", None, "give a run config (a recipe name or a YAML file), or --hf-args and/or "
                                            "--ds-config to check a HF Trainer's or DeepSpeed's settings")
    for flag, value in (("--params", args.params), ("--model-config", args.model_config)):
        if value is not None:
            raise ConfigError(flag, value, "only with --hf-args or --ds-config (a run config's model section gives "
                                           "the model size)")
    config = load_config_from_args(args)
    device = resolve_device(args.device)
    title = f"{config.name}: {config.model.arch} {config.model.preset}, world size {world_size}, {device}"
    return title, check_config(config, world_size, device, os.environ)


def _check_tool_files(args: argparse.Namespace, world_size: int) -> tuple[str, list[Finding]]:
    """``--hf-args`` and/or ``--ds-config``: the title line and the findings."""
    given = [(flag, value) for flag, value in (("--config", args.config), ("--overlay", args.overlays),
                                               ("--set", args.sets), ("--max-steps", args.max_steps)) if value]
    if given:
        raise ConfigError(*given[0], "cannot be combined with --hf-args or --ds-config, which check another tool's "
                                     "settings instead of a run config")
    hf_path = Path(args.hf_args) if args.hf_args is not None else None
    ds_path = Path(args.ds_config) if args.ds_config is not None else None
    hf_args = read_hf_args(hf_path) if hf_path is not None else None
    ds_config = read_json_object(ds_path, "--ds-config") if ds_path is not None else None
    size = model_size(args.params, args.model_config)
    files = [f"{path.name} ({kind})" for path, kind in ((hf_path, "TrainingArguments"), (ds_path, "DeepSpeed JSON"))
             if path is not None]
    names = (hf_path.name if hf_path else "", ds_path.name if ds_path else "")
    return (f"{', '.join(files)}: world size {world_size}, {size.source}",
            check_trainer_settings(hf_args, ds_config, world_size, size, names))


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
    """The prepared data's vocabulary; without prepared data (an error: ``train`` refuses it), GPT-2's 50,257 for
    the checks that need a vocabulary."""
    manifest_path = Path(config.data.dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        missing = "does not exist" if not Path(config.data.dir).is_dir() else f"has no {MANIFEST_FILE}"
        return Vocab(DEFAULT_VOCAB_SIZE, 0, f"vocab {DEFAULT_VOCAB_SIZE:,}, GPT-2's: no {manifest_path}"), [
            Finding("error", "data", "data.dir", f"{config.data.dir} {missing}: train would stop there; the checks "
                    f"below assume GPT-2's vocabulary of {DEFAULT_VOCAB_SIZE:,}",
                    f"prepare it: curriculum-pretrain prepare-data <your files> --output {config.data.dir} (or "
                    "--source python-stdlib), or set data.dir")]
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


def _lr_range_suggestion(peak_lr: float, ref: float, boost: float = 1.0, seq_len: int = 0) -> str:
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
    """A compiled run builds one graph per distinct training shape and one for evaluation before step 0, and warms
    up (records a CUDA graph for) every shape even when ``kernels.dynamic_shapes`` makes them one graph."""
    graphs = schedule.compiled_graphs(dynamic=False)
    if config.kernels.compile is False or graphs <= MAX_COMPILED_GRAPHS:
        return []
    pacing = config.curriculum.pacing
    field = "curriculum.pacing.bucket" if pacing is not None else "curriculum.stages"
    fix = ("set curriculum.pacing.bucket: 64 (lengths rounded down to multiples of 64)" if pacing is not None
           else "merge stages into fewer distinct (micro-batch, seq_len) shapes")
    return [Finding("warning", "compile-shapes", field,
                    f"kernels.compile builds {graphs} graphs before step 0 ({graphs - 1} training shapes + "
                    f"evaluation), 20-60 s each for a 124M model on an H100-class GPU",
                    f"{fix}, or set kernels.compile: false for a short run (kernels.dynamic_shapes: auto compiles "
                    "one graph for them all, but each length still records a CUDA graph and takes a warm-up step; "
                    "not measured at this many lengths)")]


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
    """``derive_ds_config`` errors (what DeepSpeed's own config classes refuse among them, where it can be imported),
    and optimizer offload that cannot work or will not help."""
    try:
        ds = derive_ds_config(config, schedule, resolve_precision(config.run.precision, bf16_gpu=device == "gpu"))
    except ConfigError as err:
        return [Finding("error", "ds-config", err.field, str(err),
                        "fix deepspeed.template / deepspeed.overrides as the message says: batch sizes, clipping, "
                        "precision and the optimizer come from the run config, not the DeepSpeed JSON")]
    return check_deepspeed_importable("deepspeed") + check_offload(config, ds, device)


def check_offload(config: Config, ds: dict[str, Any], device: Device) -> list[Finding]:
    """Optimizer offload in the derived DeepSpeed JSON ``ds`` that cannot work or will not help."""
    if not cpu_offload(ds):
        return []
    stage = zero_stage(ds)
    where = ("deepspeed.overrides.zero_optimization.offload_optimizer"
             if "zero_optimization" in config.deepspeed.overrides else "deepspeed.template")
    if stage == 0:
        return [Finding("error", "ds-config", where,
                        f"offload_optimizer.device is cpu with ZeRO stage {stage}: optimizer offload is part of "
                        f"ZeRO and needs stage 1, 2 or 3",
                        "set deepspeed.overrides.zero_optimization.stage to 1, 2 or 3 (or template zero2), or drop "
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


# --------------------------------------------------------------------------------------------------- other tools

# The DeepSpeed keys checked, and what each may hold besides "auto" (the ZeRO stage is judged by a check of its own).
DS_KEYS: dict[str, str] = {
    "train_batch_size": "count", "train_micro_batch_size_per_gpu": "count", "gradient_accumulation_steps": "count",
    "gradient_clipping": "number", "optimizer.params.lr": "number", "scheduler.params.warmup_max_lr": "number",
    "scheduler.params.warmup_num_steps": "number", "scheduler.params.total_num_steps": "number",
    "bf16.enabled": "switch", "fp16.enabled": "switch", "zero_optimization.stage": "any",
}
DS_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (lambda value: isinstance(value, int) and not isinstance(value, bool) and value > 0,
              "a positive integer"),
    "number": (is_number, "a number"),
    "switch": (lambda value: isinstance(value, bool), "true or false"),
    "any": (lambda value: True, "anything"),
}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class Warmup:
    """A warmup as another tool sets it: in steps and as a share of training, None where that is not known."""

    steps: Optional[int]
    share: Optional[float]
    total: Optional[int]
    """Training steps."""
    field: str
    setting: str
    """How it is set, for the messages: ``warmup_steps 40``, ``warmup_ratio 0.6``."""


def read_hf_args(path: Path) -> dict[str, Any]:
    """A ``TrainingArguments`` JSON, with the Trainer's defaults (``HF_DEFAULTS``) for checked fields it leaves out.

    ``ConfigError`` when it holds none of those fields (not a TrainingArguments JSON) or one of the wrong type."""
    given = read_json_object(path, "--hf-args")
    if not any(key in given for key in HF_DEFAULTS):
        raise ConfigError("--hf-args", str(path), f"holds none of the TrainingArguments fields checked "
                                                  f"({', '.join(HF_DEFAULTS)}); give the JSON that "
                                                  f"TrainingArguments.to_json_string() writes")
    args = {**HF_DEFAULTS, **given}
    for key, default in HF_DEFAULTS.items():
        value = args[key]
        if isinstance(default, bool):
            accepted, allowed = isinstance(value, bool), "true or false"
        elif isinstance(default, str):
            accepted, allowed = isinstance(value, str), "a string"
        else:
            accepted, allowed = is_number(value), "a number"
        if not accepted:
            raise ConfigError(f"{path.name}: {key}", value, f"must be {allowed}")
    return args


def model_size(params: Optional[float], model_config: Optional[str]) -> ModelSize:
    """The parameter count from ``--params``, or counted from a HF ``config.json`` (``--model-config``, the file or
    its directory) of a ``COUNTED_MODEL_TYPES`` model; unknown (with the reason) otherwise."""
    if params is not None and model_config is not None:
        raise ConfigError("--params", params, "give --params or --model-config, not both")
    if params is not None:
        if not math.isfinite(params) or params < 1:
            raise ConfigError("--params", params, "must be a parameter count, e.g. 124e6")
        return ModelSize(int(params), f"{_human(params)} parameters (--params)")
    if model_config is None:
        return ModelSize(None, "model size unknown (no --params or --model-config)")
    path = Path(model_config)
    path = path / "config.json" if path.is_dir() else path
    fields = read_json_object(path, "--model-config")
    model_type = fields.get("model_type")
    if model_type not in COUNTED_MODEL_TYPES:
        return ModelSize(None, f"model size unknown: {path} is a {model_type!r} model, and parameters are counted "
                               f"for {' and '.join(COUNTED_MODEL_TYPES)} only")
    try:
        n_params = parameter_count(fields)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError("--model-config", str(path), f"cannot count the parameters of this {model_type} config: "
                                                       f"{type(err).__name__} {err}") from None
    return ModelSize(n_params, f"{_human(n_params)} parameters ({model_type}, counted from {path})")


def check_trainer_settings(hf: Optional[Mapping[str, Any]], ds: Optional[Mapping[str, Any]], world_size: int,
                           size: ModelSize, names: tuple[str, str] = ("TrainingArguments", "DeepSpeed JSON")
                           ) -> list[Finding]:
    """Every check of a ``TrainingArguments`` JSON (``hf``, from ``read_hf_args``) and/or a DeepSpeed JSON (``ds``),
    as the Trainer (or DeepSpeed alone) would run them; ``names`` (of the two files) start the findings' fields."""
    hf_name, ds_name = names
    findings: list[Finding] = []
    values: dict[str, Any] = {}
    if ds is not None:
        values, findings = fill_auto(ds_values(ds, ds_name), hf, world_size, ds_name)
        own = check_ds_values(values, hf is None, world_size, ds_name)
        findings += own
        if not any(f.check == "ds-config" and f.severity == "error" for f in own):  # else DeepSpeed refuses that too
            findings += check_deepspeed_accepts(ds, ds_name)
    lr: Optional[float] = None
    lr_field = ""
    if hf is not None:
        lr, lr_field, warmup = hf["learning_rate"], f"{hf_name}: learning_rate", hf_warmup(hf, hf_name)
    else:
        for key in ("optimizer.params.lr", "scheduler.params.warmup_max_lr"):
            if is_number(values[key]):
                lr, lr_field = values[key], f"{ds_name}: {key}"
                break
        warmup = ds_warmup(values, ds_name)
    if lr is not None:
        findings += check_lr_band(lr, lr_field, size)
    if warmup is not None:
        findings += check_warmup(warmup, lr)
    # the clip the run gets: DeepSpeed's when it steps the optimizer, else the Trainer's own
    if ds is not None:
        findings += check_grad_clip(values["gradient_clipping"], ds_name, "gradient_clipping")
    elif hf is not None:
        findings += check_grad_clip(hf["max_grad_norm"], hf_name, "max_grad_norm")
    return findings


def ds_values(ds: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The values of ``DS_KEYS`` in a DeepSpeed JSON (None where absent); ``ConfigError`` for one of a type that
    DeepSpeed refuses."""
    values = {}
    for key, kind in DS_KEYS.items():
        node: Any = ds
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        accepts, allowed = DS_KINDS[kind]
        if node is not None and node != "auto" and not accepts(node):
            raise ConfigError(f"{name}: {key}", node, f'must be {allowed} or "auto"')
        values[key] = node
    return values


def trainer_values(hf: Mapping[str, Any], world_size: int) -> dict[str, tuple[Any, str]]:
    """What the Trainer writes over a DeepSpeed key's ``"auto"`` and requires of a value set there (it stops at
    launch on a mismatch; transformers' ``HfTrainerDeepSpeedConfig``), with the arguments it comes from."""
    micro, accum, lr = hf["per_device_train_batch_size"], hf["gradient_accumulation_steps"], hf["learning_rate"]
    return {
        "train_micro_batch_size_per_gpu": (micro, f"per_device_train_batch_size {micro}"),
        "gradient_accumulation_steps": (accum, f"gradient_accumulation_steps {accum}"),
        "train_batch_size": (micro * accum * world_size,
                             f"per_device_train_batch_size x gradient_accumulation_steps x world size = {micro} x "
                             f"{accum} x {world_size} = {micro * accum * world_size}"),
        "gradient_clipping": (hf["max_grad_norm"], f"max_grad_norm {hf['max_grad_norm']:g}"),
        "optimizer.params.lr": (lr, f"learning_rate {_lr(lr)}"),
        "scheduler.params.warmup_max_lr": (lr, f"learning_rate {_lr(lr)}"),
        "bf16.enabled": (hf["bf16"], f"bf16 {json.dumps(hf['bf16'])}"),
        "fp16.enabled": (hf["fp16"], f"fp16 {json.dumps(hf['fp16'])}"),
    }


def fill_auto(values: Mapping[str, Any], hf: Optional[Mapping[str, Any]], world_size: int, ds_name: str
              ) -> tuple[dict[str, Any], list[Finding]]:
    """DeepSpeed values as the Trainer hands them over: ``"auto"`` filled in, and an error finding for each value
    set to something else than the Trainer's. Without ``hf``, unchanged (``"auto"`` stays)."""
    filled, findings = dict(values), []
    for key, (wanted, source) in (trainer_values(hf, world_size) if hf is not None else {}).items():
        value = values[key]
        if value == "auto":
            filled[key] = wanted
        elif value is not None and value != wanted:
            findings.append(Finding(
                "error", "batch-mismatch" if key in BATCH_KEYS else "ds-config", f"{ds_name}: {key}",
                f"{key} {json.dumps(value)} is not the TrainingArguments' {source}: the Trainer stops at launch on "
                f"the mismatch",
                f'set {key} to "auto" (the Trainer fills it in) or to {json.dumps(wanted)}'))
    return filled, findings


def check_ds_values(values: Mapping[str, Any], alone: bool, world_size: int, ds_name: str) -> list[Finding]:
    """A DeepSpeed JSON's own rules: a ZeRO stage that exists, not bf16 and fp16 together, and, used ``alone``
    (without the Trainer to fill it in), no ``"auto"`` and DeepSpeed's batch rule."""
    findings = []
    stage = values["zero_optimization.stage"]
    if stage is not None and (isinstance(stage, bool) or stage not in ZERO_STAGES):
        findings.append(Finding(
            "error", "ds-config", f"{ds_name}: zero_optimization.stage",
            f"ZeRO stage {json.dumps(stage)} does not exist",
            "use 0 (off), 1 (optimizer state sharded), 2 (and gradients) or 3 (and parameters)"))
    if values["bf16.enabled"] is True and values["fp16.enabled"] is True:
        findings.append(Finding(
            "error", "ds-config", f"{ds_name}: bf16.enabled",
            "bf16 and fp16 are both enabled: DeepSpeed refuses to start with both",
            "enable one: bf16 on GPUs that have it (A100, H100 and later), fp16 (with loss scaling) on older ones"))
    if not alone:
        return findings
    auto = [key for key, value in values.items() if value == "auto"]
    if auto:
        findings.append(Finding(
            "warning", "ds-config", f"{ds_name}: {auto[0]}",
            f"{', '.join(auto)} {'is' if len(auto) == 1 else 'are'} \"auto\", which only the HF Trainer fills in: "
            f"not checked",
            "give the Trainer's arguments with --hf-args to check them as it fills them in"))
    if not any(values[key] == "auto" for key in BATCH_KEYS):
        problem = deepspeed_batch_problem(*(values[key] for key in BATCH_KEYS), world_size)
        if problem is not None:
            findings.append(Finding(
                "error", "batch-mismatch", f"{ds_name}: train_batch_size", problem,
                "DeepSpeed needs train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
                "world size; set two of them and it derives the third (check --world-size)"))
    return findings


def check_deepspeed_accepts(ds: Mapping[str, Any], ds_name: str) -> list[Finding]:
    """What DeepSpeed's own config classes refuse in a DeepSpeed JSON (``deepspeed_refusal``; its batch sizes are
    judged by the batch checks): DeepSpeed stops on it at initialize."""
    unchecked = check_deepspeed_importable(ds_name)
    if unchecked:
        return unchecked
    refusal = deepspeed_refusal(dict(ds))
    if refusal is None:
        return []
    setting = f"{refusal.key} = {json.dumps(refusal.value)}: " if refusal.key else ""
    return [Finding("error", "ds-config", f"{ds_name}: {refusal.key}" if refusal.key else ds_name,
                    f"{setting}{refusal.allowed} (DeepSpeed stops at initialize on it)",
                    "fix it as DeepSpeed's config reference says: https://www.deepspeed.ai/docs/config-json/")]


def check_deepspeed_importable(field: str) -> list[Finding]:
    """A warning where DeepSpeed cannot be imported here: its config classes' checks of ``field`` are skipped."""
    error = deepspeed_import_error()
    if error is None:
        return []
    return [Finding("warning", "deepspeed", field,
                    f"DeepSpeed cannot be imported here ({error}): what its own config classes refuse was not "
                    f"checked, and train, bench and lr-find need it",
                    "install the project's requirements (README, Quick start) and run doctor again; the other "
                    "checks ran")]


def deepspeed_batch_problem(train: Optional[int], micro: Optional[int], accum: Optional[int], world_size: int
                            ) -> Optional[str]:
    """What DeepSpeed refuses in these batch settings (None when it accepts them): it derives the ones not set with
    integer division (``DeepSpeedConfig._set_batch_related_parameters``), then requires train = micro x accum x
    world size, all positive."""
    if train is None:
        if micro is None:
            return "neither train_batch_size nor train_micro_batch_size_per_gpu is set: DeepSpeed needs one of them"
        return None  # derived as micro x accum x world size: consistent by construction
    derived = ""
    if micro is None:
        accum = accum or 1
        micro, derived = train // world_size // accum, " (train_micro_batch_size_per_gpu derived)"
    elif accum is None:
        accum, derived = train // micro // world_size, " (gradient_accumulation_steps derived)"
    if micro > 0 and accum > 0 and train == micro * accum * world_size:
        return None
    return (f"train_batch_size {train} is not train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
            f"{accum} x world size {world_size} = {micro * accum * world_size}{derived}: DeepSpeed stops at "
            f"initialize")


def hf_warmup(hf: Mapping[str, Any], name: str) -> Warmup:
    """The Trainer's warmup (``TrainingArguments.get_warmup_steps``): ``warmup_steps`` of 1 or more are steps, below
    1 a share of training (transformers 5); else ``warmup_ratio`` (transformers 4). Training steps are known from
    ``max_steps`` only: an epoch's steps depend on the dataset."""
    total = int(hf["max_steps"]) if hf["max_steps"] > 0 else None
    if hf["lr_scheduler_type"] == "constant":
        return Warmup(0, 0.0, total, f"{name}: lr_scheduler_type", "lr_scheduler_type constant")
    steps, ratio = hf["warmup_steps"], hf["warmup_ratio"]
    if steps >= 1 or not (steps or ratio):
        return Warmup(int(steps), steps / total if total else None, total, f"{name}: warmup_steps",
                      f"warmup_steps {int(steps)}")
    key, share = ("warmup_steps", steps) if steps > 0 else ("warmup_ratio", ratio)
    return Warmup(math.ceil(share * total) if total else None, share, total, f"{name}: {key}", f"{key} {share:g}")


def ds_warmup(values: Mapping[str, Any], name: str) -> Optional[Warmup]:
    """The DeepSpeed scheduler's warmup (``WarmupLR``, ``WarmupDecayLR``, ...), when it sets ``warmup_num_steps``."""
    steps, total = values["scheduler.params.warmup_num_steps"], values["scheduler.params.total_num_steps"]
    if not is_number(steps):
        return None
    total = int(total) if is_number(total) and total > 0 else None
    return Warmup(int(steps), steps / total if total else None, total, f"{name}: scheduler.params.warmup_num_steps",
                  f"warmup_num_steps {int(steps)}")


def check_grad_clip(clip: Any, name: str, key: str) -> list[Finding]:
    """No gradient clipping: ``key`` of the file ``name`` not set (DeepSpeed's default is off), or 0 or less."""
    if clip is not None and not (is_number(clip) and clip <= 0):
        return []  # a positive clip, or "auto" that nothing fills in (reported once, as such)
    what = f"{key} is not set, and DeepSpeed does not clip by default" if clip is None else f"{key} {clip:g} is off"
    return [Finding("warning", "grad-clip", f"{name}: {key}",
                    f"no gradient clipping ({what}): a single bad batch can take an update of any size",
                    'clip the gradient norm at 1.0 (GPT-3\'s setting): gradient_clipping 1.0 (or "auto", the '
                    "Trainer's max_grad_norm) in a DeepSpeed JSON, max_grad_norm 1.0 in TrainingArguments")]


def check_lr_band(lr: float, field: str, size: ModelSize) -> list[Finding]:
    """A peak LR against GPT-3's LR for the model size (no short-sequence allowance: no curriculum here)."""
    if size.n_params is None:
        return [Finding("warning", "lr-range", field,
                        f"peak LR {_lr(lr)} not compared with the usual LR for the model size: {size.source}",
                        "give the parameter count with --params (e.g. 124e6) or the model's config.json with "
                        "--model-config")]
    ref = reference_lr(size.n_params)
    low, high = ref / LR_BAND, ref * LR_BAND
    if low <= lr <= high:
        return []
    return [Finding("error", "lr-range", field,
                    f"peak LR {_lr(lr)} is {_times(lr / ref)} the usual {_lr(ref)} for {size.source}; the allowed "
                    f"band is {_lr(low)} .. {_lr(high)}",
                    _lr_range_suggestion(lr, ref))]


def check_warmup(warmup: Warmup, lr: Optional[float]) -> list[Finding]:
    """A warmup longer than training (error), over half of it, or none at a large LR (warnings)."""
    if warmup.steps is not None and warmup.total is not None and warmup.steps > warmup.total:
        peak = f"; the LR ends at {warmup.total / warmup.steps:.0%} of its peak {_lr(lr)}" if lr is not None else ""
        return [Finding("error", "warmup-too-long", warmup.field,
                        f"{warmup.setting}: a warmup of {warmup.steps} steps is longer than training "
                        f"({warmup.total} steps){peak}",
                        f"warm up over a few percent of the steps, e.g. {max(warmup.total // 20, 1)} (5%)")]
    if warmup.share is not None and warmup.share > WARMUP_SHARE:
        length = f" ({warmup.total} steps)" if warmup.total is not None else ""
        return [Finding("warning", "warmup-share", warmup.field,
                        f"{warmup.setting}: the warmup is {warmup.share:.0%} of training{length}, leaving little "
                        f"at the peak LR or decaying from it",
                        f"keep warmup at most {WARMUP_SHARE:.0%} of training; a few percent is usual")]
    if warmup.steps == 0 and lr is not None and lr > NO_WARMUP_LR:
        return [Finding("warning", "no-warmup", warmup.field,
                        f"{warmup.setting}: no warmup at peak LR {_lr(lr)} (above {_lr(NO_WARMUP_LR)}): the first, "
                        f"largest Adam updates come at the full LR",
                        "warm up over the first few percent of the steps (warmup_steps; for lr_scheduler_type "
                        "constant, constant_with_warmup)")]
    return []


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
