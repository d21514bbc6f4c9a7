"""The run config: one YAML file, one typed and documented section per concern.

    name        what the run is called (output directory name by default)
    model       architecture preset and any transformers config field
    data        the prepared token files (written by ``curriculum-pretrain prepare-data``)
    curriculum  the stages (or a continuous pacing function), with per-stage batch, LR, warmup and clip
    optimizer   AdamW hyperparameters
    guard       loss/gradient spike detection and what to do about a spike
    kernels     fused kernels and torch.compile, one switch each
    deepspeed   a template from ``ds_configs/`` plus overrides; the JSON the engine gets is derived in
                ``pipeline/ds_config.py`` and nowhere else
    run         budget, seed, precision, eval, checkpoints, logging

Every model forbids unknown keys, so a typo is an error naming the key. Numbers are finite and never ``true`` or
``false`` (pydantic alone reads ``true`` as 1 and accepts ``.inf``); counts have upper bounds (``MAX_STEPS``,
``MAX_TOKENS``, ``MAX_SEQ_LEN``, ``MAX_BATCH``, ``MAX_SEED``) far beyond any real run, so a slipped exponent is an
error instead of a run that never ends. Checks that need more than one field (stages in order, warmup shorter than
its stage, batch divisible by world size x micro-batch) live in ``curriculum.schedule.build_schedule``, which
resolves the config into concrete per-step values.

This module imports no torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SEQ_LEN_MULTIPLE = 8  # tensor cores want multiples of 8 for bf16/fp16 (DeepSpeed's curriculum tutorial)

MAX_STEPS = 10**12
"""Most optimizer steps anything may count (stage ends, warmups, the run, intervals): 10**12 steps of even one
token each is beyond any run, and the schedule still resolves that many at once."""
MAX_TOKENS = 10**15
"""Most tokens a budget may name: 1,000 T, 60x the largest published pretraining runs (15 T)."""
MAX_SEQ_LEN = 2**20
"""Longest sequence: 1,048,576 tokens."""
MAX_BATCH = 2**20
"""Most sequences in one batch: 1,048,576 (8 M tokens per step at seq_len 8, the shortest there is)."""
MAX_SEED = 2**32 - 1
"""Largest seed: 32 bits, which every common generator takes (numpy's legacy ``RandomState`` no more)."""


def _not_a_boolean(value: Any) -> Any:
    """pydantic reads ``true`` in a number field as 1: a boolean where a number belongs is a mistake."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


_NUMBER = BeforeValidator(_not_a_boolean)

# The field types: every number is finite and no boolean; every count has its bound.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False), _NUMBER]
"""A real number: not ``.inf``, ``.nan``, ``true`` or ``false``."""
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), _NUMBER]
PositiveInt = Annotated[int, Field(gt=0), _NUMBER]
Steps = Annotated[int, Field(ge=0, le=MAX_STEPS), _NUMBER]
PositiveSteps = Annotated[int, Field(gt=0, le=MAX_STEPS), _NUMBER]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS), _NUMBER]
PositiveTokens = Annotated[int, Field(gt=0, le=MAX_TOKENS), _NUMBER]
SeqLen = Annotated[int, Field(gt=0, le=MAX_SEQ_LEN), _NUMBER]
Batch = Annotated[int, Field(gt=0, le=MAX_BATCH), _NUMBER]
Beta = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False), _NUMBER]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), _NUMBER]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- model


class ModelConfig(Section):
    """Which ``transformers`` model to build from config (no weights are downloaded)."""

    arch: Literal["llama", "gpt2"] = "llama"
    """``llama``: RoPE, RMSNorm, SwiGLU (LlamaForCausalLM). ``gpt2``: learned positions, LayerNorm, GELU."""
    preset: Literal["tiny", "124m", "350m", "1.3b"] = "tiny"
    """Size preset; ``tiny`` trains on a CPU in minutes."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Any field of the transformers config class (``LlamaConfig`` / ``GPT2Config``), e.g. ``num_hidden_layers``.
    The position range (``max_position_embeddings`` / ``n_positions``) defaults to the longest stage and may not
    be smaller than it."""


# --------------------------------------------------------------------------------------------------- data


class DataConfig(Section):
    """Where the packed token files are."""

    dir: str = "data/python-stdlib"
    """Directory written by ``curriculum-pretrain prepare-data`` (``train.bin``, ``val.bin``, ``manifest.json``,
    ``tokenizer.json``). Relative paths are taken from the current working directory."""


# --------------------------------------------------------------------------------------------------- curriculum


class LRScalingConfig(Section):
    """How ``lr: auto`` turns ``base_lr`` into a stage's peak LR (and the ``rule_lr`` shown next to hand-set LRs).

    ``seed``:   ``base_lr * sqrt(batch / ref_batch) * min(ref_seq_len / seq_len, seq_cap)``
    ``linear``: ``base_lr * batch / ref_batch``
    ``sqrt``:   ``base_lr * sqrt(batch / ref_batch)``
    ``none``:   ``base_lr``
    ``batch`` is the stage's global batch in sequences.
    """

    rule: Literal["seed", "linear", "sqrt", "none"] = "seed"
    ref_batch: Batch = 32
    """Global batch (sequences) at which ``base_lr`` was tuned."""
    ref_seq_len: SeqLen = 2048
    """Sequence length at which ``base_lr`` was tuned (``seed`` rule only)."""
    seq_cap: PositiveFloat = 4.0
    """Largest LR boost the ``seed`` rule gives for short sequences."""


class ClipRule(Section):
    """``grad_clip: auto`` uses ``clip`` for stages with ``seq_len <= max_seq_len``."""

    max_seq_len: SeqLen
    clip: PositiveFloat


class GradClipAutoConfig(Section):
    """The ``grad_clip: auto`` rule: the first rule whose ``max_seq_len`` covers the stage wins."""

    rules: list[ClipRule] = Field(
        default_factory=lambda: [ClipRule(max_seq_len=128, clip=5.0), ClipRule(max_seq_len=512, clip=1.0)]
    )
    otherwise: PositiveFloat = 0.5
    """Clip for stages longer than every rule's ``max_seq_len``."""


class LREvent(Section):
    """A multiplicative LR change from ``at_step`` on (inclusive); a "two-stage LR" is one event."""

    at_step: Steps
    multiply: PositiveFloat


LRValue = Union[PositiveFloat, Literal["auto"]]
ClipValue = Union[PositiveFloat, Literal["auto"]]


class SegmentSettings(Section):
    """What a stage (or the pacing segment) trains with: where it ends, batch, LR, warmup, clip, decay.

    Where it ends: ``until_step`` (exclusive: the stage runs steps ``start .. until_step - 1``) or
    ``until_tokens`` (the stage ends at the first step boundary where the run has trained at least that many
    tokens). Only the last stage may give neither; then ``run.total_steps`` or ``run.total_tokens`` ends it.
    """

    until_step: Optional[PositiveSteps] = None
    until_tokens: Optional[PositiveTokens] = None
    global_batch: Optional[Batch] = None
    """Sequences per optimizer step, over all ranks (micro-batch x grad-accum x world size)."""
    global_batch_tokens: Optional[PositiveTokens] = None
    """Alternative to ``global_batch``: tokens per optimizer step (must be a multiple of ``seq_len``)."""
    micro_batch: Optional[Batch] = None
    """Sequences per rank per forward pass. Default: the largest divisor of the per-rank batch whose tokens fit
    in ``curriculum.micro_batch_tokens``."""
    lr: Optional[LRValue] = None
    """Peak LR: an absolute value, or ``auto`` (the ``lr_scaling`` rule). Default: ``auto``."""
    lr_mult: Optional[PositiveFloat] = None
    """Peak LR as a multiple of ``curriculum.base_lr`` (instead of ``lr``)."""
    lr_max: Optional[PositiveFloat] = None
    """Upper bound on the peak LR however it is set (e.g. the caps ``lr-find`` writes); ``plan`` marks where it
    applies."""
    warmup_steps: Optional[Steps] = None
    """Linear warmup length in optimizer steps."""
    warmup_tokens: Optional[Tokens] = None
    """Warmup length in tokens: ``ceil(warmup_tokens / tokens_per_step)`` steps, at most
    ``curriculum.warmup_cap_steps``."""
    grad_clip: ClipValue = "auto"
    """Max global gradient norm, or ``auto`` (``curriculum.grad_clip_auto``)."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """LR shape after warmup, within this stage, from the peak to ``min_lr_ratio * peak``."""
    min_lr_ratio: FiniteFloat = Field(default=0.1, ge=0.0, le=1.0)
    """The LR at the end of the decay, as a fraction of the peak."""

    @model_validator(mode="after")
    def _one_of_each(self) -> "SegmentSettings":
        for a, b in (("until_step", "until_tokens"), ("global_batch", "global_batch_tokens"),
                     ("lr", "lr_mult"), ("warmup_steps", "warmup_tokens")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        return self


class StageConfig(SegmentSettings):
    """One discrete curriculum stage at a fixed sequence length."""

    seq_len: SeqLen
    """Tokens per training sequence in this stage (a multiple of 8)."""


class PacingConfig(SegmentSettings):
    """A continuous length schedule with DeepSpeed's names, as one LR segment over the whole run.

    ``fixed_linear`` / ``fixed_root``: the length grows from ``min_seq_len`` to ``max_seq_len`` over
    ``total_curriculum_steps`` as ``(step / total_curriculum_steps) ** (1 / root_degree)``, in increments of
    ``step_size`` counted from ``min_seq_len`` (so it is never below ``min_seq_len``), and is ``max_seq_len`` from
    ``total_curriculum_steps`` on. ``fixed_discrete``: ``difficulty[i]`` while ``step <= max_step[i]``.
    """

    type: Literal["fixed_linear", "fixed_root", "fixed_discrete"]
    min_seq_len: Optional[SeqLen] = None
    max_seq_len: Optional[SeqLen] = None
    step_size: SeqLen = 8
    total_curriculum_steps: Optional[PositiveSteps] = None
    root_degree: PositiveInt = 2
    """Only for ``fixed_root``; ``fixed_linear`` is root degree 1."""
    difficulty: list[SeqLen] = Field(default_factory=list)
    """Only for ``fixed_discrete``: the lengths, in order."""
    max_step: list[Steps] = Field(default_factory=list)
    """Only for ``fixed_discrete``: one fewer than ``difficulty``; ``difficulty[i]`` up to and including
    ``max_step[i]``."""
    bucket: Optional[SeqLen] = None
    """Round each length down to a multiple of ``bucket`` (never below ``min_seq_len``), so a compiled run builds
    few graphs: ``fixed_linear`` 64 -> 1024 with ``step_size: 8`` has 121 lengths, with ``bucket: 64`` 16. A
    multiple of 8 that divides ``max_seq_len``."""


class CurriculumConfig(Section):
    """The sequence-length curriculum: ``stages`` (discrete) or ``pacing`` (continuous), never both.

    Steps count from 0: step ``s`` is the ``(s + 1)``-th optimizer update.
    """

    mode: Literal["truncate", "reshape"] = "truncate"
    """``truncate``: each row is the first ``seq_len`` tokens of a full-length sample (the rest is skipped).
    ``reshape``: full-length samples are cut into ``max_seq_len / seq_len`` rows, so no token is skipped; a
    stage's batch defaults to the last stage's tokens per step."""
    base_lr: PositiveFloat = 6e-4
    """The LR that ``lr_mult`` multiplies and the ``lr_scaling`` rule starts from."""
    lr_scaling: LRScalingConfig = Field(default_factory=LRScalingConfig)
    grad_clip_auto: GradClipAutoConfig = Field(default_factory=GradClipAutoConfig)
    warmup_cap_steps: Optional[PositiveSteps] = None
    """Upper bound on warmup steps computed from ``warmup_tokens``."""
    warmup_start: Literal["previous", "zero"] = "previous"
    """Where each stage's warmup starts: the LR the previous stage ended at (continuous LR), or zero.
    The first stage always warms up from zero."""
    micro_batch_tokens: PositiveTokens = 16384
    """Token budget of one micro-batch per rank when a stage does not set ``micro_batch``."""
    stages: Optional[list[StageConfig]] = None
    pacing: Optional[PacingConfig] = None
    lr_events: list[LREvent] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stages_or_pacing(self) -> "CurriculumConfig":
        if (self.stages is None) == (self.pacing is None):
            raise ValueError("give either stages (a list) or pacing, exactly one")
        if self.stages is not None and not self.stages:
            raise ValueError("stages must list at least one stage")
        return self


# --------------------------------------------------------------------------------------------------- guard


class GuardConfig(Section):
    """Spike guard: checks every step's loss before the update and its gradient norm (``pipeline/spikes.py`` has
    the definition, shared with ``diagnose`` and ``sweep``).

    ``robust`` (the default): a loss more than ``loss_spread`` robust spreads (1.4826 x the median absolute
    deviation, at least 1 % of the level) above the median of the stage's last ``window`` accepted losses, judged
    from 10 of them on (or the whole window when it is shorter); a gradient norm above ``grad_norm_factor`` x the
    median of the last ``window`` accepted norms, across stages. ``ratio``: a loss above ``loss_factor`` x the mean
    of the stage's last ``window`` accepted losses (judged once the stage has ``window``), a norm above
    ``grad_norm_factor`` x their mean. A non-finite loss or norm is always a spike. A stage switch changes the loss
    level, so the loss history restarts there.
    """

    enabled: bool = True
    method: Literal["robust", "ratio"] = "robust"
    loss_spread: FiniteFloat = Field(default=6.0, gt=0.0)
    """``robust``: how many spreads above the recent median a loss may be."""
    loss_factor: FiniteFloat = Field(default=2.0, gt=1.0)
    """``ratio``: how many times the recent mean a loss may be."""
    grad_norm_factor: FiniteFloat = Field(default=10.0, gt=1.0)
    window: PositiveSteps = 20
    new_level_after: PositiveSteps = 3
    """A gradient-norm spike after this many of them in a row starts a new level of the norm: it is still an event,
    the norm history restarts from it, and under ``skip`` its update is applied at ``lr_scale`` x the LR, because
    skipping cannot move the weights out of a lasting change. Loss spikes never start a new level, nor does anything
    under ``rollback``, which puts the weights back."""
    action: Literal["skip", "scale_lr", "rollback"] = "skip"
    """``skip``: drop the update (a gradient-norm spike, known only after DeepSpeed's step, scales the LR instead;
    so does a new level, see ``new_level_after``).
    ``scale_lr``: multiply the LR by ``lr_scale`` for ``lr_scale_steps`` steps (compounding per event).
    ``rollback``: reload the last checkpoint and skip the batches from there up to the spike."""
    lr_scale: FiniteFloat = Field(default=0.5, gt=0.0, lt=1.0)
    lr_scale_steps: PositiveSteps = 50
    max_events: PositiveSteps = 20
    """Stop the run (with a checkpoint of the last good state) after this many events."""
    eval_rise: Optional[FiniteFloat] = Field(default=0.10, gt=0.0)
    """Stop the run when a periodic held-out loss is non-finite or more than this share above the lowest one so far
    (the diverging state is not saved as ``latest``; the evaluation after the last step does not stop it): a run can
    break slowly, with no step far from its recent ones (GPT-2 124M at twice its tuned LR went from a held-out 4.31
    to 6.22 over 7 evaluations with one guard event, and trained 480 more steps). ``null`` (or ``enabled: false``):
    never."""


# --------------------------------------------------------------------------------------------------- kernels

Switch = Union[Literal["auto"], bool]


class KernelsConfig(Section):
    """Fused kernels and compilation, one switch each: ``auto`` uses a kernel where it can run (and says once in
    the log when it cannot), ``true`` requires it, ``false`` never uses it. Attention is PyTorch SDPA with
    ``is_causal=True`` in every case. See ``pipeline/kernels.py`` and ``pipeline/engine.py``."""

    fused_adam: Switch = "auto"
    """DeepSpeed FusedAdam (CUDA); otherwise torch AdamW."""
    fused_cross_entropy: Switch = False
    """Liger's fused linear cross-entropy for any decoder (no ``tokens x vocab`` logits tensor), beside the
    compiled region. Off by default: on an H200 it trained GPT-2 124M slower than the compiled unfused loss
    (457 K against 493 K tok/s at 64 x 1024); it saves the logits' memory. CUDA, ``pip install liger-kernel``."""
    fp8_lm_head: Switch = False
    """The output layer's matmuls (forward, input and weight gradients) in FP8 with one scale per tensor, the loss
    computed from its bf16 logits in fp32 (``pipeline/kernels.py``). Off by default and in every recipe: on an H200
    GPT-2 124M at 64 x 1024 ran 558.7-562.0 K tok/s with it (bf16: 524.9-534.8 K, other machines), and the 4x
    recipes' training took 1-3.5 % less time but ended 33.5 M tokens 0.008-0.023 higher in held-out loss, the
    baseline never reaching its bf16 twin's loss (docs/BENCHMARKS.md). NVIDIA GPUs with FP8 tensor cores (compute
    capability 8.9 or newer); the width and the vocabulary multiples of 16; not with ``fused_cross_entropy`` or ZeRO
    stage 3."""
    logits_gradient_in_forward: Switch = "auto"
    """The loss's gradient with respect to the logits made in the forward pass, while the logits are read for the
    loss, and written over them (``pipeline/kernels.py``, ``HeadCrossEntropy``; on CUDA one Triton kernel instead of
    the two Inductor generates): the plain loss's arithmetic up to rounding. On an H200, GPT-2 124M at 64 x 1024:
    538.9-539.7 K tok/s against 527.8 K without it, the same memory (docs/BENCHMARKS.md). ``auto``: on CUDA, where
    Triton is (on a CPU its torch form was slower; ``true`` runs it there); not under ZeRO stage 3; with
    ``fused_cross_entropy`` or ``fp8_lm_head`` those compute the loss."""
    fused_mlp: Switch = "auto"
    """GPT-2's MLP with its tanh GELU inside the matmuls, both ways (cuBLASLt epilogues, ``pipeline/gelu_mlp.py``;
    built on first use, as FusedAdam is): two passes over the 4x-wide activations fewer per layer. ``auto``: on
    CUDA for ``arch: gpt2`` with ``activation_function`` ``gelu_new`` (GPT-2's) in ``bf16`` or ``bf16-autocast``,
    when the extension builds; not under ZeRO stage 3."""
    liger: Switch = "auto"
    """Liger Triton kernels inside Llama blocks: RMSNorm, SwiGLU, RoPE. CUDA, ``arch: llama``; in ``auto`` not
    with ``compile`` (they break the graph, and Inductor fuses these operations itself)."""
    apex: Switch = "auto"
    """NVIDIA apex fused RMSNorm/LayerNorm when apex is importable (CUDA; not with Liger's RMSNorm; in ``auto`` not
    with ``compile``)."""
    compile: Switch = "auto"
    """``torch.compile`` (``auto``: on CUDA): with static shapes one graph per distinct (micro-batch, seq_len) and
    one for evaluation (``plan`` lists them; see ``dynamic_shapes``); a graph built after the warm-up, or a
    fallback to eager, is reported in the log and in metrics.jsonl."""
    dynamic_shapes: Switch = False
    """One compiled training graph for all the stages' shapes instead of one per shape: the sizes that change from
    stage to stage (seq_len, micro-batch) are symbolic in it; dynamo keeps a micro-batch of 1 static, so such
    stages share a second graph. Each shape still records its own CUDA graph. ``auto``: whenever compiling. A
    trade: on an H200 (GPT-2 124M, 32 sequences of 256 / 512 / 768 / 1024) the four shapes compiled in 36 s
    instead of 86 s from a cold cache and in 5 s instead of 10 s from a warm one, but every step ran about 2 %
    slower (0.6-2.4 %): it pays for short runs, not for long ones. Each length still records its own CUDA graph in
    the warm-up (not measured with many lengths)."""
    compile_warmup: bool = True
    """Build every graph before step 0 by running the real training step (both micro-step kinds) and the real
    evaluation once per shape, with the gradients dropped; the time is logged. ``false`` compiles each shape at
    its first step instead."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """The ``torch.compile`` backend: ``inductor`` generates kernels; ``aot_eager`` and ``eager`` only trace
    (for debugging and for CPU tests of the compile bookkeeping)."""
    cuda_graphs: Switch = "auto"
    """Replay each compiled graph as a CUDA graph (Inductor's CUDA graph trees, ``reduce-overhead``; ``auto``: when
    compiling on CUDA): removes the kernel-launch gaps that dominate short steps."""
    coordinate_descent_tuning: bool = False
    """Inductor's coordinate-descent search over the block sizes of the kernels it generates (its
    ``coordinate_descent_tuning``): longer first compiles (the results are cached), possibly faster memory-bound
    kernels (the loss over the logits, norms, casts; +0.8 % on GPT-2 124M at 1024 on an H200, within the spread
    between runs, for a 5.4x longer cold compile). Needs ``compile`` with the ``inductor`` backend."""


# --------------------------------------------------------------------------------------------------- optimizer


class OptimizerConfig(Section):
    """AdamW. On CUDA, DeepSpeed's FusedAdam; on CPU, ``torch.optim.AdamW`` (no JIT build needed)."""

    weight_decay: FiniteFloat = Field(default=0.1, ge=0.0)
    """Applied to matrices only; biases, norms and embeddings of size 1-D are not decayed."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """Decay rates of the gradient's running mean and of its square, each in [0, 1)."""
    eps: PositiveFloat = 1e-8
    """Added to the denominator of the update."""


# --------------------------------------------------------------------------------------------------- deepspeed


class DeepSpeedConfig(Section):
    """The DeepSpeed JSON: a template plus overrides; batch, clip, precision and optimizer are filled in from
    this config (see ``pipeline/ds_config.py``) and may not be set here."""

    template: str = "default"
    """A name from ``ds_configs/`` (``default``, ``zero2``, ``rtx3090``) or a path to a JSON file."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Merged into the template, recursively (e.g. ``{zero_optimization: {stage: 1}}``)."""


# --------------------------------------------------------------------------------------------------- run


class WandbConfig(Section):
    """Weights & Biases logging: every metric against ``tokens`` (wandb's step metric), the run config as its
    config."""

    enabled: bool = False
    project: str = "curriculum-pretrain"
    mode: Literal["offline", "online"] = "offline"
    """``offline`` writes to the run directory and needs no network (``wandb sync`` uploads later)."""
    name: Optional[str] = None
    """The run's name in wandb; default: the config's ``name``. ``sweep`` names each run after its LR
    (``tiny-cpu-lr_3.00e-04``)."""
    group: Optional[str] = None
    """Runs of one group are shown together; ``sweep`` puts its runs in a group named after its directory."""


class RunConfig(Section):
    """Budget, seed, precision, evaluation, checkpoints and logging."""

    total_steps: Optional[PositiveSteps] = None
    """End of the last stage when it gives no ``until_step``/``until_tokens``."""
    total_tokens: Optional[PositiveTokens] = None
    """Same, as a token budget."""
    seed: Seed = 1234
    """Model initialisation and data order; 0 .. 2**32 - 1."""
    max_steps: Optional[PositiveSteps] = None
    """Cut the plan at this step, e.g. for a smoke test of a long recipe (``--max-steps N``): the run trains steps
    ``0 .. N - 1`` exactly as the full plan would, the stage holding step ``N - 1`` ends there and later stages are
    dropped; LR windows are not rescaled. At or past the plan's end: no cut. ``plan`` shows the cut."""
    precision: Literal["auto", "fp32", "bf16", "bf16-autocast"] = "auto"
    """``bf16``: DeepSpeed's bf16 mode (bf16 weights and gradients, fp32 master weights in the optimizer).
    ``bf16-autocast``: fp32 weights and gradients, matmuls in bf16 under ``torch.autocast`` (DeepSpeed's
    ``torch_autocast``). ``auto``: bf16-autocast on a CUDA device that supports bf16, fp32 otherwise (CPU)."""
    output_dir: Optional[str] = None
    """Run directory; default ``runs/<name>``. ``train --output-dir`` overrides it."""
    eval_every: Steps = 100
    """Evaluate every N steps (0: only at the end). Evaluation is always at the full sequence length."""
    eval_every_tokens: Tokens = 0
    """When not 0, replaces ``eval_every`` (written as 0 in the run's config.json): evaluate after the step that
    brings the tokens trained to or past each multiple of N. Runs whose steps hold different numbers of tokens, a
    curriculum and its fixed-length baseline, then evaluate at about the same token counts (exactly, where N is a
    multiple of every stage's tokens per step) and as often."""
    eval_batches: Batch = 8
    """Batches of ``eval_batch`` full-length sequences in each evaluation: the evaluation set is the first
    ``eval_batch x eval_batches`` windows of ``val.bin``, the same for every world size."""
    eval_batch: Batch = 8
    """Sequences per evaluation batch over all ranks (each rank takes ``eval_batch / world size`` of them)."""
    checkpoint_every: Steps = 100
    """Save every N steps (0: only at the end)."""
    keep_checkpoints: PositiveSteps = 2
    """How many of the newest checkpoints to keep (and the ones ``latest`` and ``best`` name)."""
    log_every: PositiveSteps = 1
    """Write a metrics line every N steps."""
    tensorboard: bool = True
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    peak_flops: Optional[PositiveFloat] = None
    """Peak FLOP/s of one device for MFU. Default: looked up from the GPU name (H100: 989e12); none on CPU."""
    export: bool = True
    """Write the final model with ``save_pretrained`` (+ tokenizer) to ``<run dir>/final``, as ``export`` does."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest eval loss: ``checkpoints/best`` names it (saved at that evaluation
    if its step has none)."""
    heartbeat_timeout_s: PositiveFloat = Field(default=30.0, ge=3.0, le=3600.0)
    """With several ranks: a rank whose heartbeat (bumped every second by a thread of its own, also while it
    compiles, evaluates or saves) has not moved for this long is dead, and the others stop with one line naming it
    and the step (``pipeline/peers.py``). 3 .. 3600."""
    collective_timeout_s: PositiveFloat = Field(default=600.0, ge=1.0, le=86400.0)
    """The process-group timeout (gloo and NCCL): how long a rank that is alive waits for the others in one
    collective, the rendezvous at start included, before the job fails. It must outlast the longest gap between
    two collectives in which ranks differ: a cold compile on one node (88 s for GPT-2 124M on an H200), DeepSpeed's
    first JIT op build (40-95 s), a checkpoint save to a slow filesystem, nodes started by hand a while apart.
    A dead rank is found by its heartbeat long before this. 1 .. 86400."""

    @model_validator(mode="after")
    def _tokens_replace_steps(self) -> "RunConfig":
        """A token interval replaces the step interval (also one a recipe sets): the step interval becomes 0,
        without another round of validation."""
        if self.eval_every_tokens and self.eval_every:
            self.__dict__["eval_every"] = 0
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> "RunConfig":
        if self.total_steps is not None and self.total_tokens is not None:
            raise ValueError("give total_steps or total_tokens, not both")
        return self


# --------------------------------------------------------------------------------------------------- all


class Config(Section):
    """A whole run, as written in a recipe YAML."""

    name: str = "run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    curriculum: CurriculumConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    run: RunConfig = Field(default_factory=RunConfig)
