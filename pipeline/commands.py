"""What every command shares: the config arguments, loading the config they name, and bad input as one line.

``--config`` names a recipe or a YAML file; ``--overlay`` files, ``CPT_*`` environment variables and ``--set``
overrides apply in that order (``curriculum.loading``); ``--max-steps N`` is ``--set run.max_steps=N`` after the
others (``config_sets``). Every command that reads a run config loads it through ``load_config_from_args``, so
``plan``, ``doctor``, ``train`` and the rest read the same config from the same command line. A ``ConfigError``
anywhere becomes ``error: <field> = <value>: <what is allowed>`` on stderr and exit status 2
(``run_reporting_errors``), followed by ``(set by CPT_...)`` when an environment variable set that value;
argparse's own errors (a missing argument, a value of the wrong type, ``nan`` for a number: ``finite_float``) take
the same one-line form (``OneLineParser``). An output path is checked before any work starts
(``output_directory``, ``output_file``): a command never runs to its end to fail on where its results go. A
package that is not installed is one line too, exit status 4 (``report_not_installed``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from curriculum.config import Config
from curriculum.errors import ConfigError

BAD_INPUT = 2
NOT_INSTALLED = 4  # (3 is a lost peer's: pipeline.peers)
OWN_PACKAGES = ("pipeline", "curriculum", "ds_configs")


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config``, ``--overlay`` and ``--set``."""
    parser.add_argument("--config", required=required,
                        help="recipe name (e.g. tiny-cpu, gpt2-124m-curriculum) or path to a YAML file")
    parser.add_argument("--overlay", action="append", default=[], metavar="FILE", dest="overlays",
                        help="a partial YAML config merged into the recipe (repeatable), e.g. the LR caps that "
                             "lr-find writes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override a config field, e.g. --set curriculum.stages.0.lr=1e-3 (repeatable); "
                             "environment variables CPT_SECTION__FIELD=VALUE work the same way")
    parser.add_argument("--max-steps", metavar="N", default=None,
                        help="cut the plan at step N for a smoke test: steps 0 .. N-1 as the full plan has them, "
                             "later stages dropped (same as --set run.max_steps=N)")


def config_sets(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, with ``--max-steps`` as the last of them."""
    return [*args.sets, *([f"run.max_steps={args.max_steps}"] if args.max_steps is not None else [])]


def load_config_from_args(args: argparse.Namespace) -> Config:
    """The config named by ``--config``, with ``--overlay`` files, ``CPT_*`` variables and ``--set`` applied, and its
    ``model.overrides`` checked (no command starts work on a model that cannot be built)."""
    from curriculum.loading import load_config
    from pipeline.model import check_model_overrides

    config = load_config(args.config, config_sets(args), overlays=args.overlays)
    check_model_overrides(config.model)
    return config


def add_world_size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=str, default="1", help="data-parallel ranks (default 1)")


def finite_float(text: str) -> float:
    """argparse ``type`` of a float option: ``nan`` and ``inf`` are not values any option takes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def world_size_argument(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ConfigError("--world-size", value, "must be a positive integer")
    return int(value)


def output_directory(flag: str, value: "str | Path") -> Path:
    """An output directory argument, checked before any work starts (the command creates it, with its missing
    parents, when it writes): a directory, or a path one can be made at."""
    path = Path(value)
    _check_writable(flag, path, path, "a directory")
    return path


def output_file(flag: str, value: "str | Path") -> Path:
    """An output file argument, checked before any work starts: not a directory, and in a directory that exists or
    can be made."""
    path = Path(value)
    if path.is_dir():
        raise ConfigError(flag, str(path), "is a directory; give a file path")
    _check_writable(flag, path, path.parent, "a file path in a directory")
    return path


def _check_writable(flag: str, path: Path, directory: Path, wanted: str) -> None:
    """Raise ``ConfigError`` (``flag`` = ``path``: what is wrong; give ``wanted``) unless ``directory`` can be written
    into once made: its nearest existing ancestor (itself, if it exists) is a directory this process may write into.
    """
    if path.is_file() and not os.access(path, os.W_OK):
        raise ConfigError(flag, str(path), f"is a file that cannot be written; give {wanted} you can write to")
    ancestor = next(p for p in (directory, *directory.parents) if p.exists())  # "." or "/" at the latest
    named = "" if ancestor == path else f"{ancestor} "
    if not ancestor.is_dir():
        raise ConfigError(flag, str(path), f"{named}is a file; give {wanted}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(flag, str(path), f"{named}is not writable; give {wanted} you can write to")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in the project's form: one ``error:`` line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(BAD_INPUT)


def run_reporting_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; bad input becomes one line on stderr and exit status 2, a package that is not installed one
    line and exit status 4 (``report_not_installed``)."""
    try:
        return run(args)
    except ModuleNotFoundError as err:
        return report_not_installed(err)
    except ConfigError as err:
        from curriculum.loading import env_variables_behind

        variables = env_variables_behind(err, os.environ, config_sets(args) if hasattr(args, "sets") else ())
        print(f"error: {err}" + (f" (set by {', '.join(variables)})" if variables else ""), file=sys.stderr)
        return BAD_INPUT


def not_installed(err: ImportError) -> bool:
    """Whether ``err`` says a package is not installed: a ``ModuleNotFoundError`` whose top-level package Python
    cannot find. A module missing inside an installed package (``torch.distributed.foo``, or one of this project's)
    is a bug in the import, not an installation to fix."""
    if not isinstance(err, ModuleNotFoundError) or not err.name:
        return False
    import importlib.util

    try:
        return importlib.util.find_spec(err.name.split(".")[0]) is None
    except ValueError:  # in sys.modules without a spec: present
        return False


def report_not_installed(err: ModuleNotFoundError) -> int:
    """A package that is not installed as one line on stderr and exit status 4; any other import error raises."""
    if not not_installed(err):
        raise err
    print(f"error: {str(err.name).split('.')[0]} is not installed ({err}): install the project's requirements "
          f"(README, Quick start), and an optional feature's extra (setup.py)", file=sys.stderr)
    return NOT_INSTALLED
