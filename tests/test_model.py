"""Model presets from config, parameter counts and FLOPs per token, checked against counts done by hand.

Only ``tiny`` models are built (hidden 128, 4 layers, 4 heads, SwiGLU 384). The GPT-2 124M FLOPs are checked through
the formula with a parameter count worked out by hand below, not by instantiating the model.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_config

from curriculum.config import ModelConfig
from curriculum.errors import ConfigError
from curriculum.schedule import build_schedule
from pipeline.model import (build_model, check_model_overrides, flops_per_token, matmul_params, model_config_dict,
                            padded_vocab_size)

VOCAB = 300  # a small byte-level BPE; padded to 320 = 5 x 64
EOT_ID = 0


def longest_stage() -> int:
    """Stages of 64, 128 and 256 tokens: the position range must reach 256."""
    config = make_config({"stages": [{"until_step": 2, "seq_len": 64, "global_batch": 4},
                                     {"until_step": 4, "seq_len": 128, "global_batch": 2},
                                     {"until_step": 6, "seq_len": 256, "global_batch": 1}]})
    return build_schedule(config).max_seq_len


MAX_SEQ_LEN = longest_stage()


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="llama", preset="tiny"), VOCAB, MAX_SEQ_LEN, EOT_ID)


@pytest.fixture(scope="module")
def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="gpt2", preset="tiny"), VOCAB, MAX_SEQ_LEN, EOT_ID)


# --------------------------------------------------------------------------------------------------- presets


def test_longest_stage_is_256() -> None:
    assert MAX_SEQ_LEN == 256


def test_tiny_llama_covers_the_longest_stage(tiny_llama: Any) -> None:
    config = tiny_llama.config
    assert type(tiny_llama).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) \
        == (128, 4, 4, 384)
    assert config.max_position_embeddings == 256
    assert config.tie_word_embeddings is False
    with torch.no_grad():
        logits = tiny_llama(input_ids=torch.randint(0, VOCAB, (1, 256))).logits
    assert logits.shape == (1, 256, 320)
    assert torch.isfinite(logits).all()


def test_tiny_gpt2_covers_the_longest_stage(tiny_gpt2: Any) -> None:
    config = tiny_gpt2.config
    assert type(tiny_gpt2).__name__ == "GPT2LMHeadModel"
    assert (config.n_embd, config.n_layer, config.n_head) == (128, 4, 4)
    assert config.n_positions == 256
    assert tiny_gpt2.transformer.wpe.weight.shape == (256, 128)  # the learned position table reaches 256
    with torch.no_grad():
        logits = tiny_gpt2(input_ids=torch.randint(0, VOCAB, (1, 256))).logits
    assert logits.shape == (1, 256, 320)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("arch", "field"), [("llama", "max_position_embeddings"), ("gpt2", "n_positions")])
def test_position_override_may_exceed_the_longest_stage(arch: str, field: str) -> None:
    fields = model_config_dict(ModelConfig(arch=arch, overrides={field: 512}), VOCAB, MAX_SEQ_LEN, EOT_ID)
    assert fields[field] == 512


@pytest.mark.parametrize(("arch", "field"), [
    ("llama", "max_position_embeddings"),
    ("gpt2", "n_positions"),
    ("gpt2", "max_position_embeddings"),  # GPT2Config's alias of n_positions
])
def test_position_override_shorter_than_the_longest_stage(arch: str, field: str) -> None:
    model = ModelConfig(arch=arch, overrides={field: 128})
    with pytest.raises(ConfigError) as err:
        build_model(model, VOCAB, MAX_SEQ_LEN, EOT_ID)
    assert err.value.field == f"model.overrides.{field}"
    assert err.value.value == 128
    assert "longest stage (256 tokens)" in str(err.value)


def test_gpt2_field_and_its_alias_together() -> None:
    model = ModelConfig(arch="gpt2", overrides={"n_positions": 512, "max_position_embeddings": 1024})
    with pytest.raises(ConfigError) as err:
        model_config_dict(model, VOCAB, MAX_SEQ_LEN, EOT_ID)
    assert err.value.field == "model.overrides.max_position_embeddings"
    assert "model.overrides.n_positions" in str(err.value)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unknown_override_key(arch: str) -> None:
    model = ModelConfig(arch=arch, overrides={"num_hidden_layer": 2})  # typo of num_hidden_layers
    with pytest.raises(ConfigError) as err:
        build_model(model, VOCAB, MAX_SEQ_LEN, EOT_ID)
    assert err.value.field == "model.overrides.num_hidden_layer"
    assert "not a field of" in str(err.value)


@pytest.mark.parametrize(("arch", "overrides", "field", "says"), [
    ("llama", {"hidden_act": "nosuch"}, "model.overrides.hidden_act", "must be one of gelu, "),
    ("gpt2", {"activation_function": "nosuch"}, "model.overrides.activation_function", "must be one of gelu, "),
    ("llama", {"rope_scaling": {"rope_type": "bogus", "factor": 2.0}}, "model.overrides.rope_scaling",
     "rope_type 'bogus' is not one of transformers' RoPE types: default, dynamic, linear, "),
    ("llama", {"rope_parameters": {"type": "bogus"}}, "model.overrides.rope_parameters", "rope_type 'bogus'"),
    ("llama", {"rope_scaling": 3}, "model.overrides.rope_scaling", "must be a mapping"),
], ids=["llama activation", "gpt2 activation", "rope_type", "rope type (old key)", "rope not a mapping"])
def test_names_transformers_looks_up_are_checked_before_building(arch: str, overrides: dict[str, Any], field: str,
                                                                 says: str) -> None:
    """An activation or RoPE type that is none of transformers' own is a ConfigError naming the override when the
    config is checked (plan, doctor), not a KeyError from inside transformers when the model is built; its
    tables' names pass."""
    with pytest.raises(ConfigError) as err:
        check_model_overrides(ModelConfig(arch=arch, overrides=overrides))
    assert err.value.field == field
    assert says in err.value.allowed
    check_model_overrides(ModelConfig(arch="llama", overrides={"hidden_act": "gelu_new", "rope_scaling": {
        "rope_type": "linear", "factor": 2.0}}))
    check_model_overrides(ModelConfig(arch="gpt2", overrides={"activation_function": "relu"}))


def test_rope_settings_transformers_refuses_are_one_error_and_stay_as_written() -> None:
    """A RoPE type without its required factor: transformers' KeyError becomes a ConfigError naming the overrides as
    the user wrote them (transformers writes into the mapping it gets)."""
    model = ModelConfig(arch="llama", overrides={"rope_scaling": {"rope_type": "linear"}})
    with pytest.raises(ConfigError, match="Missing required keys") as err:
        build_model(model, VOCAB, MAX_SEQ_LEN, EOT_ID)
    assert err.value.field == "model.overrides"
    assert model.overrides == {"rope_scaling": {"rope_type": "linear"}}


@pytest.mark.parametrize(("arch", "overrides"), [
    ("llama", {"num_hidden_layers": 1, "rope_theta": 500000.0}),
    ("gpt2", {"n_layer": 1, "hidden_size": 64}),  # hidden_size is GPT2Config's alias of n_embd
])
def test_known_override_keys_reach_the_model(arch: str, overrides: dict[str, Any]) -> None:
    model = build_model(ModelConfig(arch=arch, overrides=overrides), VOCAB, MAX_SEQ_LEN, EOT_ID)
    assert model.config.num_hidden_layers == 1
    if arch == "gpt2":
        assert model.config.n_embd == 64
    else:
        assert model.config.rope_parameters["rope_theta"] == 500000.0


# --------------------------------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize(("tokenizer_vocab", "padded"), [
    (1, 64), (64, 64), (65, 128), (300, 320), (50257, 50304),  # GPT-2: 50257 -> 786 x 64 = 50304
])
def test_vocab_padded_to_a_multiple_of_64(tokenizer_vocab: int, padded: int) -> None:
    assert padded_vocab_size(tokenizer_vocab) == padded


def test_models_get_the_padded_vocab(tiny_llama: Any, tiny_gpt2: Any) -> None:
    assert tiny_llama.model.embed_tokens.weight.shape == (320, 128)
    assert tiny_llama.lm_head.weight.shape == (320, 128)
    assert tiny_gpt2.transformer.wte.weight.shape == (320, 128)


def test_vocab_override_smaller_than_the_tokenizer() -> None:
    with pytest.raises(ConfigError) as err:
        model_config_dict(ModelConfig(overrides={"vocab_size": 256}), VOCAB, MAX_SEQ_LEN, EOT_ID)
    assert err.value.field == "model.overrides.vocab_size"


# --------------------------------------------------------------------------------------------------- parameter counts


def test_matmul_params_tied_gpt2(tiny_gpt2: Any) -> None:
    """Tied GPT-2: the token table is the output head (counted once); the position table is a lookup only."""
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    # d = 128, 4 layers, MLP 4 d = 512, vocab 320
    #   head (= wte)           320 x 128                    =  40,960
    #   per layer: ln_1        2 x 128                      =     256
    #              c_attn      128 x 384 + 384              =  49,536
    #              attn c_proj 128 x 128 + 128              =  16,512
    #              ln_2        2 x 128                      =     256
    #              c_fc        128 x 512 + 512              =  66,048
    #              mlp c_proj  512 x 128 + 128              =  65,664
    #              layer total                              = 198,272;  x 4 = 793,088
    #   ln_f                   2 x 128                      =     256
    #   N = 40,960 + 793,088 + 256                          = 834,304   (wpe, 256 x 128 = 32,768, left out)
    assert matmul_params(tiny_gpt2) == 834_304
    assert sum(p.numel() for p in tiny_gpt2.parameters()) == 834_304 + 32_768


def test_matmul_params_untied_llama(tiny_llama: Any) -> None:
    """Untied Llama: the input table is a lookup (left out), the separate output head is a matmul (counted)."""
    # d = 128, 4 layers, SwiGLU 384, no biases, vocab 320
    #   per layer: q, k, v, o  4 x 128 x 128                = 65,536
    #              gate, up, down  3 x 128 x 384            = 147,456
    #              two RMSNorms  2 x 128                    =     256
    #              layer total                              = 213,248;  x 4 = 852,992
    #   final norm             128                          =     128
    #   lm_head                320 x 128                    =  40,960
    #   N = 852,992 + 128 + 40,960                          = 894,080   (embed_tokens, 40,960, left out)
    assert matmul_params(tiny_llama) == 894_080
    assert sum(p.numel() for p in tiny_llama.parameters()) == 894_080 + 40_960


# --------------------------------------------------------------------------------------------------- FLOPs

# GPT-2 124M (d = 768, 12 layers, MLP 3072, vocab padded to 50304), tied, counted like the tiny model above:
#   head (= wte)        50,304 x 768              = 38,633,472
#   per layer: ln_1     2 x 768                   =      1,536
#              c_attn   768 x 2,304 + 2,304       =  1,771,776
#              c_proj   768 x 768 + 768           =    590,592
#              ln_2     2 x 768                   =      1,536
#              c_fc     768 x 3,072 + 3,072       =  2,362,368
#              c_proj   3,072 x 768 + 768         =  2,360,064
#              layer total                        =  7,087,872;  x 12 = 85,054,464
#   ln_f                2 x 768                   =      1,536
#   N = 38,633,472 + 85,054,464 + 1,536          = 123,689,472  (nanoGPT's "123.69M", position table left out)
GPT2_124M_N = 123_689_472


def test_flops_per_token_gpt2_124m_at_64_and_1024() -> None:
    # 6 N = 6 x 123,689,472 = 742,136,832
    # T = 64:   12 L d T = 12 x 12 x 768 x 64   =   7,077,888  -> 749,214,720
    # T = 1024: 12 L d T = 12 x 12 x 768 x 1024 = 113,246,208  -> 855,383,040
    at_64 = flops_per_token(GPT2_124M_N, n_layer=12, d_model=768, seq_len=64)
    at_1024 = flops_per_token(GPT2_124M_N, n_layer=12, d_model=768, seq_len=1024)
    assert at_64 == 749_214_720
    assert at_1024 == 855_383_040
    # the parameter term does not depend on T; the attention term grows 16x from 64 to 1024 tokens
    attention_64, attention_1024 = at_64 - 6 * GPT2_124M_N, at_1024 - 6 * GPT2_124M_N
    assert attention_1024 == 16 * attention_64
    assert at_1024 / at_64 == pytest.approx(1.1417, abs=1e-4)  # ~14% more FLOPs per token at 1024


def test_flops_per_token_of_the_tiny_model(tiny_gpt2: Any) -> None:
    """From the model in hand: 6 x 834,304 + 12 x 4 x 128 x 256 = 5,005,824 + 1,572,864 = 6,578,688."""
    config = tiny_gpt2.config
    flops = flops_per_token(matmul_params(tiny_gpt2), config.num_hidden_layers, config.hidden_size, 256)
    assert flops == 6_578_688
