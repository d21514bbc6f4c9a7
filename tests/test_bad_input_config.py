"""Bad config input that used to be accepted silently, hang, or reach a library and end in a traceback: through the
real CLI in a subprocess, each is exit status 2 and one line ``error: <field> = <value>: <what is allowed>``.

Sections, one per class of bad input:

1. silent acceptance: non-finite numbers, booleans where numbers belong, YAML 1.1 booleans in overrides, keys given
   twice in one mapping, a non-finite ``lr-find`` ramp;
2. environment variables: the error names the ``CPT_*`` variable behind it;
3. upper bounds: counts far past any run are errors naming the bound, never a hang;
4. values a library would reject later: optimizer ranges, ``model.overrides`` (activation and RoPE type included),
   DeepSpeed sections and templates, and whatever DeepSpeed's own config classes refuse in the merged JSON;
5. float options of the commands: ``nan`` and ``inf`` are not numbers they take.

``plan``, ``ds-config`` and ``doctor`` stand in for ``train`` and ``lr-find``: all load the config through the same
``load_config_from_args`` and resolve it with the same ``build_schedule``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pytest
from conftest import run_cli

from curriculum.config import MAX_BATCH, MAX_SEED, MAX_SEQ_LEN, MAX_STEPS, MAX_TOKENS
from curriculum.errors import ConfigError
from curriculum.loading import env_variables_behind, load_config, parse_yaml_value
from pipeline.cli import MAX_PER_STEP


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    """The command line; ``{tmp}`` stands for the test's directory, where ``files`` are written."""
    starts: str
    """The start of the one error line (``{tmp}`` as in ``args``)."""
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, Union[str, bytes]] = field(default_factory=dict)
    ends: str = ""
    """The end of the error line; ``(set by CPT_...)`` exactly where an environment variable set the value."""


def plan(*sets: str, config: str = "tiny-cpu") -> tuple[str, ...]:
    """``plan`` of a recipe with ``--set`` overrides."""
    return ("plan", "--config", config, *(arg for item in sets for arg in ("--set", item)))


def ds_config(*sets: str) -> tuple[str, ...]:
    return ("ds-config", *plan(*sets)[1:])


def yaml_file(text: str) -> dict[str, Any]:
    """``plan`` of a config file with this text: a case's ``args`` and ``files``."""
    return {"args": ("plan", "--config", "{tmp}/run.yaml"), "files": {"run.yaml": text}}


ONE_STAGE = "curriculum:\n  stages: [{until_step: 100, seq_len: 64, global_batch: 8}]\n"


# ------------------------------------------------------------------------------------------ 1. silent acceptance
# Non-finite numbers: pydantic's float accepts .inf and .nan unless told otherwise; `gt=0` lets .inf through.
NON_FINITE = [
    Case("base_lr -inf", plan("curriculum.base_lr=-.inf"),
         "error: curriculum.base_lr = -inf: Input should be a finite number"),
    Case("a stage's lr NaN", plan("curriculum.stages.1.lr=.NaN"),
         "error: curriculum.stages.1.lr = nan: Input should be a finite number, or Input should be 'auto'"),
    Case("lr_max inf", plan("curriculum.stages.2.lr_max=.inf"),
         "error: curriculum.stages.2.lr_max = inf: Input should be a finite number"),
    Case("lr_mult inf", plan("curriculum.stages.0.lr_mult=.Inf"),
         "error: curriculum.stages.0.lr_mult = inf: Input should be a finite number"),
    Case("min_lr_ratio NaN (fails every comparison, so a range alone lets it through)",
         plan("curriculum.stages.0.min_lr_ratio=.nan"),
         "error: curriculum.stages.0.min_lr_ratio = nan: Input should be a finite number"),
    Case("grad_clip inf", plan("curriculum.stages.0.grad_clip=.inf"),
         "error: curriculum.stages.0.grad_clip = inf: Input should be a finite number, or Input should be 'auto'"),
    Case("clip of an auto rule NaN", plan("curriculum.grad_clip_auto.otherwise=.nan"),
         "error: curriculum.grad_clip_auto.otherwise = nan: Input should be a finite number"),
    Case("seq_cap inf", plan("curriculum.lr_scaling.seq_cap=.inf"),
         "error: curriculum.lr_scaling.seq_cap = inf: Input should be a finite number"),
    Case("lr_events multiply inf", plan("curriculum.lr_events=[{at_step: 10, multiply: .inf}]"),
         "error: curriculum.lr_events.0.multiply = inf: Input should be a finite number"),
    Case("guard loss_factor inf", plan("guard.loss_factor=.inf"),
         "error: guard.loss_factor = inf: Input should be a finite number"),
    Case("guard grad_norm_factor NaN", plan("guard.grad_norm_factor=.nan"),
         "error: guard.grad_norm_factor = nan: Input should be a finite number"),
    Case("guard lr_scale NaN", plan("guard.lr_scale=.nan"),
         "error: guard.lr_scale = nan: Input should be a finite number"),
    Case("optimizer eps inf", plan("optimizer.eps=.inf"),
         "error: optimizer.eps = inf: Input should be a finite number"),
    Case("optimizer weight_decay inf", plan("optimizer.weight_decay=.inf"),
         "error: optimizer.weight_decay = inf: Input should be a finite number"),
    Case("optimizer beta NaN", plan("optimizer.betas=[0.9, .nan]"),
         "error: optimizer.betas.1 = nan: Input should be a finite number"),
    Case("peak_flops inf", plan("run.peak_flops=.inf"), "error: run.peak_flops = inf: Input should be a finite number"),
    Case("a float literal that overflows, in a file",
         **yaml_file(ONE_STAGE.replace("curriculum:\n", "curriculum:\n  base_lr: 1.0e999\n")),
         starts="error: curriculum.base_lr = inf: Input should be a finite number"),
]

# true/false where a number belongs: pydantic alone reads true as 1.
BOOLEANS_AS_NUMBERS = [
    Case("global_batch true", plan("curriculum.stages.0.global_batch=true"),
         "error: curriculum.stages.0.global_batch = True: must be a number, not true"),
    Case("seed false", plan("run.seed=false"), "error: run.seed = False: must be a number, not false"),
    Case("guard window true", plan("guard.window=true"), "error: guard.window = True: must be a number, not true"),
    Case("lr_max false", plan("curriculum.stages.0.lr_max=false"),
         "error: curriculum.stages.0.lr_max = False: must be a number, not false"),
    Case("a beta true", plan("optimizer.betas=[true, 0.95]"),
         "error: optimizer.betas.0 = True: must be a number, not true"),
    Case("base_lr True in a file", **yaml_file(ONE_STAGE.replace("curriculum:\n", "curriculum:\n  base_lr: True\n")),
         starts="error: curriculum.base_lr = True: must be a number, not true"),
]

# YAML 1.1 reads on/off/yes/no/y/n as booleans (`CPT_...=on` was 1.0): only true/false are booleans here.
YAML11_BOOLEANS = [
    Case("environment: loss_factor yes", plan(), "error: guard.loss_factor = 'yes': Input should be a valid number",
         env={"CPT_GUARD__LOSS_FACTOR": "yes"}, ends="(set by CPT_GUARD__LOSS_FACTOR)"),
    Case("environment: seed off", plan(), "error: run.seed = 'off': Input should be a valid integer",
         env={"CPT_RUN__SEED": "off"}, ends="(set by CPT_RUN__SEED)"),
    Case("--set seq_len on", plan("curriculum.stages.0.seq_len=on"),
         "error: curriculum.stages.0.seq_len = 'on': Input should be a valid integer"),
    Case("--set eval_every Y", plan("run.eval_every=Y"),
         "error: run.eval_every = 'Y': Input should be a valid integer"),
]

# A key given twice in one mapping: YAML 1.1 keeps the last one without a word.
DUPLICATE_KEYS = [
    Case("recipe: a section twice",
         **yaml_file(ONE_STAGE + "run: {seed: 1}\nname: x\nrun: {seed: 2}\n"),
         starts="error: {tmp}/run.yaml = 'line 5, column 1': not valid YAML: duplicate key 'run' (first given on "
                "line 3)"),
    Case("recipe: a stage key twice",
         **yaml_file("curriculum:\n  stages:\n    - {until_step: 100, seq_len: 64, seq_len: 128, global_batch: 8}\n"),
         starts="error: {tmp}/run.yaml = 'line 3, column 38': not valid YAML: duplicate key 'seq_len'"),
    Case("overlay: a key twice", ("plan", "--config", "tiny-cpu", "--overlay", "{tmp}/caps.yaml"),
         "error: {tmp}/caps.yaml = 'line 4, column 5': not valid YAML: duplicate key 'lr_max' (first given on line 3)",
         files={"caps.yaml": "curriculum:\n  stages:\n  - lr_max: 1.0e-3\n    lr_max: 2.0e-3\n"}),
    Case("--set: a mapping value with a key twice",
         plan("model.overrides={num_hidden_layers: 2, num_hidden_layers: 3}"),
         "error: --set model.overrides = '{num_hidden_layers: 2, num_hidden_layers: 3}': not a valid YAML value: "
         "duplicate key 'num_hidden_layers'"),
    Case("environment: a mapping value with a key twice", plan(),
         "error: CPT_CURRICULUM__LR_SCALING curriculum.lr_scaling = '{rule: sqrt, rule: none}': not a valid YAML "
         "value: duplicate key 'rule'", env={"CPT_CURRICULUM__LR_SCALING": "{rule: sqrt, rule: none}"}),
]

# lr-find's ramp: `--max-lr inf` passed the ordering check and wrote `lr_max: .inf` caps.
LR_FIND_RAMP = [
    Case("lr-find --max-lr Infinity", ("lr-find", "--config", "tiny-cpu", "--max-lr", "Infinity"),
         "error: curriculum-pretrain lr-find: argument --max-lr: must be a finite number, not 'Infinity'"),
    Case("lr-find --min-lr -inf", ("lr-find", "--config", "tiny-cpu", "--min-lr=-inf"),
         "error: curriculum-pretrain lr-find: argument --min-lr: must be a finite number, not '-inf'"),
    Case("lr-find --max-lr nan", ("lr-find", "--config", "tiny-cpu", "--max-lr", "nan"),
         "error: curriculum-pretrain lr-find: argument --max-lr: must be a finite number, not 'nan'"),
]


# ------------------------------------------------------------------------------------------ 2. environment
ENVIRONMENT = [
    Case("a variable that names no section", plan(),
         "error: CPT_TRAINER = '4': not a config field (trainer); allowed sections: name, model, data, curriculum, "
         "optimizer, guard, kernels, deepspeed, run", env={"CPT_TRAINER": "4"}),
    Case("a variable that names no section, for doctor", ("doctor", "--config", "tiny-cpu", "--device", "cpu"),
         "error: CPT_LOGLEVEL = 'debug': not a config field (loglevel); allowed sections: name,",
         env={"CPT_LOGLEVEL": "debug"}),
    Case("an empty level", plan(), "error: CPT_RUN____SEED = '3': has an empty level (run..seed): one __ between "
                                   "levels", env={"CPT_RUN____SEED": "3"}),
    Case("a value out of range", plan(), "error: run.seed = -3: Input should be greater than or equal to 0",
         env={"CPT_RUN__SEED": "-3"}, ends="(set by CPT_RUN__SEED)"),
    Case("a schedule error", plan(), "error: curriculum.stages.1.seq_len = 132: must be a multiple of 8",
         env={"CPT_CURRICULUM__STAGES__1__SEQ_LEN": "132"}, ends="(set by CPT_CURRICULUM__STAGES__1__SEQ_LEN)"),
    Case("a whole section from the environment", plan(),
         "error: curriculum.lr_scaling.rule = 'cubic': Input should be 'seed', 'linear', 'sqrt' or 'none'",
         env={"CPT_CURRICULUM__LR_SCALING": "{rule: cubic}"}, ends="(set by CPT_CURRICULUM__LR_SCALING)"),
    Case("a key the section's check names", plan(),
         "error: curriculum.stages.0 = {'until_step': 60, 'seq_len': 64, 'global_batch': 32, 'warmup_steps': 20, "
         "'global_batch_tokens': 4096}: give global_batch or global_batch_tokens, not both",
         env={"CPT_CURRICULUM__STAGES__0__GLOBAL_BATCH_TOKENS": "4096"},
         ends="(set by CPT_CURRICULUM__STAGES__0__GLOBAL_BATCH_TOKENS)"),
    Case("a model override", plan(), "error: model.overrides.num_hidden_layers = 0: must be a whole number from 1 to",
         env={"CPT_MODEL__OVERRIDES__NUM_HIDDEN_LAYERS": "0"}, ends="(set by CPT_MODEL__OVERRIDES__NUM_HIDDEN_LAYERS)"),
    Case("a DeepSpeed override", ds_config(),
         "error: deepspeed.overrides.zero_optimization.stage = 4: must be 0 (off), 1 (optimizer state sharded)",
         env={"CPT_DEEPSPEED__OVERRIDES__ZERO_OPTIMIZATION__STAGE": "4"},
         ends="(set by CPT_DEEPSPEED__OVERRIDES__ZERO_OPTIMIZATION__STAGE)"),
    Case("a --set replaced the variable: not named", plan("curriculum.base_lr=.inf"),
         "error: curriculum.base_lr = inf: Input should be a finite number", env={"CPT_CURRICULUM__BASE_LR": "1e-3"},
         ends="Input should be a finite number"),
    Case("a variable that is not behind the error: not named", plan("curriculum.stages.0.seq_len=100"),
         "error: curriculum.stages.0.seq_len = 100: must be a multiple of 8", env={"CPT_RUN__SEED": "7"},
         ends="must be a multiple of 8"),
]


# ------------------------------------------------------------------------------------------ 3. upper bounds
UPPER_BOUNDS = [
    Case("until_step past MAX_STEPS", plan(f"curriculum.stages.2.until_step={MAX_STEPS + 1}"),
         f"error: curriculum.stages.2.until_step = {MAX_STEPS + 1}: Input should be less than or equal to {MAX_STEPS}"),
    Case("warmup_steps past MAX_STEPS", plan(f"curriculum.stages.0.warmup_steps={MAX_STEPS * 1000}"),
         f"error: curriculum.stages.0.warmup_steps = {MAX_STEPS * 1000}: Input should be less than or equal to "
         f"{MAX_STEPS}"),
    Case("total_tokens past MAX_TOKENS",
         **yaml_file(f"curriculum:\n  stages: [{{seq_len: 64, global_batch: 8}}]\nrun: {{total_tokens: "
                    f"{MAX_TOKENS * 10}}}\n"),
         starts=f"error: run.total_tokens = {MAX_TOKENS * 10}: Input should be less than or equal to {MAX_TOKENS}"),
    Case("until_tokens that takes more than MAX_STEPS steps",
         **yaml_file(f"curriculum:\n  stages: [{{until_tokens: {MAX_TOKENS}, seq_len: 8, global_batch: 1}}]\n"),
         starts=f"error: curriculum.stages.0.until_tokens = {MAX_TOKENS}: takes 125,000,000,000,000 steps at 8 tokens "
                "per step; at most 1,000,000,000,000"),
    Case("seq_len past MAX_SEQ_LEN", plan(f"curriculum.stages.2.seq_len={2 * MAX_SEQ_LEN}"),
         f"error: curriculum.stages.2.seq_len = {2 * MAX_SEQ_LEN}: Input should be less than or equal to "
         f"{MAX_SEQ_LEN}"),
    Case("global_batch past MAX_BATCH", plan(f"curriculum.stages.0.global_batch={MAX_BATCH * 4}"),
         f"error: curriculum.stages.0.global_batch = {MAX_BATCH * 4}: Input should be less than or equal to "
         f"{MAX_BATCH}"),
    Case("global_batch_tokens that make more than MAX_BATCH sequences",
         **yaml_file("curriculum:\n  stages: [{until_step: 10, seq_len: 64, global_batch_tokens: 1099511627776}]\n"),
         starts="error: curriculum.stages.0.global_batch_tokens = 1099511627776: gives 17,179,869,184 sequences of 64 "
                "tokens per step; at most 1,048,576"),
    Case("micro_batch past MAX_BATCH", plan("curriculum.stages.0.micro_batch=1000000000000"),
         "error: curriculum.stages.0.micro_batch = 1000000000000: Input should be less than or equal to 1048576"),
    Case("pacing total_curriculum_steps past MAX_STEPS",
         **yaml_file("curriculum:\n  pacing: {type: fixed_linear, min_seq_len: 64, max_seq_len: 1024, "
                    "total_curriculum_steps: 10000000000000, global_batch: 8, lr: 1.0e-3, until_step: 100}\n"),
         starts="error: curriculum.pacing.total_curriculum_steps = 10000000000000: Input should be less than or "
                "equal to 1000000000000"),
    Case("pacing difficulty past MAX_SEQ_LEN",
         **yaml_file("curriculum:\n  pacing: {type: fixed_discrete, difficulty: [64, 4194304], max_step: [10], "
                    "global_batch: 8, lr: 1.0e-3, until_step: 100}\n"),
         starts="error: curriculum.pacing.difficulty.1 = 4194304: Input should be less than or equal to 1048576"),
    Case("lr_events at_step past MAX_STEPS", plan(f"curriculum.lr_events=[{{at_step: {10 * MAX_STEPS}, "
                                                  "multiply: 0.5}]"),
         f"error: curriculum.lr_events.0.at_step = {10 * MAX_STEPS}: Input should be less than or equal to"),
    Case("eval_batch past MAX_BATCH", plan("run.eval_batch=1000000000"),
         "error: run.eval_batch = 1000000000: Input should be less than or equal to 1048576"),
    Case("guard window past MAX_STEPS", plan("guard.window=10000000000000"),
         "error: guard.window = 10000000000000: Input should be less than or equal to 1000000000000"),
    Case("seed past MAX_SEED", plan(f"run.seed={MAX_SEED + 1}"),
         f"error: run.seed = {MAX_SEED + 1}: Input should be less than or equal to {MAX_SEED}"),
    Case("plan --per-step past MAX_PER_STEP",
         ("plan", "--config", "tiny-cpu", "--json", "--per-step", "--set",
          f"curriculum.stages.2.until_step={MAX_PER_STEP + 1}"),
         f"error: --per-step = True: lists every step, at most {MAX_PER_STEP:,}; this run has {MAX_PER_STEP + 1:,}"),
    Case("a base_lr whose scaled peak LR overflows",
         plan("curriculum.base_lr=1e308", "curriculum.lr_scaling={rule: linear, ref_batch: 1}"),
         "error: curriculum.base_lr = 1e+308: gives curriculum.stages.0 a peak LR of inf; it must be finite"),
]


# ------------------------------------------------------------------------------------------ 4. libraries
OPTIMIZER = [
    Case("beta of 1", plan("optimizer.betas=[1.0, 0.95]"),
         "error: optimizer.betas.0 = 1.0: Input should be less than 1"),
    Case("negative beta", plan("optimizer.betas=[0.9, -0.1]"),
         "error: optimizer.betas.1 = -0.1: Input should be greater than or equal to 0"),
    Case("one beta", plan("optimizer.betas=[0.9]"), "error: optimizer.betas.1 = None: Field required"),
    Case("eps zero", plan("optimizer.eps=0"), "error: optimizer.eps = 0: Input should be greater than 0"),
    Case("negative weight_decay", plan("optimizer.weight_decay=-0.01"),
         "error: optimizer.weight_decay = -0.01: Input should be greater than or equal to 0"),
]

MODEL_OVERRIDES = [
    Case("negative layer count", plan("model.overrides.num_hidden_layers=-2"),
         "error: model.overrides.num_hidden_layers = -2: must be a whole number from 1 to 16,777,216"),
    Case("a word for a size", plan("model.overrides.intermediate_size=wide"),
         "error: model.overrides.intermediate_size = 'wide': must be a whole number from 1 to 16,777,216"),
    Case("a float for a size", plan("model.overrides.hidden_size=256.0"),
         "error: model.overrides.hidden_size = 256.0: must be a whole number from 1 to 16,777,216"),
    Case("an astronomical position range", plan("model.overrides.max_position_embeddings=1000000000"),
         "error: model.overrides.max_position_embeddings = 1000000000: must be a whole number from 1 to 16,777,216"),
    Case("heads that do not divide the width", plan("model.overrides.num_attention_heads=3"),
         "error: model.overrides.num_attention_heads = 3: must divide hidden_size 128"),
    Case("a width the heads do not divide (GPT-2 names)", plan("model.arch=gpt2", "model.overrides.n_embd=130"),
         "error: model.overrides.n_embd = 130: must be a multiple of n_head 4"),
    Case("KV heads that do not divide the heads", plan("model.overrides.num_key_value_heads=3"),
         "error: model.overrides.num_key_value_heads = 3: must divide num_attention_heads 4"),
    Case("an odd head size (RoPE)", plan("model.overrides.head_dim=33"),
         "error: model.overrides.head_dim = 33: gives an odd head size 33; RoPE rotates pairs of dimensions"),
    Case("rms_norm_eps zero", plan("model.overrides.rms_norm_eps=0"),
         "error: model.overrides.rms_norm_eps = 0: must be a finite number > 0"),
    Case("dropout above 1", plan("model.arch=gpt2", "model.overrides.resid_pdrop=1.5"),
         "error: model.overrides.resid_pdrop = 1.5: must be a number from 0 to 1"),
    Case("a number for a switch", plan("model.overrides.tie_word_embeddings=1"),
         "error: model.overrides.tie_word_embeddings = 1: must be true or false"),
    Case("doctor: bad override is bad input", ("doctor", "--config", "tiny-cpu", "--device", "cpu", "--set",
                                               "model.overrides.vocab_size=0"),
         "error: model.overrides.vocab_size = 0: must be a whole number from 1 to 16,777,216"),
    Case("an activation transformers has not", plan("model.overrides.hidden_act=nosuch"),
         "error: model.overrides.hidden_act = 'nosuch': must be one of gelu, "),
    Case("a RoPE type transformers has not", plan("model.overrides.rope_scaling={rope_type: bogus, factor: 2.0}"),
         "error: model.overrides.rope_scaling = {'rope_type': 'bogus', 'factor': 2.0}: rope_type 'bogus' is not one "
         "of transformers' RoPE types: default, "),
]

DEEPSPEED = [
    Case("offload_param a string", ds_config("deepspeed.overrides.zero_optimization.offload_param=nvme"),
         "error: deepspeed.overrides.zero_optimization.offload_param = 'nvme': must be a mapping, e.g. {device: cpu}"),
    Case("offload device unknown", ds_config("deepspeed.overrides.zero_optimization.offload_optimizer.device=gpu"),
         "error: deepspeed.overrides.zero_optimization.offload_optimizer.device = 'gpu': must be one of none, cpu, "
         "nvme"),
    Case("a section as a list", ds_config("deepspeed.overrides.activation_checkpointing=[1]"),
         "error: deepspeed.overrides.activation_checkpointing = [1]: must be a mapping"),
    Case("ZeRO section null", ds_config("deepspeed.overrides.zero_optimization=null"),
         "error: deepspeed.overrides.zero_optimization = None: must be a mapping, e.g. {stage: 1}"),
    Case("ZeRO stage true", ds_config("deepspeed.overrides.zero_optimization.stage=true"),
         "error: deepspeed.overrides.zero_optimization.stage = True: must be 0 (off), 1 (optimizer state sharded)"),
    Case("timers not a mapping", ds_config("deepspeed.overrides.timers=3"),
         "error: deepspeed.overrides.timers = 3: must be a mapping, e.g. {throughput: {enabled: false}}"),
    Case("timer switch null", ds_config("deepspeed.overrides.timers.throughput.enabled=null"),
         "error: deepspeed.overrides.timers.throughput.enabled = None: must be true or false"),
    Case("a non-finite override", ds_config("deepspeed.overrides.zero_optimization.reduce_bucket_size=.nan"),
         "error: deepspeed.overrides.zero_optimization.reduce_bucket_size = nan: must be a finite number"),
    # what DeepSpeed's own config classes refuse, or (a top-level key) ignore, in the merged JSON
    Case("a misspelt ZeRO key", ds_config("deepspeed.overrides.zero_optimization.stagee=1"),
         "error: deepspeed.overrides.zero_optimization.stagee = 1: unknown key; allowed: stage, "
         "contiguous_gradients, "),
    Case("a ZeRO value of the wrong type", ds_config("deepspeed.overrides.zero_optimization.reduce_bucket_size=abc"),
         "error: deepspeed.overrides.zero_optimization.reduce_bucket_size = 'abc': Input should be a valid integer"),
    Case("a misspelt key of a nested section", ds_config("deepspeed.overrides.timers.throughput.enable=false"),
         "error: deepspeed.overrides.timers.throughput.enable = False: unknown key; allowed: enabled, synchronized"),
    Case("a misspelt top-level key", ds_config("deepspeed.overrides.zero_optimisation.stage=1"),
         "error: deepspeed.overrides.zero_optimisation = {'stage': 1}: unknown key; allowed: "
         "activation_checkpointing, "),
    Case("an unknown top-level key", ds_config("deepspeed.overrides.bogus=1"),
         "error: deepspeed.overrides.bogus = 1: unknown key; allowed: "),
    Case("bf16 under DeepSpeed's old name", ds_config("deepspeed.overrides.bfloat16.enabled=true"),
         "error: deepspeed.overrides.bfloat16 = {'enabled': True}: derived from run.precision"),
    Case("settings DeepSpeed refuses together", ds_config("deepspeed.template=zero2",
                                                          "deepspeed.overrides.zero_optimization.stage=3",
                                                          "deepspeed.overrides.gradient_allreduce_op=sum"),
         "error: deepspeed.overrides = {'zero_optimization': {'stage': 3}, 'gradient_allreduce_op': 'sum'}: DeepSpeed "
         "refuses it: gradient_allreduce_op='sum' is not supported with ZeRO stage 3"),
    Case("a misspelt key in a template", ds_config("deepspeed.template={tmp}/typo.json"),
         "error: deepspeed.template = '{tmp}/typo.json': sets zero_optimization.overlap_com = True; unknown key; "
         "allowed: stage, ", files={"typo.json": '{"zero_optimization": {"stage": 1, "overlap_com": true}}'}),
    Case("template not UTF-8", ds_config("deepspeed.template={tmp}/latin1.json"),
         "error: deepspeed.template = '{tmp}/latin1.json': cannot read it as UTF-8 text",
         files={"latin1.json": '{"wall_clock_breakdown": false, "note": "caf\xe9"}'.encode("latin-1")}),
    Case("template a JSON list", ds_config("deepspeed.template={tmp}/list.json"),
         "error: deepspeed.template = '{tmp}/list.json': must be a JSON object of DeepSpeed settings, not a list",
         files={"list.json": '[{"zero_optimization": {"stage": 1}}]'}),
    Case("template with a key twice", ds_config("deepspeed.template={tmp}/twice.json"),
         "error: deepspeed.template = '{tmp}/twice.json': not valid JSON: duplicate key 'zero_optimization'",
         files={"twice.json": '{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 2}}'}),
    Case("template with NaN", ds_config("deepspeed.template={tmp}/nan.json"),
         "error: deepspeed.template = '{tmp}/nan.json': not valid JSON: NaN is not a JSON number",
         files={"nan.json": '{"zero_optimization": {"stage": 2, "reduce_bucket_size": NaN}}'}),
    Case("template with a section of the wrong shape", ds_config("deepspeed.template={tmp}/offload.json"),
         "error: deepspeed.template = '{tmp}/offload.json': sets zero_optimization.offload_optimizer = 'cpu'; it must "
         "be a mapping", files={"offload.json": '{"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}'}),
]


# ------------------------------------------------------------------------------------------ 5. command options
FLOAT_OPTIONS = [
    Case("prepare-data --val-fraction inf", ("prepare-data", "--source", "python-stdlib", "--val-fraction", "inf"),
         "error: curriculum-pretrain prepare-data: argument --val-fraction: must be a finite number, not 'inf'"),
    Case("bench --memory-fraction nan", ("bench", "--config", "tiny-cpu", "--memory-fraction", "nan"),
         "error: curriculum-pretrain bench: argument --memory-fraction: must be a finite number, not 'nan'"),
    Case("diagnose --spike-factor -inf", ("diagnose", "runs/x", "--spike-factor=-inf"),
         "error: curriculum-pretrain diagnose: argument --spike-factor: must be a finite number, not '-inf'"),
    Case("lr-find --min-lr not a number", ("lr-find", "--config", "tiny-cpu", "--min-lr", "1e-3x"),
         "error: curriculum-pretrain lr-find: argument --min-lr: must be a number, not '1e-3x'"),
]

CASES = (NON_FINITE + BOOLEANS_AS_NUMBERS + YAML11_BOOLEANS + DUPLICATE_KEYS + LR_FIND_RAMP + ENVIRONMENT
         + UPPER_BOUNDS + OPTIMIZER + MODEL_OVERRIDES + DEEPSPEED + FLOAT_OPTIONS)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    """Exit status 2; one stderr line, `error: <field> = <value>: <allowed>`; no traceback, nothing on stdout."""
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run_cli([arg.replace("{tmp}", str(tmp_path)) for arg in case.args], env=case.env)
    line = result.stderr.rstrip("\n")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.count("error:") == 1, result.stderr
    assert line.startswith(case.starts.replace("{tmp}", str(tmp_path))), line
    assert line.endswith(case.ends), line
    assert ("(set by" in line) == case.ends.startswith("(set by"), line
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------ what still works


@pytest.mark.parametrize(("text", "value"), [("on", "on"), ("yes", "yes"), ("No", "No"), ("y", "y"),
                                             ("TRUE", True), ("false", False)])
def test_only_true_and_false_are_booleans(text: str, value: object) -> None:
    """Override values follow YAML 1.2 here: on/yes/no stay strings."""
    parsed = parse_yaml_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_switches_still_read_on_and_off() -> None:
    """A true/false field still takes on/off/yes/no (pydantic reads those strings), from --set and the environment."""
    config = load_config("tiny-cpu", ["run.tensorboard=off", "kernels.compile=yes"], environ={"CPT_RUN__EXPORT": "no"})
    assert config.run.tensorboard is False and config.kernels.compile is True and config.run.export is False


def test_values_at_the_bounds_load() -> None:
    """The bounds themselves are allowed."""
    config = load_config("tiny-cpu", [f"run.seed={MAX_SEED}", "curriculum.lr_events=[{at_step: 0, multiply: 0.5}]",
                                      f"guard.window={MAX_STEPS}", f"run.eval_batch={MAX_BATCH}"], environ={})
    assert config.run.seed == MAX_SEED and config.guard.window == MAX_STEPS


@pytest.mark.parametrize(("field", "environ", "sets", "named"), [
    ("run.seed", {"CPT_RUN__SEED": "x"}, (), ["CPT_RUN__SEED"]),
    ("run.seed", {"CPT_RUN": "{seed: x}"}, (), ["CPT_RUN"]),  # the variable set the section holding the field
    ("run.seed", {"CPT_RUN__SEED": "x"}, ("run.seed=y",), []),  # --set replaced the variable's value
    ("run.seed", {"CPT_RUN__SEED": "x"}, ("run={seed: y}",), []),
    ("run", {"CPT_RUN__TOTAL_TOKENS": "5"}, (), ["CPT_RUN__TOTAL_TOKENS"]),  # the message names total_tokens
    ("run", {"CPT_RUN__SEED": "5"}, (), []),  # inside the section, but not what the message is about
    ("run.seed", {"CPT_GUARD__WINDOW": "5", "OTHER": "1"}, (), []),
])
def test_env_variables_behind(field: str, environ: dict[str, str], sets: tuple[str, ...], named: list[str]) -> None:
    err = ConfigError(field, "x", "give total_steps or total_tokens, not both")
    assert env_variables_behind(err, environ, sets) == named
