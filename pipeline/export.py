"""``curriculum-pretrain export RUN_DIR --output DIR``: a checkpoint of a run as a ``save_pretrained`` directory
with its tokenizer, read without DeepSpeed's engine.

    curriculum-pretrain export runs/tiny-cpu --output tiny-best --checkpoint best

What it reads, all through the run directory: ``config.json`` (the run config: the model section and the longest
stage), ``tokenizer.json`` (the data directory's, copied there when training starts; for a run directory without
one, the data directory the config names, which must then still exist) and the checkpoint's weights. ZeRO stages
0-2 keep the whole module in ``mp_rank_00_model_states.pt``; a ZeRO-3 checkpoint is gathered from its partitions by
DeepSpeed's ``zero_to_fp32``. The model is built from the config on the CPU and loads the weights strictly.

What it writes: ``config.json``, ``generation_config.json`` and ``model.safetensors`` in fp32 (the bf16 weights of a
``run.precision: bf16`` run are widened, exactly), ``tokenizer.json`` and ``tokenizer_config.json`` with
``model_max_length`` the longest stage and ``<|endoftext|>`` as BOS, EOS and unknown token. Both load in transformers
4.46+ and 5.x: transformers 5 names its tokenizer class ``TokenizersBackend`` and keeps ``rope_theta`` only inside
``rope_parameters``, neither of which 4.x reads (it fails on the class and would run RoPE with its default theta), so
the files name ``PreTrainedTokenizerFast`` and repeat ``rope_theta`` (and any ``rope_scaling``) at the top level.

``train`` writes ``<run dir>/final`` at the end of a run through ``export_checkpoint`` too, from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from curriculum.config import Config
from curriculum.errors import ConfigError
from pipeline.rundir import RunDir

HELP = "write a run's checkpoint as a transformers save_pretrained directory with its tokenizer"

MODULE_PREFIX = "lm."
"""The transformers model's parameters inside the module the engine trains (``CausalLMWithLoss.lm``)."""
MODEL_STATES = "mp_rank_00_model_states.pt"
"""ZeRO 0-2: the whole module's state dict (rank 0 writes it)."""
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
"""ZeRO 3: rank 0's part; the parameters are partitioned over the optimizer files of all ranks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train")
    parser.add_argument("--checkpoint", default="latest",
                        help="latest (default), best, a step (120) or tag (step00000120) of the run's checkpoints, "
                             "or a checkpoint directory")
    parser.add_argument("--output", required=True, help="a new or empty directory")


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.commands import output_directory
    from pipeline.environment import choose_accelerator

    choose_accelerator(os.environ, torch.cuda.is_available())
    run_dir = RunDir(args.run_dir)
    if not run_dir.config.is_file():
        raise ConfigError("RUN_DIR", args.run_dir, "has no config.json: give a run directory written by train")
    checkpoint = resolve_checkpoint(run_dir, args.checkpoint)
    output = output_directory("--output", args.output)
    if output.is_dir() and any(output.iterdir()):
        raise ConfigError("--output", args.output, "is not empty; give a new or empty directory")
    max_seq_len = export_checkpoint(run_dir, checkpoint, output)
    print(f"exported {checkpoint} to {output}: fp32 weights, tokenizer with model_max_length {max_seq_len}")
    return 0


def resolve_checkpoint(run_dir: RunDir, arg: str) -> Path:
    """``latest`` or ``best`` (the checkpoint the pointer names), a step number or a tag in the run's
    ``checkpoints/``, or a checkpoint directory; one with a damaged file is an error before the model is built."""
    from pipeline.checkpoint import BEST, LATEST, complete_checkpoints, damaged_file, pointed, tag_for

    directory = run_dir.checkpoints
    pointer = directory / arg
    if arg in (LATEST, BEST) and pointer.is_file():
        path = pointed(directory, arg)
    elif arg.isascii() and arg.isdigit():
        path = directory / tag_for(int(arg))
    else:  # a tag (or the full copy older runs saved as best), or a directory anywhere
        path = pointer if pointer.is_dir() else Path(arg)
    if path is not None and path.is_dir():
        damage = damaged_file(path)
        if damage is not None:
            raise ConfigError("--checkpoint", str(path), f"{damage}; export another checkpoint")
        return path
    available = [p.name for p in complete_checkpoints(directory)]
    if not available:
        raise ConfigError("RUN_DIR", str(run_dir), "has no checkpoint (train saves one every run.checkpoint_every "
                                                   "steps and at the end)")
    problem = (f"{pointer} names {pointer.read_text().strip()}, which is not there" if path is None
               else "no such checkpoint")
    raise ConfigError("--checkpoint", arg, f"{problem}; give latest, best, a step or tag of the run's checkpoints "
                                           f"({', '.join(available)}) or a checkpoint directory")


def export_checkpoint(run_dir: RunDir, checkpoint: Path, output: Path) -> int:
    """The model of ``run_dir``'s config with ``checkpoint``'s weights, and the run's tokenizer, written to
    ``output`` (replaced whole once everything is written); returns the tokenizer's ``model_max_length``, the
    longest stage. Everything is read and checked before anything is written."""
    from tokenizers import Tokenizer

    from curriculum.schedule import build_schedule
    from pipeline.data import EOT_TOKEN, id_bound
    from pipeline.model import build_model

    config = run_config(run_dir)
    tokenizer_file = _tokenizer_file(run_dir, config)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ConfigError("RUN_DIR", str(run_dir), f"{tokenizer_file} is not a tokenizers JSON file ({err})") from None
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    if eot_id is None:
        raise ConfigError("RUN_DIR", str(run_dir), f"{tokenizer_file} has no {EOT_TOKEN} token")
    max_seq_len = build_schedule(config).max_seq_len
    model = build_model(config.model, id_bound(tokenizer), max_seq_len, eot_id)
    _load_strictly(model, read_weights(checkpoint), checkpoint, run_dir)
    write_pretrained(model, tokenizer_file, max_seq_len, output)
    return max_seq_len


def run_config(run_dir: RunDir) -> Config:
    """The config a run directory's run was started with (its config.json), validated."""
    from curriculum.loading import validate_config

    try:
        raw = json.loads(run_dir.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError("RUN_DIR", str(run_dir), f"config.json is not readable JSON ({err})") from None
    return validate_config(raw)


def _tokenizer_file(run_dir: RunDir, config: Config) -> Path:
    """The run directory's copy of the data's ``tokenizer.json``; for a run directory without one, the data
    directory's, checked against its manifest."""
    from pipeline.data import TOKENIZER_FILE, check_tokenizer, read_manifest

    if run_dir.tokenizer.is_file():
        return run_dir.tokenizer
    if not Path(config.data.dir).is_dir():
        raise ConfigError("data.dir", config.data.dir, f"does not exist, and {run_dir} has no tokenizer.json: the "
                                                       "exported tokenizer comes from one of them; restore the data "
                                                       "directory or copy its tokenizer.json into the run directory")
    check_tokenizer(config.data.dir, read_manifest(config.data.dir))
    return Path(config.data.dir) / TOKENIZER_FILE


def read_weights(checkpoint: Path) -> dict[str, Any]:
    """The transformers model's weights in a checkpoint of the engine's module, on the CPU."""
    import torch

    if (checkpoint / MODEL_STATES).is_file():
        # mmap: only the module's tensors are read, not the optimizer state a ZeRO-0 file also holds
        module = torch.load(checkpoint / MODEL_STATES, map_location="cpu", mmap=True, weights_only=True)["module"]
    elif (checkpoint / ZERO3_MODEL_STATES).is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        raise ConfigError("--checkpoint", str(checkpoint), f"not a DeepSpeed checkpoint: it has neither {MODEL_STATES} "
                                                           f"(ZeRO 0-2) nor {ZERO3_MODEL_STATES} (ZeRO 3)")
    foreign = next((key for key in module if not key.startswith(MODULE_PREFIX)), None)
    if foreign is not None:
        raise ConfigError("--checkpoint", str(checkpoint), f"holds {foreign}: not a checkpoint of this pipeline's "
                                                           f"module (its weights start with {MODULE_PREFIX})")
    return {key.removeprefix(MODULE_PREFIX): tensor for key, tensor in module.items()}


def _load_strictly(model: Any, weights: dict[str, Any], checkpoint: Path, run_dir: RunDir) -> None:
    """Every tensor of the model from ``weights``, of the same shape, and nothing else (cast to the model's fp32)."""
    expected = model.state_dict()
    problems = ([f"{key} is missing" for key in expected if key not in weights]
                + [f"{key} is not in the model" for key in weights if key not in expected]
                + [f"{key} is {tuple(weights[key].shape)}, the model's {tuple(tensor.shape)}"
                   for key, tensor in expected.items() if key in weights and weights[key].shape != tensor.shape])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError("--checkpoint", str(checkpoint), f"does not fit the model of {run_dir.config}: "
                                                           f"{problems[0]}{more}")
    model.load_state_dict(weights, strict=True)


def write_pretrained(model: Any, tokenizer_file: Path, max_seq_len: int, output: Path) -> None:
    """``save_pretrained`` of the (fp32) model and of its tokenizer, readable by transformers 4.46+ and 5.x,
    written into ``<output>.partial`` and then moved to ``output``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as transformers_logging

    from pipeline.checkpoint import move_into_place
    from pipeline.data import EOT_TOKEN

    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its "Writing model shards" bar is noise in a run's log
    try:
        model.save_pretrained(partial)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOT_TOKEN, bos_token=EOT_TOKEN,
                                        unk_token=EOT_TOKEN, model_max_length=max_seq_len)
    tokenizer.save_pretrained(partial)
    _readable_by_transformers_4(partial)
    move_into_place(partial, output)


def _readable_by_transformers_4(directory: Path) -> None:
    """What transformers 5 writes and 4.x cannot read, rewritten as both read it: the tokenizer class (5.x's
    ``TokenizersBackend``, with a ``backend`` key, is 4.x's ``PreTrainedTokenizerFast``), and RoPE settings that 5.x
    keeps only in ``rope_parameters`` (4.x reads ``rope_theta`` and ``rope_scaling``; 5.x prefers
    ``rope_parameters`` when both are there)."""
    tokenizer_config = directory / "tokenizer_config.json"
    fields = json.loads(tokenizer_config.read_text())
    fields.pop("backend", None)
    fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")

    model_config = directory / "config.json"
    fields = json.loads(model_config.read_text())
    rope = fields.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            fields["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
        model_config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
