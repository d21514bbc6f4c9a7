"""The DeepSpeed JSON the engine gets, derived from the run config in this one place.

A template from ``ds_configs/`` (or a JSON path) supplies ZeRO and communication settings; the run config owns
batch sizes, gradient clipping, precision and the optimizer, so those keys may not come from the template or its
overrides. Batch and clip are set for the first stage here and changed by the training loop at stage boundaries.
What DeepSpeed would reject only when the engine starts is an error here: a template that is not a UTF-8 JSON
object (or gives a key twice, or ``NaN``), a section that is not a mapping, an unknown offload device, a ZeRO stage
other than 0-3, a non-finite number in the overrides; then whatever DeepSpeed's own config classes refuse in the
result (a misspelt key at any depth, a value of the wrong type), found by running them on it without a GPU or a
process group (``deepspeed_refusal``, which ``doctor --ds-config`` runs on a DeepSpeed JSON too). DeepSpeed's
throughput timer, which synchronises the device at every micro-batch, is off unless the template or the overrides
set it up (``timers.throughput``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.schedule import Schedule

OWNED_KEYS = {
    "train_batch_size": "curriculum stages (global_batch)",
    "train_micro_batch_size_per_gpu": "curriculum stages (micro_batch)",
    "gradient_accumulation_steps": "curriculum stages (global_batch / micro_batch / world size)",
    "gradient_clipping": "curriculum stages (grad_clip)",
    "bf16": "run.precision",
    "bfloat16": "run.precision (bfloat16 is DeepSpeed's old name for bf16)",
    "fp16": "run.precision (bf16, bf16-autocast or fp32)",
    "torch_autocast": "run.precision (bf16-autocast)",
    "optimizer": "the optimizer section (the training loop builds the optimizer)",
    "scheduler": "the curriculum (the training loop writes the LR every step)",
    "curriculum_learning": "the curriculum section (DeepSpeed's legacy curriculum is removed)",
    "data_efficiency": "the curriculum section",
}


SECTIONS: dict[str, str] = {
    "zero_optimization": "{stage: 1}",
    "zero_optimization.offload_optimizer": "{device: cpu}",
    "zero_optimization.offload_param": "{device: cpu}",
    "activation_checkpointing": "{partition_activations: true}",
    "flops_profiler": "{enabled: true}",
    "comms_logger": "{enabled: true}",
    "tensorboard": "{enabled: true}",
    "wandb": "{enabled: true}",
    "csv_monitor": "{enabled: true}",
    "aio": "{block_size: 1048576}",
    "timers": "{throughput: {enabled: false}}",
    "timers.throughput": "{enabled: false}",
}
"""DeepSpeed settings that must be mappings (DeepSpeed fails on anything else when the engine starts), with an
example of each for the error message."""
OFFLOAD_DEVICES = ("none", "cpu", "nvme")

Precision = Literal["fp32", "bf16", "bf16-autocast"]


def resolve_precision(setting: str, bf16_gpu: bool) -> Precision:
    """``run.precision`` for the device, decided here only: ``auto`` is ``bf16-autocast`` on a CUDA device with
    bf16 support (``bf16_gpu``) and ``fp32`` elsewhere.

    ``bf16-autocast`` is the default because its fp32 weights let DeepSpeed step the optimizer directly: gradients
    accumulate in fp32, and a step needs no host synchronisation besides the loop's own (DeepSpeed's bf16 mode
    checks every gradient for overflow with one host sync per parameter tensor)."""
    if setting == "auto":
        return "bf16-autocast" if bf16_gpu else "fp32"
    return setting  # type: ignore[return-value]


def template_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files("ds_configs").iterdir()
                  if p.name.endswith(".json"))


def load_template(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    source = path if path.is_file() else resources.files("ds_configs") / f"{name_or_path}.json"
    if not source.is_file():
        raise ConfigError("deepspeed.template", name_or_path,
                          f"no such JSON file, and no template of that name (templates: {', '.join(template_names())})")
    try:
        template = json.loads(source.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys,
                              parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("deepspeed.template", name_or_path, f"cannot read it as UTF-8 text: {err}") from None
    except ValueError as err:  # JSONDecodeError, or a duplicate key or NaN from the hooks
        raise ConfigError("deepspeed.template", name_or_path, f"not valid JSON: {err}") from None
    if not isinstance(template, dict):
        raise ConfigError("deepspeed.template", name_or_path,
                          f"must be a JSON object of DeepSpeed settings, not a {type(template).__name__}")
    return template


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that gives no key twice (``json`` alone keeps the last)."""
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"duplicate key {key!r}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    """``NaN``, ``Infinity`` and ``-Infinity``: Python's ``json`` reads them, JSON has no such values."""
    raise ValueError(f"{name} is not a JSON number")


def derive_ds_config(config: Config, schedule: Schedule, precision: Precision) -> dict[str, Any]:
    """Template + overrides + the values the run config owns, for the schedule's first stage and ``precision``
    (from ``resolve_precision``)."""
    ds = load_template(config.deepspeed.template)
    for key in ds:
        if key in OWNED_KEYS:
            raise ConfigError("deepspeed.template", config.deepspeed.template,
                              f"sets {key}, which is derived from {OWNED_KEYS[key]}; remove it from the template")
    for key, value in config.deepspeed.overrides.items():
        if key in OWNED_KEYS:
            raise ConfigError(f"deepspeed.overrides.{key}", value, f"derived from {OWNED_KEYS[key]}; set it there")
    _check_numbers(config.deepspeed.overrides, "deepspeed.overrides")
    _merge(ds, copy.deepcopy(config.deepspeed.overrides))
    # Say where a bad setting came from: the overrides, or else the template.
    template = config.deepspeed.template
    for section, example in SECTIONS.items():
        value = _get(ds, section)
        if value is not _ABSENT and not isinstance(value, dict):
            if _get(config.deepspeed.overrides, section) is not _ABSENT:
                raise ConfigError(f"deepspeed.overrides.{section}", value, f"must be a mapping, e.g. {example}")
            raise ConfigError("deepspeed.template", template, f"sets {section} = {value!r}; it must be a mapping")
    for section in ("zero_optimization.offload_optimizer", "zero_optimization.offload_param"):
        device = _get(ds, f"{section}.device")
        if device is not _ABSENT and device not in OFFLOAD_DEVICES:
            allowed = f"must be one of {', '.join(OFFLOAD_DEVICES)}"
            if _get(config.deepspeed.overrides, f"{section}.device") is not _ABSENT:
                raise ConfigError(f"deepspeed.overrides.{section}.device", device, allowed)
            raise ConfigError("deepspeed.template", template, f"sets {section}.device = {device!r}; {allowed}")
    zero_override = config.deepspeed.overrides.get("zero_optimization")
    zero = ds.get("zero_optimization", {})
    zero_stage = zero.get("stage", 0)
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        allowed = "must be 0 (off), 1 (optimizer state sharded), 2 (and gradients) or 3 (and parameters)"
        if isinstance(zero_override, dict) and "stage" in zero_override:
            raise ConfigError("deepspeed.overrides.zero_optimization.stage", zero_stage, allowed)
        raise ConfigError("deepspeed.template", template, f"sets zero_optimization.stage = {zero_stage!r}; {allowed}")
    for key in ("enabled", "synchronized"):
        value = _get(ds, f"timers.throughput.{key}")
        if value is not _ABSENT and not isinstance(value, bool):
            if _get(config.deepspeed.overrides, f"timers.throughput.{key}") is not _ABSENT:
                raise ConfigError(f"deepspeed.overrides.timers.throughput.{key}", value, "must be true or false")
            raise ConfigError("deepspeed.template", template,
                              f"sets timers.throughput.{key} = {value!r}; it must be true or false")
    if _get(ds, "timers.throughput.enabled") is _ABSENT and _get(ds, "timers.throughput.synchronized") is _ABSENT:
        # DeepSpeed's throughput timer is on by default and synchronises the device at every micro-batch's forward
        # and step (4 waits a step at 2 micro-batches): the CPU could not queue the next micro-batch while the GPU
        # runs this one. The loop times its steps itself; a template or override may still set the timer up.
        ds.setdefault("timers", {}).setdefault("throughput", {})["enabled"] = False
    first = schedule.stages[0]
    ds.update({
        # e.g. 32 micro x 1 accum x 1 rank = 32 sequences per step in the tiny recipe's first stage
        "train_batch_size": first.global_batch,
        "train_micro_batch_size_per_gpu": first.micro_batch,
        "gradient_accumulation_steps": first.grad_accum,
        "gradient_clipping": first.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
    })
    if precision == "bf16-autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    refusal = deepspeed_refusal(ds)
    if refusal is None:
        return ds
    overrides = config.deepspeed.overrides
    if refusal.key and _get(overrides, refusal.key) is not _ABSENT:
        raise ConfigError(f"deepspeed.overrides.{refusal.key}", refusal.value, refusal.allowed)
    if refusal.key:
        raise ConfigError("deepspeed.template", template, f"sets {refusal.key} = {refusal.value!r}; {refusal.allowed}")
    # settings that DeepSpeed refuses together, not one of them alone
    raise ConfigError("deepspeed.overrides" if overrides else "deepspeed.template", overrides or template,
                      refusal.allowed)


_ABSENT = object()


def _get(tree: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted path of nested mappings, or ``_ABSENT``."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _ABSENT
        node = node[key]
    return node


def _check_numbers(value: Any, path: str) -> None:
    """No ``.inf`` or ``.nan`` anywhere: the JSON the engine gets cannot hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, value, "must be a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_numbers(item, f"{path}.{key}")


# ------------------------------------------------------------------------------------- DeepSpeed's own validation

DEEPSPEED_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
DEEPSPEED_MINIMAL = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
"""The batch DeepSpeed's config classes are run with instead of the one given: the run config's batch comes from
its checked schedule, and doctor judges another tool's batch against the world size. DeepSpeed derives
``train_batch_size`` = 1 x 1 x its world size, so this fits with a process group of any size or none (world size
1)."""


@dataclass(frozen=True)
class Refusal:
    """What DeepSpeed refuses in a DeepSpeed JSON: the dotted key (``""`` for settings refused together), its value
    and what is allowed."""

    key: str
    value: Any
    allowed: str


def deepspeed_refusal(ds: dict[str, Any]) -> Optional[Refusal]:
    """The first thing DeepSpeed would refuse in ``ds`` when the engine starts, or None: a top-level key it does not
    read (``deepspeed_keys``), then a section its config classes refuse, one section at a time (a pydantic error
    names the class, not where in the JSON it sits), then the sections together (bf16 and fp16 both enabled).
    None too where DeepSpeed cannot be imported (``deepspeed_import_error``)."""
    if deepspeed_import_error() is not None:
        return None  # nothing here can judge it: doctor says so, and train, bench and lr-find stop at the import
    known = deepspeed_keys()
    for key, value in ds.items():
        if key not in known:
            return Refusal(key, value, f"unknown key; allowed: {', '.join(known)}")
    sections = [({key: value}, key) for key, value in ds.items() if key not in DEEPSPEED_BATCH_KEYS]
    with _deepspeed_config() as deepspeed_config:
        for settings, where in [*sections, (ds, "")]:
            refusal = _refusal(deepspeed_config, settings, where)
            if refusal is not None:
                return refusal
    return None


@contextlib.contextmanager
def _deepspeed_config() -> Iterator[Any]:
    """DeepSpeed's ``DeepSpeedConfig`` class, with DeepSpeed's log held back meanwhile: it writes to stdout, where
    ``ds-config`` prints its JSON, and what it says (deprecated keys) it says again when the engine starts."""
    import torch

    from pipeline.environment import choose_accelerator

    choose_accelerator(os.environ, torch.cuda.is_available())  # else DeepSpeed's first import logs its guess
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield DeepSpeedConfig
    finally:
        logger.setLevel(level)


@functools.cache
def deepspeed_import_error() -> Optional[str]:
    """Why DeepSpeed's config classes cannot be imported here, or None: torch or DeepSpeed not installed, their
    native libraries not loading, versions that do not fit together. An import of this project's own that fails is
    a bug and raises."""
    from pipeline.commands import OWN_PACKAGES

    try:
        with _deepspeed_config():
            pass
    except (ImportError, OSError) as err:
        if isinstance(err, ImportError) and str(err.name).split(".")[0] in OWN_PACKAGES:
            raise
        return f"{type(err).__name__}: {err}"
    return None


class _LookUps(dict):  # type: ignore[type-arg]
    """Settings that note every key looked up in them, also through the shallow copy ``DeepSpeedConfig`` reads."""

    def __init__(self, settings: dict[str, Any], looked_up: Optional[set[str]] = None) -> None:
        super().__init__(settings)
        self.looked_up: set[str] = set() if looked_up is None else looked_up

    def __copy__(self) -> "_LookUps":
        return _LookUps(self, self.looked_up)

    def __getitem__(self, key: str) -> Any:
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.looked_up.add(str(key))
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.looked_up.add(key)
        return super().get(key, default)

    def keys(self) -> "_LookUps":  # type: ignore[override]
        return self  # `key in settings.keys()` goes through __contains__


READ_ELSEWHERE = {"sequence_parallel_size", "data_parallel_size"}
"""Top-level keys DeepSpeed reads outside ``DeepSpeedConfig`` or only with a process group (``deepspeed.initialize``,
``DeepSpeedConfig`` once ``deepspeed.comm`` is set up), so the probe below may not see them."""


@functools.cache
def deepspeed_keys() -> tuple[str, ...]:
    """The top-level keys DeepSpeed reads, sorted. DeepSpeed keeps no list of them and ignores any other key (a
    misspelt ``zero_optimisation`` leaves ZeRO off), so they are taken from ``DeepSpeedConfig`` itself: the keys it
    looks up in a minimal config, less those it refuses for being there at all (features it has removed, such as
    ``nebula``)."""
    with _deepspeed_config() as deepspeed_config:
        from deepspeed.runtime.config import DeepSpeedConfigError

        probe = _LookUps(DEEPSPEED_MINIMAL)
        deepspeed_config(probe)
        removed = set()
        for key in probe.looked_up:
            try:
                deepspeed_config({**DEEPSPEED_MINIMAL, key: None})
            except DeepSpeedConfigError:
                removed.add(key)
            except Exception:  # None is no value for most settings; what matters is which are refused as such
                pass
    return tuple(sorted((probe.looked_up | READ_ELSEWHERE) - removed))


def _refusal(deepspeed_config: Any, settings: dict[str, Any], where: str) -> Optional[Refusal]:
    """What ``deepspeed_config`` (``DeepSpeedConfig``, from ``_deepspeed_config``) refuses in ``settings`` (with the
    batch of ``DEEPSPEED_MINIMAL``), or None; ``where``: the key to blame when the error does not say (``""``: the
    settings together)."""
    from deepspeed.runtime.config import DeepSpeedConfigError
    from pydantic import ValidationError

    checked = {key: value for key, value in settings.items() if key not in DEEPSPEED_BATCH_KEYS}
    try:
        # a deep copy: DeepSpeed writes into the sections it reads (data_efficiency)
        deepspeed_config({**copy.deepcopy(checked), **DEEPSPEED_MINIMAL})
    except ValidationError as err:
        error = err.errors()[0]
        key = _key_at(checked, error["loc"], error["input"]) or where
        if error["type"] != "extra_forbidden":
            return Refusal(key, error["input"], error["msg"].removeprefix("Value error, "))
        allowed = _allowed_keys(err.title, error["loc"][:-1])
        listed = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return Refusal(key, error["input"], "unknown key" + listed)
    except (TypeError, AssertionError, ValueError, KeyError, DeepSpeedConfigError) as err:  # what DeepSpeed's parsers
        # raise on what they are given: a TypeError for a section that is not a mapping, an AssertionError (bf16 and
        # fp16 both on), a ValueError (an unknown dtype); anything else is DeepSpeed's own failure
        return Refusal(where, checked.get(where), f"DeepSpeed refuses it: {' '.join(str(err).split())}"
                                                  if str(err) else f"DeepSpeed refuses it ({type(err).__name__})")
    return None


def _key_at(settings: dict[str, Any], loc: tuple[Any, ...], value: Any) -> str:
    """The dotted key in ``settings`` that a pydantic error's ``loc`` points at, or ``""``. ``loc`` starts at the
    class that raised it, wherever DeepSpeed nests that class (an unknown key in ``timers.throughput`` is only
    ``('enabledd',)``), so it is the key that ends with ``loc``, the one holding ``value`` where several do."""
    if not loc:
        return ""
    ends = [(path, held) for path, held in _paths(settings) if path[-len(loc):] == tuple(loc)]
    found = [path for path, held in ends if held == value] or [path for path, _ in ends]
    return ".".join(map(str, found[0])) if found else ""


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every key path in nested mappings and lists, with the value there."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key), value
        yield from _paths(value, (*prefix, key))


def _allowed_keys(class_name: str, loc: tuple[Any, ...]) -> list[str]:
    """The keys DeepSpeed's config class ``class_name`` (a pydantic error names only the class) takes at ``loc``
    inside it, deprecated ones left out; ``[]`` when that is not a class of DeepSpeed's."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    from curriculum.loading import section_at

    classes, model = [DeepSpeedConfigModel], None
    while classes and model is None:
        cls = classes.pop()
        model = cls if cls.__name__ == class_name else None
        classes += cls.__subclasses__()
    model = section_at(model, loc)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()
            if not (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("deprecated"))]


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none)."""
    return ds.get("zero_optimization", {}).get("stage", 0)


def cpu_offload(ds: dict[str, Any]) -> bool:
    """Whether the optimizer state lives on the CPU (ZeRO-Offload), which needs DeepSpeed's CPUAdam."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") == "cpu"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
