"""``curriculum-pretrain``: one console script, one subcommand per job.

    plan          the resolved curriculum: one row per stage, totals (``--json``, ``--per-step``)
    ds-config     the DeepSpeed JSON the engine will get
    prepare-data  tokenize local files (or the Python standard library) into packed token files
    train         a curriculum pretraining run on the DeepSpeed engine
    doctor        sanity checks of a config before launch
    diagnose      spikes, plateaus, gradient-norm trends and slowdowns in a run's metrics
    lr-find       LR range test at each stage's sequence length
    sweep         one run per LR, then the comparison
    bench         throughput per stage shape through the pipeline, against a plain compiled loop

Bad input of any kind exits with status 2 and one line naming the field, the value and what is allowed.
Subcommand modules are imported only when used, so ``plan`` does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from typing import Callable, Optional, Sequence

from curriculum.config import Config
from curriculum.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config``, ``--overlay`` and ``--set``, shared by every subcommand that reads a run config."""
    parser.add_argument("--config", required=required,
                        help="recipe name (e.g. tiny-cpu, gpt2-124m-curriculum) or path to a YAML file")
    parser.add_argument("--overlay", action="append", default=[], metavar="FILE", dest="overlays",
                        help="a partial YAML config merged into the recipe (repeatable), e.g. the LR caps that "
                             "lr-find writes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override a config field, e.g. --set curriculum.stages.0.lr=1e-3 (repeatable); "
                             "environment variables CPT_SECTION__FIELD=VALUE work the same way")


def load_config_from_args(args: argparse.Namespace) -> Config:
    """The config named by ``--config``, with ``--overlay`` files, ``CPT_*`` variables and ``--set`` applied."""
    from curriculum.loading import load_config

    return load_config(args.config, args.sets, overlays=args.overlays)


def world_size_argument(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError("--world-size", value, "must be a positive integer")
    return int(value)


def _add_plan(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=str, default="1", help="data-parallel ranks (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--per-step", action="store_true", help="with --json: add every step's values")


def _run_plan(args: argparse.Namespace) -> int:
    from curriculum.plan import format_plan_table, plan_dict
    from curriculum.schedule import build_schedule

    if args.per_step and not args.json:
        raise ConfigError("--per-step", True, "only with --json")
    config = load_config_from_args(args)
    schedule = build_schedule(config, world_size_argument(args.world_size))
    if args.json:
        print(json.dumps(plan_dict(schedule, per_step=args.per_step), indent=2))
    else:
        print(format_plan_table(schedule, title=f"{config.name}: {config.model.arch} {config.model.preset}"))
    return 0


def _add_ds_config(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=str, default="1", help="data-parallel ranks (default 1)")
    parser.add_argument("--bf16", action="store_true",
                        help="as on a bf16-capable GPU (default: as on CPU); decides only run.precision: auto")


def _run_ds_config(args: argparse.Namespace) -> int:
    from curriculum.schedule import build_schedule
    from pipeline.ds_config import derive_ds_config, resolve_precision

    config = load_config_from_args(args)
    schedule = build_schedule(config, world_size_argument(args.world_size))
    # run.precision owns precision; --bf16 only says what "auto" finds (as on a bf16-capable GPU, or on a CPU)
    precision = resolve_precision(config.run.precision, bf16_gpu=args.bf16)
    print(json.dumps(derive_ds_config(config, schedule, precision), indent=2))
    return 0


def add_prepare_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", default=[],
                        help="files (.txt, .jsonl, .parquet), directories or glob patterns; or the built-in "
                             "source python-stdlib (the running interpreter's standard library sources)")
    parser.add_argument("--source", action="append", default=[], dest="named_sources", metavar="NAME",
                        help="a built-in source (python-stdlib); same as giving it as a positional source")
    parser.add_argument("--output", default=None,
                        help="output directory (default data/python-stdlib for that source, else required)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", default=None,
                           help="a local tokenizer.json file or a directory holding one (default: train one)")
    tokenizer.add_argument("--vocab-size", type=int, default=None,
                           help="vocabulary size of the byte-level BPE trained on the training split (default 8192)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet rows")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of whole documents held out for validation (default 0.01, at least one)")
    parser.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                        help="token dtype (auto: uint16 when the vocabulary fits)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: CPU count, max 8)")
    parser.add_argument("--max-files", type=int, default=None, help="use at most this many source files")


def add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--window", type=int, default=50,
                        help="steps over which a plateau (no improvement) and trends are judged (default 50)")
    parser.add_argument("--spike-factor", type=float, default=2.0,
                        help="a step whose loss exceeds this many times its running average is a spike (default 2)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=str, default="1", help="data-parallel ranks (default 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where the run will train (auto: this machine)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def add_lr_find_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="where results go (default runs/<name>-lr-find)")
    parser.add_argument("--steps", type=int, default=200, help="ramp steps per sequence length (default 200)")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="first LR of the ramp (default 1e-6)")
    parser.add_argument("--max-lr", type=float, default=1.0, help="last LR of the ramp (default 1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--lrs", default=None,
                        help="comma-separated base LRs (default: 7 log-spaced values from base_lr/10 to base_lr*10)")
    parser.add_argument("--output-dir", default=None, help="sweep directory (default runs/<name>-sweep)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids to spread runs over, one run per GPU at a time "
                             "(default: runs one after another)")


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _lazy_run(module: str) -> Callable[[argparse.Namespace], int]:
    """The ``run`` of a module imported on first use (torch is imported only by commands that need it)."""
    return lambda args: importlib.import_module(module).run(args)


def _lazy_arguments(module: str) -> Callable[[argparse.ArgumentParser], None]:
    """The ``add_arguments`` of a command module (which imports no torch at module level)."""
    return lambda parser: importlib.import_module(module).add_arguments(parser)


COMMANDS: dict[str, Command] = {
    "plan": ("show what a curriculum will do, stage by stage", _add_plan, _run_plan),
    "ds-config": ("print the DeepSpeed JSON derived from a config", _add_ds_config, _run_ds_config),
    "prepare-data": ("tokenize text into packed token files", add_prepare_data_arguments,
                     _lazy_run("pipeline.data")),
    "train": ("run curriculum pretraining on the DeepSpeed engine", _lazy_arguments("pipeline.train"),
              _lazy_run("pipeline.train")),
    "doctor": ("sanity-check a config before launch", add_doctor_arguments, _lazy_run("pipeline.doctor")),
    "diagnose": ("find spikes, plateaus and slowdowns in a run's metrics", add_diagnose_arguments,
                 _lazy_run("pipeline.diagnose")),
    "lr-find": ("LR range test at each stage's sequence length", add_lr_find_arguments,
                _lazy_run("pipeline.lr_find")),
    "sweep": ("train once per LR and compare the runs", add_sweep_arguments, _lazy_run("pipeline.sweep")),
    "bench": ("tok/s, MFU and memory of every stage shape, against a hand-written baseline loop",
              _lazy_arguments("pipeline.bench"), _lazy_run("pipeline.bench")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curriculum-pretrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command_parser)
        command_parser.set_defaults(run=run)
    return parser


def run_reporting_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; bad input becomes one line on stderr and exit status 2."""
    try:
        return run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `plan | head` ends quietly
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
