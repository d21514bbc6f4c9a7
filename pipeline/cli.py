"""``curriculum-pretrain``: one console script, one subcommand per job.

    plan          the resolved curriculum: one row per stage, totals (``--json``, ``--per-step``)
    recipes       the shipped recipes, one line each
    ds-config     the DeepSpeed JSON the engine will get
    prepare-data  tokenize local files (or the Python standard library) into packed token files
    train         a curriculum pretraining run on the DeepSpeed engine
    doctor        sanity checks of a config before launch
    diagnose      spikes, plateaus, gradient-norm trends and slowdowns in a run's metrics
    lr-find       LR range test at each stage's sequence length
    sweep         one run per LR, then the comparison
    bench         throughput per stage shape through the pipeline, against a hand-written compiled loop
    compare       held-out loss, and tokens and seconds to a target loss, of several runs against the first
    export        a run's checkpoint (latest, best or a step) as a transformers save_pretrained directory

Each command module owns its arguments (``add_arguments``) and its ``run``; ``plan``, ``recipes`` and ``ds-config``,
which need no more than the config, live here. Command modules import torch only inside ``run``, so ``plan`` and
``recipes`` do not import it (unless ``model.overrides`` names an activation or a RoPE type: transformers' tables of
them do). ``--version`` prints the version ``setup.py`` gives (``package_version``).
Bad input of any kind exits with status 2 and one line naming the field, the value and what is allowed
(``pipeline.commands``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from curriculum.errors import ConfigError
from pipeline.commands import (OneLineParser, add_config_arguments, add_world_size_argument, load_config_from_args,
                               report_not_installed, run_reporting_errors, world_size_argument)

DISTRIBUTION = "curriculum-pretrain"
MAX_PER_STEP = 1_000_000
"""Most steps ``plan --json --per-step`` lists (a million JSON rows are 140 MB)."""


def package_version() -> str:
    """The version ``setup.py`` gives, the one place it is written. Run from a checkout (``setup.py`` beside the
    packages), it is read from that file: an editable install's metadata is as old as its last ``pip install``, and
    may be another checkout's. Otherwise it comes from the installed distribution's metadata."""
    setup_py = Path(__file__).resolve().parents[1] / "setup.py"
    if setup_py.is_file():
        arguments = setup_arguments(setup_py)
        if arguments.get("name") == DISTRIBUTION and isinstance(arguments.get("version"), str):
            return arguments["version"]
    return importlib.metadata.version(DISTRIBUTION)


def setup_arguments(setup_py: Path) -> dict[str, Any]:
    """The literal keyword arguments of the ``setup(...)`` call in ``setup_py``: name, version, install_requires..."""
    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setup":
            arguments = {}
            for keyword in node.keywords:
                try:
                    arguments[keyword.arg] = ast.literal_eval(keyword.value)
                except ValueError:
                    continue  # computed, e.g. long_description=open(...).read()
            return arguments
    return {}


class _PrintVersion(argparse.Action):
    """``--version``, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"{DISTRIBUTION} {package_version()}")
        parser.exit()


def _add_plan(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_world_size_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--per-step", action="store_true",
                        help=f"with --json: add every step's values (runs of at most {MAX_PER_STEP:,} steps)")


def _run_plan(args: argparse.Namespace) -> int:
    from curriculum.plan import format_plan_table, plan_dict
    from curriculum.schedule import build_schedule

    if args.per_step and not args.json:
        raise ConfigError("--per-step", True, "only with --json")
    config = load_config_from_args(args)
    schedule = build_schedule(config, world_size_argument(args.world_size))
    if args.per_step and schedule.total_steps > MAX_PER_STEP:
        raise ConfigError("--per-step", True, f"lists every step, at most {MAX_PER_STEP:,}; this run has "
                                              f"{schedule.total_steps:,} (the stages in --json give the same values)")
    if args.json:
        print(json.dumps(plan_dict(schedule, per_step=args.per_step), indent=2))
    else:
        print(format_plan_table(schedule, title=f"{config.name}: {config.model.arch} {config.model.preset}",
                                dynamic_shapes=config.kernels.dynamic_shapes is not False))
    return 0


def _add_recipes(parser: argparse.ArgumentParser) -> None:
    """No arguments: the recipes as shipped (``CPT_*`` variables do not apply)."""


def _run_recipes(args: argparse.Namespace) -> int:
    from curriculum.loading import load_config, recipe_names
    from curriculum.plan import format_recipe_list
    from curriculum.schedule import build_schedule

    recipes = []
    for name in recipe_names():
        config = load_config(name, environ={})
        recipes.append((name, config, build_schedule(config)))
    print(format_recipe_list(recipes))
    return 0


def _add_ds_config(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_world_size_argument(parser)
    parser.add_argument("--bf16", action="store_true",
                        help="as on a bf16-capable GPU (default: as on CPU); decides only run.precision: auto")


def _run_ds_config(args: argparse.Namespace) -> int:
    from curriculum.schedule import build_schedule
    from pipeline.ds_config import deepspeed_import_error, derive_ds_config, resolve_precision

    config = load_config_from_args(args)
    schedule = build_schedule(config, world_size_argument(args.world_size))
    # run.precision owns precision; --bf16 only says what "auto" finds (as on a bf16-capable GPU, or on a CPU)
    precision = resolve_precision(config.run.precision, bf16_gpu=args.bf16)
    print(json.dumps(derive_ds_config(config, schedule, precision), indent=2))
    unchecked = deepspeed_import_error()
    if unchecked is not None:
        print(f"warning: DeepSpeed cannot be imported here ({unchecked}): what its own config classes refuse in this "
              f"JSON was not checked", file=sys.stderr)
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _module(name: str) -> Command:
    """A command whose module owns ``HELP``, ``add_arguments`` and ``run``."""
    module = importlib.import_module(name)
    return module.HELP, module.add_arguments, module.run


def commands() -> dict[str, Command]:
    return {
        "plan": ("show what a curriculum will do, stage by stage", _add_plan, _run_plan),
        "recipes": ("list the shipped recipes: model, stages, seq_len range, steps and tokens", _add_recipes,
                    _run_recipes),
        "ds-config": ("print the DeepSpeed JSON derived from a config", _add_ds_config, _run_ds_config),
        "prepare-data": _module("pipeline.data"),
        "train": _module("pipeline.train"),
        "doctor": _module("pipeline.doctor"),
        "diagnose": _module("pipeline.diagnose"),
        "lr-find": _module("pipeline.lr_find"),
        "sweep": _module("pipeline.sweep"),
        "bench": _module("pipeline.bench"),
        "compare": _module("pipeline.compare"),
        "export": _module("pipeline.export"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=DISTRIBUTION, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action=_PrintVersion, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, (help_text, add_arguments, run) in commands().items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command_parser)
        command_parser.set_defaults(run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `plan | head` ends quietly
    try:
        parser = build_parser()  # imports every command module
    except ModuleNotFoundError as err:
        return report_not_installed(err)
    args = parser.parse_args(argv)
    return run_reporting_errors(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
