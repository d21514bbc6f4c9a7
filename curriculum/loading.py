"""Read a run config: a recipe name or YAML path, overlays, then environment overrides, then ``--set`` overrides.

Precedence, lowest first: the YAML file, ``--overlay`` files, ``CPT_*`` environment variables, ``--set`` arguments.

Overlays are partial YAML configs merged into the recipe: mappings merge key by key, and a list of mappings merges
element by element (``curriculum: {stages: [{lr_max: 1e-3}, {lr_max: 5e-4}]}`` caps the first two stages);
any other value replaces. ``lr-find`` writes such a file.

Environment variables: ``CPT_`` + the field path in capitals with ``__`` between levels, for example
``CPT_CURRICULUM__BASE_LR=1e-3`` or ``CPT_CURRICULUM__STAGES__0__GLOBAL_BATCH=64`` (the same idea as
``LEARNING_RATE=1e-5 python train.py``, under one prefix so nothing else in the environment is taken for config).
Every ``CPT_*`` variable is read: one that names no config section is an error naming the variable, and an error
about a value a variable set names the variable too (``env_variables_behind``).

``--set``: ``curriculum.stages.0.lr=1e-3``; numbers in a path index lists. Values are read as YAML
(``1e-3`` is a float, ``auto`` a string, ``[1, 2]`` a list). Files and values alike are read with two departures
from YAML 1.1: only ``true`` and ``false`` are booleans (``on``, ``yes``, ``no`` are strings, so
``CPT_CURRICULUM__BASE_LR=on`` is not a base LR of 1), and a key given twice in one mapping is an error (YAML 1.1
lets the last one win).
"""

from __future__ import annotations

import copy
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml
from pydantic import BaseModel, ValidationError

from curriculum.config import Config
from curriculum.errors import ConfigError

ENV_PREFIX = "CPT_"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with three fixes: ``1e-3`` is the float it means (YAML 1.1 reads a string), only ``true`` and
    ``false`` are booleans (YAML 1.1 also reads ``on``, ``yes``, ``n``...), and a mapping may not give a key twice
    (YAML 1.1 keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a key that is a list or a mapping: SafeLoader rejects it itself
            key = self.construct_object(key_node)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first given on line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*)?\.\d+$|^[-+]?\d[\d_]*\.$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("curriculum.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped recipe by name (``gpt2-124m-curriculum``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipe = resources.files("curriculum.recipes") / f"{name_or_path}.yaml"
    if recipe.is_file():
        return Path(str(recipe))
    raise ConfigError("--config", name_or_path,
                      f"no such file, and no recipe of that name (recipes: {', '.join(recipe_names())})")


def load_config(name_or_path: str, sets: Iterable[str] = (), environ: Optional[Mapping[str, str]] = None,
                overlays: Iterable[str] = ()) -> Config:
    """Read, override and validate a config; every problem is a ``ConfigError``."""
    raw = _read_yaml_mapping(resolve_config_path(name_or_path), "--config")
    for overlay in overlays:
        raw = merge_overlay(raw, _read_yaml_mapping(Path(overlay), "--overlay"), overlay)
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    raw = apply_set_overrides(raw, sets)
    return validate_config(raw)


def _read_yaml_mapping(path: Path, flag: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(flag, str(path), f"cannot read it as UTF-8 text: {err}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(str(path), where, f"not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), type(raw).__name__, "a recipe must be a YAML mapping of sections")
    return raw


def merge_overlay(base: Any, overlay: Any, source: str, path: str = "") -> Any:
    """``overlay`` merged into a copy of ``base`` (see the module docstring)."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = merge_overlay(base.get(key), value, source, f"{path}.{key}" if path else str(key))
        return merged
    if isinstance(base, list) and isinstance(overlay, list) and all(isinstance(v, dict) for v in overlay):
        if len(overlay) > len(base):
            raise ConfigError(f"--overlay {source}: {path}", f"{len(overlay)} entries",
                              f"the config has only {len(base)}; an overlay list merges entry by entry")
        return [merge_overlay(b, o, source, f"{path}.{i}") for i, (b, o) in enumerate(zip(base, overlay))] \
            + copy.deepcopy(base[len(overlay):])
    return copy.deepcopy(overlay)


def validate_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise _to_config_error(err) from None


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    overrides = _env_overrides(environ)
    for variable, dotted, text in overrides:
        keys = dotted.split(".")
        if "" in keys:
            raise ConfigError(variable, text, f"has an empty level ({dotted}): one __ between levels")
        if keys[0] not in Config.model_fields:
            raise ConfigError(variable, text, f"not a config field ({dotted}); allowed sections: "
                                              f"{', '.join(Config.model_fields)}")
    return _apply(raw, overrides)


def apply_set_overrides(raw: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    overrides = []
    for item in sets:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError("--set", item, "expected KEY.PATH=VALUE, e.g. curriculum.stages.0.lr=1e-3")
        overrides.append(("--set", path.strip(), value))
    return _apply(raw, overrides)


def env_variables_behind(err: ConfigError, environ: Mapping[str, str], sets: Iterable[str] = ()) -> list[str]:
    """The ``CPT_*`` variables an error is about: each set the error's field, a section holding it, or a key inside
    it that the message names (``give until_step or until_tokens, not both``), and no ``--set`` replaced it."""
    replaced = [item.partition("=")[0].strip() for item in sets]
    found = []
    for variable, dotted, _ in _env_overrides(environ):
        if any(_within(dotted, path) for path in replaced):
            continue
        if _within(err.field, dotted):
            found.append(variable)
        elif _within(dotted, err.field):
            named = dotted.split(".")[len(err.field.split("."))]
            if re.search(rf"\b{re.escape(named)}\b", err.allowed):
                found.append(variable)
    return found


def _within(dotted: str, section: str) -> bool:
    """Whether the field path ``dotted`` is ``section`` or lies inside it."""
    return dotted == section or dotted.startswith(section + ".")


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """``(variable, field path, value)`` of each ``CPT_*`` variable, in name order."""
    return [(key, ".".join(part.lower() for part in key[len(ENV_PREFIX):].split("__")), environ[key])
            for key in sorted(environ) if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX)]


def _apply(raw: dict[str, Any], overrides: list[tuple[str, str, str]]) -> dict[str, Any]:
    if not overrides:
        return raw
    raw = copy.deepcopy(raw)
    for source, dotted, text in overrides:
        try:
            value = parse_yaml_value(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} {dotted}", text,
                              f"not a valid YAML value: {getattr(err, 'problem', None) or err}") from None
        keys = dotted.split(".")
        node: Any = raw
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            here = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"{source} {dotted}", text,
                                      f"{here}: list index must be 0 .. {len(node) - 1}")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, {})
            else:
                raise ConfigError(f"{source} {dotted}", text,
                                  f"{'.'.join(keys[:depth])} is a value, not a section")
    return raw


def _to_config_error(err: ValidationError) -> ConfigError:
    errors = err.errors()
    first = errors[0]
    loc = _field_loc(first["loc"])
    field = ".".join(loc) or "config"
    # A field with a union type (``lr: 1e-3`` or ``auto``) fails once per member: one problem, several messages.
    same_field = [e for e in errors if _field_loc(e["loc"]) == loc]
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        message = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
    else:
        message = ", or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same_field))
    more = len({tuple(_field_loc(e["loc"])) for e in errors}) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''} after this one)"
    value = first.get("input") if first["type"] != "missing" else None
    return ConfigError(field, value, message)


def _field_loc(loc: tuple[Any, ...]) -> list[str]:
    """A pydantic error location as config keys: field names and list indices, without the tags pydantic adds
    for union members (``lr.constrained-float``, ``lr.literal['auto']``) and validators (``function-after``)."""
    keys: list[str] = []
    model: Optional[type[BaseModel]] = Config
    for part in loc:
        if isinstance(part, int):
            keys.append(str(part))
            continue
        if str(part).startswith("function-after"):
            continue
        if model is None:
            continue  # inside a field that is not a section: a union member's tag
        keys.append(str(part))
        model = field_section(model, str(part))
    return keys


def _allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the config section at ``loc`` (list indices skipped)."""
    section = section_at(Config, loc)
    return list(section.model_fields) if section is not None else []


def field_section(model: Optional[type[BaseModel]], key: Any) -> Optional[type[BaseModel]]:
    """The section (pydantic model) that the field ``key`` (its name or its alias) of ``model`` holds, or None where
    ``model`` has no such field or the field is a value."""
    fields = model.model_fields if model is not None else {}
    field = next((f for name, f in fields.items() if key in (name, f.alias)), None)
    return model_in(field.annotation) if field is not None else None


def section_at(model: Optional[type[BaseModel]], keys: Iterable[Any]) -> Optional[type[BaseModel]]:
    """The section that ``keys`` (field names or aliases; list indices, ints or digit strings, skipped) lead to
    from ``model``, or None where one of them is not a section."""
    for key in keys:
        if not (isinstance(key, int) or str(key).isdigit()):
            model = field_section(model, key)
    return model


def model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model a field's annotation holds (``Section``, ``Optional[Section]``, ``list[Section]``), or
    None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found is not None:
            return found
    return None
