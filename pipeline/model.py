"""Models built from config with ``transformers`` (no weights are downloaded), and their FLOPs per token.

Presets follow the usual shapes: GPT-2 124M/350M/1.3B (GPT-3 paper table 2.1 widths) and Llama-style models of
the same width and depth (RoPE, RMSNorm, SwiGLU with ``intermediate_size ~ 8/3 d`` rounded to 64). ``tiny`` trains
on a laptop CPU. Every field of the transformers config can be overridden from the YAML (``model.overrides``); the
sizes, rates and switches the presets and the parameter count use are checked here, without torch, before any
command starts (``check_model_overrides``), and so are the names transformers looks up in its tables when it builds
the model (the activation, the RoPE type): their tables import torch, so only a config that overrides them does.

Attention is PyTorch SDPA called with ``is_causal=True`` and no mask tensor (``causal_sdpa``, registered with
transformers below). Training rows are never padded and always start at position 0, so the causal mask is all a
row needs. transformers' own ``sdpa`` path builds a ``[batch, 1, T, T]`` mask under ``torch.compile`` (with torch
< 2.14 it cannot tell compiling from exporting), and SDPA with an explicit mask cannot use the flash kernels.
An exported model is saved with the stock ``sdpa`` implementation.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

from curriculum.config import ModelConfig
from curriculum.errors import ConfigError

# (hidden size, layers, heads, SwiGLU intermediate size)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 4, 4, 384),
    "124m": (768, 12, 12, 2048),
    "350m": (1024, 24, 16, 2816),
    "1.3b": (2048, 24, 16, 5504),
}

VOCAB_MULTIPLE = 64  # pad the embedding so its matmuls tile well (50257 -> 50304 for GPT-2's vocabulary)

# GPT2Config's attribute_map: common names it also accepts for its own fields (and lets win over them)
GPT2_ALIASES: dict[str, str] = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                                "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}


WIDTH_FIELD: dict[str, str] = {"llama": "hidden_size", "gpt2": "n_embd"}
"""The transformers config field that holds the model's width, by architecture."""

MAX_MODEL_SIZE = 2**24
"""Largest size an override may give (width, depth, heads, vocabulary, positions): 16,777,216."""

# What the fields that the presets set, or that the parameter count reads, must be, and the fields transformers looks
# up in its tables only when it builds the model (a KeyError then). They are checked here, before any model is built;
# transformers checks the rest.
OVERRIDE_KINDS: dict[str, str] = {
    **dict.fromkeys(("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), "size"),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "n_inner"), "size or null"),  # null: derived
    **dict.fromkeys(("rope_theta", "rms_norm_eps", "layer_norm_epsilon", "initializer_range"), "positive"),
    **dict.fromkeys(("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"), "probability"),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "scale_attn_weights"), "switch"),
    **dict.fromkeys(("hidden_act", "activation_function"), "activation"),  # Llama's, GPT-2's
    **dict.fromkeys(("rope_scaling", "rope_parameters"), "rope"),  # transformers 4's name, 5's
}


def padded_vocab_size(tokenizer_vocab_size: int) -> int:
    return -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_model_overrides(model: ModelConfig) -> None:
    """Every check of ``model.overrides`` that needs no data: each value of the right kind (``hidden_size: -1``,
    ``num_hidden_layers: big``), no field set twice through an alias, and a head layout the model can be built
    with. Raises ``ConfigError`` naming ``model.overrides.<key>``."""
    _apply_overrides(model, _preset_fields(model))


def model_config_dict(model: ModelConfig, vocab_size: int, max_seq_len: int, eot_id: int) -> dict[str, Any]:
    """The transformers config fields for a preset, the data's vocabulary and the longest stage, plus overrides.

    The position range covers the longest stage: RoPE's cache and GPT-2's learned position table must reach it
    (Megatron-DeepSpeed PR #285: RoPE with sequence warmup needs the rotary cache to cover the current length).
    """
    fields = _preset_fields(model)
    position_field = "max_position_embeddings" if model.arch == "llama" else "n_positions"
    fields.update({position_field: max_seq_len, "vocab_size": padded_vocab_size(vocab_size),
                   "bos_token_id": eot_id, "eos_token_id": eot_id})
    given = _apply_overrides(model, fields)
    if fields[position_field] < max_seq_len:
        raise ConfigError(f"model.overrides.{given.get(position_field, position_field)}", fields[position_field],
                          f"must cover the longest stage ({max_seq_len} tokens)")
    if fields["vocab_size"] < vocab_size:
        raise ConfigError("model.overrides.vocab_size", fields["vocab_size"],
                          f"must be at least the tokenizer's vocabulary ({vocab_size})")
    return fields


def _preset_fields(model: ModelConfig) -> dict[str, Any]:
    """The preset's transformers config fields, before the vocabulary, the position range and the overrides."""
    hidden, layers, heads, intermediate = SHAPES[model.preset]
    if model.arch == "llama":
        return {
            "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": intermediate,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        }
    return {
        "model_type": "gpt2", "n_embd": hidden, "n_layer": layers, "n_head": heads,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


def _apply_overrides(model: ModelConfig, fields: dict[str, Any]) -> dict[str, str]:
    """``model.overrides`` checked and written into ``fields``; returns field -> the override key that set it."""
    # an alias is stored under the field it sets, so the checks below see the value the model will get
    aliases = GPT2_ALIASES if model.arch == "gpt2" else {}
    given: dict[str, str] = {}
    for key, value in model.overrides.items():
        field = aliases.get(key, key)
        if field in given:
            raise ConfigError(f"model.overrides.{key}", value,
                              f"sets the same field as model.overrides.{given[field]}: give one of them")
        problem = _kind_problem(OVERRIDE_KINDS.get(field), value)
        if problem:
            raise ConfigError(f"model.overrides.{key}", value, problem)
        given[field] = key
        fields[field] = copy.deepcopy(value)  # transformers writes into the mappings it gets (rope_scaling)
    _check_heads(model, fields, given)
    return given


def _kind_problem(kind: Optional[str], value: Any) -> Optional[str]:
    """What is wrong with ``value`` for a field of ``kind`` (``OVERRIDE_KINDS``), or None."""
    if kind is None:
        return None  # a field transformers checks when the model is built
    if kind == "switch":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "activation":
        from transformers.activations import ACT2FN

        return None if isinstance(value, str) and value in ACT2FN else f"must be one of {', '.join(sorted(ACT2FN))}"
    if kind == "rope":
        return _rope_problem(value)
    if kind.startswith("size"):
        if (value is None and kind == "size or null") or (type(value) is int and 1 <= value <= MAX_MODEL_SIZE):
            return None
        return f"must be a whole number from 1 to {MAX_MODEL_SIZE:,}" + (" or null" if kind == "size or null" else "")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "positive":
        return None if number and value > 0 else "must be a finite number > 0"
    return None if number and 0 <= value <= 1 else "must be a number from 0 to 1"


def _rope_problem(value: Any) -> Optional[str]:
    """What is wrong with RoPE settings (``{rope_type: linear, factor: 2.0}``, or null), or None: transformers finds a
    ``rope_type`` of none of its own (``type`` in older configs) only when it builds the rotary embedding."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return "must be a mapping, e.g. {rope_type: linear, factor: 2.0}, or null"
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_types = sorted({"default", *ROPE_INIT_FUNCTIONS})  # "default" is computed apart in transformers 5
    rope_type = value.get("rope_type", value.get("type", "default"))
    if rope_type in rope_types:
        return None
    return f"rope_type {rope_type!r} is not one of transformers' RoPE types: {', '.join(rope_types)}"


def _check_heads(model: ModelConfig, fields: dict[str, Any], given: dict[str, str]) -> None:
    """Attention heads that split the width evenly, grouped KV heads that divide the heads, and (Llama) an even
    head size for RoPE's rotation: transformers would fail on these only when the model is built or run."""
    llama = model.arch == "llama"
    hidden_field, heads_field = WIDTH_FIELD[model.arch], "num_attention_heads" if llama else "n_head"
    hidden, heads = fields[hidden_field], fields[heads_field]
    if hidden % heads:
        if heads_field in given:
            raise ConfigError(f"model.overrides.{given[heads_field]}", heads, f"must divide {hidden_field} {hidden}")
        raise ConfigError(f"model.overrides.{given[hidden_field]}", hidden,
                          f"must be a multiple of {heads_field} {heads}")
    if not llama:
        return
    kv_heads = fields.get("num_key_value_heads") or heads
    if heads % kv_heads:
        if "num_key_value_heads" in given:
            raise ConfigError(f"model.overrides.{given['num_key_value_heads']}", kv_heads,
                              f"must divide num_attention_heads {heads}")
        raise ConfigError(f"model.overrides.{given[heads_field]}", heads,
                          f"must be a multiple of num_key_value_heads {kv_heads}")
    head_dim = fields.get("head_dim") or hidden // heads
    if head_dim % 2:
        field = "head_dim" if "head_dim" in given else heads_field if heads_field in given else hidden_field
        raise ConfigError(f"model.overrides.{given[field]}", fields[field],
                          f"gives an odd head size {head_dim}; RoPE rotates pairs of dimensions")


CAUSAL_SDPA = "causal_sdpa"


def causal_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Optional[Any],
                          dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention interface: ``query`` ``[batch, heads, T, head_dim]``, ``key``/``value`` with as many
    or fewer (grouped) heads; returns ``[batch, T, heads, head_dim]``. The mask is ignored: it is always causal."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _no_mask(**kwargs: Any) -> None:
    """The mask interface of ``causal_sdpa``: no mask tensor is built."""
    return None


def register_causal_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_SDPA, causal_sdpa_attention)
    AttentionMaskInterface.register(CAUSAL_SDPA, _no_mask)


def build_model(model: ModelConfig, vocab_size: int, max_seq_len: int, eot_id: int) -> Any:
    """A freshly initialised ``*ForCausalLM`` with mask-free causal SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = model_config_dict(model, vocab_size, max_seq_len, eot_id)
    model_type = fields.pop("model_type")
    from huggingface_hub.errors import StrictDataclassError

    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as err:  # KeyError: RoPE settings it lacks
        raise ConfigError("model.overrides", model.overrides,
                          f"rejected by transformers: {' '.join(str(err).split())}") from None
    # A config stores any keyword it does not know as an attribute, so the built config has every key, typos
    # included. Unknown: not a field of the class's defaults (aliases count) and merely stored, not consumed
    # (LlamaConfig folds rope_theta into rope_parameters).
    defaults = AutoConfig.for_model(model_type)
    unknown = sorted(k for k in model.overrides if not hasattr(defaults, k) and hasattr(hf_config, k))
    if unknown:
        raise ConfigError(f"model.overrides.{unknown[0]}", model.overrides[unknown[0]],
                          f"not a field of {type(hf_config).__name__}")
    register_causal_attention()
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=CAUSAL_SDPA)


def param_numel(param: Any) -> int:
    """A parameter's size, also when ZeRO-3 has partitioned it away (DeepSpeed keeps the full size as ``ds_numel``)."""
    return getattr(param, "ds_numel", param.numel())


def matmul_params(model: Any) -> int:
    """Parameters that take part in a matmul per token: all of them except the input embedding tables
    (a lookup, not a matmul); a tied output head still counts once."""
    import torch

    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    head_id = id(head.weight) if head is not None else None
    return sum(param_numel(p) for p in model.parameters() if id(p) not in embeddings or id(p) == head_id)


def flops_per_token(matmul_param_count: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B:

        6 * N + 12 * n_layer * d_model * seq_len

    ``6 N``: a multiply-add per matmul weight (2 FLOPs) forward, twice that backward. ``12 L d T``: the attention
    score and value matmuls (``2 * 2 * d * T`` forward per layer, x3 with backward), counted over the full
    ``T x T`` square as in PaLM and nanoGPT. ``seq_len`` is the length trained at this step, never the maximum.
    """
    return 6.0 * matmul_param_count + 12.0 * n_layer * d_model * seq_len
