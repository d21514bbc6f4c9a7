"""Bad input, through the real CLI in a subprocess: exit status 2 and one line on stderr,
``error: <field> = <value>: <what is allowed>``, never a traceback. Then the override layers that work.

Each case gives the config (YAML text, or a recipe name), the arguments and environment, the exact start of the
error line (field and value) and a piece of the explanation. ``{path}`` stands for the YAML file's path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import pytest
from conftest import run_cli

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.loading import load_config, parse_yaml_value


@dataclass(frozen=True)
class Case:
    id: str
    yaml: Optional[str]
    """The config file's text; ``None``: the ``seed003`` recipe."""
    starts: str
    """The error line up to the explanation: ``error: <field> = <value>``."""
    says: str
    """Part of the explanation."""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    command: str = "plan"


TWO_STAGES = """
curriculum:
  stages:
    - {until_step: 100, seq_len: 64, global_batch: 32, warmup_steps: 10}
    - {until_step: 200, seq_len: 128, global_batch: 16}
"""


def stages(*lines: str, extra: str = "") -> str:
    """A config whose curriculum has these stage lines (flow mappings), plus extra top-level YAML."""
    return "curriculum:\n  stages:\n" + "".join(f"    - {line}\n" for line in lines) + extra


def pacing(line: str, extra: str = "run: {total_steps: 100}\n") -> str:
    return f"curriculum:\n  pacing: {line}\n{extra}"


CASES = [
    # ---- stages
    Case("stages out of order (until_step)",
         stages("{until_step: 100, seq_len: 64, global_batch: 32}", "{until_step: 50, seq_len: 128, global_batch: 16}"),
         "error: curriculum.stages.1.until_step = 50:", "greater than the step this stage starts at (100)"),
    Case("stages out of order (until_tokens)",
         # stage 0: ceil(10000 / (32 x 64 = 2048)) = 5 steps, 10,240 tokens
         stages("{until_tokens: 10000, seq_len: 64, global_batch: 32}",
                "{until_tokens: 10000, seq_len: 128, global_batch: 16}"),
         "error: curriculum.stages.1.until_tokens = 10000:", "tokens trained when this stage starts (10240)"),
    Case("seq_len not a multiple of 8", stages("{until_step: 10, seq_len: 100, global_batch: 32}"),
         "error: curriculum.stages.0.seq_len = 100:", "must be a multiple of 8"),
    Case("seq_len zero", stages("{until_step: 10, seq_len: 0, global_batch: 32}"),
         "error: curriculum.stages.0.seq_len = 0:", "greater than 0"),
    Case("global_batch negative", stages("{until_step: 10, seq_len: 64, global_batch: -1}"),
         "error: curriculum.stages.0.global_batch = -1:", "greater than 0"),
    Case("lr zero (a number or auto)", stages("{until_step: 10, seq_len: 64, global_batch: 8, lr: 0}"),
         "error: curriculum.stages.0.lr = 0:", "greater than 0, or Input should be 'auto'"),
    Case("warmup_steps longer than the stage", stages("{until_step: 100, seq_len: 64, global_batch: 32, "
                                                      "warmup_steps: 200}"),
         "error: curriculum.stages.0.warmup_steps = 200:", "longer than its stage (100 steps)"),
    Case("warmup_tokens longer than the stage",
         # ceil(300000 / 2048) = 147 warmup steps > 100
         stages("{until_step: 100, seq_len: 64, global_batch: 32, warmup_tokens: 300000}"),
         "error: curriculum.stages.0.warmup_tokens = 300000:", "warmup of 147 steps is longer than its stage"),
    Case("both until_step and until_tokens",
         stages("{until_step: 100, until_tokens: 5000, seq_len: 64, global_batch: 32}"),
         "error: curriculum.stages.0 = {'until_step': 100, 'until_tokens': 5000,",
         "give until_step or until_tokens, not both"),
    Case("decreasing seq_len",
         stages("{until_step: 100, seq_len: 128, global_batch: 16}",
                "{until_step: 200, seq_len: 64, global_batch: 32}"),
         "error: curriculum.stages.1.seq_len = 64:", "must be >= the previous stage's seq_len 128"),
    Case("global_batch_tokens not a multiple of seq_len",
         stages("{until_step: 10, seq_len: 96, global_batch_tokens: 1000}"),
         "error: curriculum.stages.0.global_batch_tokens = 1000:", "must be a multiple of seq_len 96"),
    Case("no batch", stages("{until_step: 10, seq_len: 64}"),
         "error: curriculum.stages.0.global_batch = None:", "give global_batch or global_batch_tokens"),
    Case("a middle stage without an end",
         stages("{seq_len: 64, global_batch: 32}", "{until_step: 200, seq_len: 128, global_batch: 16}"),
         "error: curriculum.stages.0.until_step = None:", "every stage but the last needs until_step or until_tokens"),
    Case("last stage without an end and no run budget",
         stages("{until_step: 100, seq_len: 64, global_batch: 32}", "{seq_len: 128, global_batch: 16}"),
         "error: curriculum.stages.1.until_step = None:", "or set run.total_steps / run.total_tokens"),
    Case("run budget conflicts with the last stage's end", TWO_STAGES + "run: {total_steps: 300}\n",
         "error: run.total_steps = 300:", "conflicts with curriculum.stages.1's until_step/until_tokens"),
    Case("run budget before the last stage starts",
         stages("{until_step: 100, seq_len: 64, global_batch: 32}", "{seq_len: 128, global_batch: 16}",
                extra="run: {total_steps: 80}\n"),
         "error: run.total_steps = 80:", "greater than the step this stage starts at (100)"),
    Case("both run budgets", TWO_STAGES + "run: {total_steps: 300, total_tokens: 5000}\n",
         "error: run = {'total_steps': 300, 'total_tokens': 5000}:", "give total_steps or total_tokens, not both"),
    Case("heartbeat timeout under three beats", TWO_STAGES + "run: {heartbeat_timeout_s: 1}\n",
         "error: run.heartbeat_timeout_s = 1:", "greater than or equal to 3"),
    Case("lr_events at_step past the end", TWO_STAGES.replace("  stages:", "  lr_events: [{at_step: 500, multiply: "
                                                              "0.5}]\n  stages:"),
         "error: curriculum.lr_events.0.at_step = 500:", "must be inside the run (steps 0 .. 199)"),
    Case("empty stage list", "curriculum: {stages: []}\n",
         "error: curriculum = {'stages': []}:", "stages must list at least one stage"),
    # ---- unknown keys
    Case("unknown top-level key", TWO_STAGES + "trainer: 1\n",
         "error: trainer = 1:",
         "unknown key; allowed here: name, model, data, curriculum, optimizer, guard, kernels, deepspeed, run"),
    Case("unknown nested key", TWO_STAGES + "run: {seeed: 7}\n",
         "error: run.seeed = 7:", "unknown key; allowed here: total_steps, total_tokens, seed,"),
    Case("unknown key in a stage",
         stages("{until_step: 10, seq_len: 64, global_batch: 32, warmup: 5}"),
         "error: curriculum.stages.0.warmup = 5:", "unknown key; allowed here: until_step, until_tokens,"),
    Case("unknown key two sections deep", TWO_STAGES.replace("  stages:", "  lr_scaling: {rul: seed}\n  stages:"),
         "error: curriculum.lr_scaling.rul = 'seed':", "unknown key; allowed here: rule, ref_batch, ref_seq_len"),
    Case("missing curriculum", "name: x\n", "error: curriculum = None:", "Field required"),
    # ---- world size and micro-batches
    Case("batch not divisible by the world size", None, "error: curriculum.stages.0.global_batch = 256:",
         "must be divisible by the world size 3", args=("--world-size", "3")),
    Case("per-rank batch not divisible by micro_batch",
         stages("{until_step: 10, seq_len: 64, global_batch: 32, micro_batch: 6}"),
         "error: curriculum.stages.0.micro_batch = 6:", "must divide the per-rank batch 16 (global batch 32 / world "
         "size 2)", args=("--world-size", "2")),
    Case("--world-size 0", None, "error: --world-size = '0':", "must be a positive integer",
         args=("--world-size", "0")),
    Case("--world-size not a number", None, "error: --world-size = 'two':", "must be a positive integer",
         args=("--world-size", "two")),
    # ---- stages / pacing
    Case("both stages and pacing",
         TWO_STAGES + "  pacing: {type: fixed_linear, min_seq_len: 64, max_seq_len: 128, "
                      "total_curriculum_steps: 10}\n",
         "error: curriculum = {'stages': [", "give either stages (a list) or pacing, exactly one"),
    Case("neither stages nor pacing", "curriculum: {base_lr: 1.0e-3}\n",
         "error: curriculum = {'base_lr': 0.001}:", "give either stages (a list) or pacing, exactly one"),
    Case("pacing missing total_curriculum_steps",
         pacing("{type: fixed_linear, min_seq_len: 64, max_seq_len: 1024, global_batch: 8, lr: 1.0e-3}"),
         "error: curriculum.pacing.total_curriculum_steps = None:", "required for fixed_linear"),
    Case("pacing min > max",
         pacing("{type: fixed_root, min_seq_len: 128, max_seq_len: 64, total_curriculum_steps: 10, global_batch: 8, "
                "lr: 1.0e-3}"),
         "error: curriculum.pacing.max_seq_len = 64:", "must be >= min_seq_len 128"),
    Case("pacing min not a multiple of 8 (DeepSpeed would train at 96 or 104)",
         pacing("{type: fixed_linear, min_seq_len: 100, max_seq_len: 1024, total_curriculum_steps: 10, "
                "global_batch: 8, lr: 1.0e-3}"),
         "error: curriculum.pacing.min_seq_len = 100:", "must be a multiple of 8"),
    Case("fixed_discrete max_step of the wrong length",
         pacing("{type: fixed_discrete, difficulty: [64, 128, 256], max_step: [10], global_batch: 8, lr: 1.0e-3}"),
         "error: curriculum.pacing.max_step = [10]:", "needs 2 entries, one fewer than difficulty"),
    Case("fixed_discrete with min_seq_len",
         pacing("{type: fixed_discrete, difficulty: [64], min_seq_len: 64, global_batch: 8, lr: 1.0e-3}"),
         "error: curriculum.pacing.min_seq_len = 64:", "not used by fixed_discrete"),
    Case("pacing with lr auto",
         pacing("{type: fixed_linear, min_seq_len: 64, max_seq_len: 128, total_curriculum_steps: 10, "
                "global_batch: 8, lr: auto}"),
         "error: curriculum.pacing.lr = 'auto':", "pacing has one LR for the whole run"),
    # ---- reshape
    Case("reshape seq_len not dividing the max",
         "curriculum:\n  mode: reshape\n  stages:\n    - {until_step: 10, seq_len: 384}\n"
         "    - {until_step: 20, seq_len: 1024, global_batch: 16}\n",
         "error: curriculum.stages.0.seq_len = 384:", "must divide max seq_len 1024"),
    Case("reshape tokens per step not whole samples",
         "curriculum:\n  mode: reshape\n  stages:\n    - {until_step: 10, seq_len: 256, global_batch: 3}\n"
         "    - {until_step: 20, seq_len: 1024, global_batch: 16}\n",
         "error: curriculum.stages.0.global_batch = 3:", "tokens per step (3 x 256) must be a multiple of the max"),
    # ---- files
    Case("bad YAML syntax", "curriculum:\n  stages: [\n    {seq_len: 64\n", "error: {path} = 'line ",
         "not valid YAML"),
    Case("YAML not a mapping", "- seq_len: 64\n- seq_len: 128\n", "error: {path} = 'list':",
         "a recipe must be a YAML mapping of sections"),
    Case("empty YAML file", "", "error: {path} = 'NoneType':", "a recipe must be a YAML mapping of sections"),
    Case("unknown recipe name", None, "error: --config = 'no-such-recipe':", "no such file, and no recipe of that name "
         "(recipes: gpt2-124m-baseline, gpt2-124m-curriculum, gpt2-124m-seq-warmup, gpt2-124m-seq-warmup-baseline, "
         "gpt2-124m-seq-warmup-stable, "
         "llama-350m-rtx3090, seed003, tiny-cpu)", args=("--config", "no-such-recipe")),
    # ---- --set and environment
    Case("--set without =", None, "error: --set = 'curriculum.base_lr':", "expected KEY.PATH=VALUE",
         args=("--set", "curriculum.base_lr")),
    Case("--set list index out of range", None, "error: --set curriculum.stages.7.lr = '1e-3':",
         "curriculum.stages.7: list index must be 0 .. 4", args=("--set", "curriculum.stages.7.lr=1e-3")),
    Case("--set into a value", None, "error: --set name.first = 'x':", "name is a value, not a section",
         args=("--set", "name.first=x")),
    Case("--set value not YAML", None, "error: --set curriculum.stages.0.lr = '[1,':", "not a valid YAML value",
         args=("--set", "curriculum.stages.0.lr=[1,")),
    Case("--set a wrong type", None, "error: curriculum.stages.0.global_batch = 'many':", "valid integer",
         args=("--set", "curriculum.stages.0.global_batch=many")),
    Case("environment: unknown key", None, "error: run.seeed = 1:", "unknown key; allowed here: total_steps,",
         env={"CPT_RUN__SEEED": "1"}),
    Case("environment: not a number", None, "error: curriculum.base_lr = 'abc':", "valid number",
         env={"CPT_CURRICULUM__BASE_LR": "abc"}),
    Case("environment: value not YAML", None, "error: CPT_NAME name = 'a: b: c':", "not a valid YAML value",
         env={"CPT_NAME": "a: b: c"}),
    Case("--per-step without --json", None, "error: --per-step = True:", "only with --json", args=("--per-step",)),
    # ---- ds-config
    Case("ds-config: owned key in deepspeed.overrides", None,
         "error: deepspeed.overrides.train_batch_size = 64:", "derived from curriculum stages (global_batch)",
         args=("--set", "deepspeed.overrides.train_batch_size=64"), command="ds-config"),
    Case("ds-config: owned key gradient_clipping", None,
         "error: deepspeed.overrides.gradient_clipping = 1.0:", "derived from curriculum stages (grad_clip)",
         args=("--set", "deepspeed.overrides.gradient_clipping=1.0"), command="ds-config"),
    Case("ds-config: unknown template", None, "error: deepspeed.template = 'zero9':",
         "no template of that name (templates: default, rtx3090, zero2)",
         args=("--set", "deepspeed.template=zero9"), command="ds-config"),
    Case("ds-config: ZeRO stage 4", None, "error: deepspeed.overrides.zero_optimization.stage = 4:",
         "must be 0 (off), 1 (optimizer state sharded), 2 (and gradients) or 3 (and parameters)",
         args=("--set", "deepspeed.overrides.zero_optimization.stage=4"), command="ds-config"),
    Case("ds-config: zero_optimization not a mapping", None, "error: deepspeed.overrides.zero_optimization = 3:",
         "must be a mapping", args=("--set", "deepspeed.overrides.zero_optimization=3"), command="ds-config"),
]


def _run(case: Case, tmp_path) -> tuple[object, str]:
    path = ""
    args: list[str] = [case.command]
    if "--config" not in case.args:
        if case.yaml is None:
            args += ["--config", "seed003"]
        else:
            config_file = tmp_path / "run.yaml"
            config_file.write_text(case.yaml)
            path = str(config_file)
            args += ["--config", path]
    return run_cli([*args, *case.args], env=case.env), path


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_cli_error(case: Case, tmp_path) -> None:
    """Exit status 2; one stderr line `error: <field> = <value>: <allowed>`; no traceback, nothing on stdout."""
    result, path = _run(case, tmp_path)
    stderr = result.stderr
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith(case.starts.replace("{path}", path)), stderr
    assert case.says in stderr, stderr
    assert stderr.count("\n") == 1, stderr  # one line
    assert result.stdout == ""


def test_non_utf8_config_file(tmp_path) -> None:
    """A file that is not UTF-8 text is a config error naming the file, not a UnicodeDecodeError."""
    config_file = tmp_path / "binary.yaml"
    config_file.write_bytes(b"\xff\xfe\x00 not text")
    result = run_cli(["plan", "--config", str(config_file)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: --config = '{config_file}': cannot read it as UTF-8 text")


def test_a_template_with_a_zero_stage_that_does_not_exist(tmp_path) -> None:
    """A template file with ZeRO stage 4 is rejected, naming the template and the stage it sets."""
    template = tmp_path / "zero4.json"
    template.write_text('{"zero_optimization": {"stage": 4}}')
    result = run_cli(["ds-config", "--config", "tiny-cpu", "--set", f"deepspeed.template={template}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: deepspeed.template = '{template}': sets zero_optimization.stage = 4; "
                                    "must be 0 (off), 1"), result.stderr


def test_template_owning_a_derived_key(tmp_path) -> None:
    """A template that sets train_batch_size is rejected: the curriculum owns the batch."""
    template = tmp_path / "batch.json"
    template.write_text('{"train_batch_size": 8}')
    result = run_cli(["ds-config", "--config", "tiny-cpu", "--set", f"deepspeed.template={template}"])
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: deepspeed.template = '{template}': sets train_batch_size, which is "
                                    "derived from curriculum stages (global_batch)"), result.stderr


# --------------------------------------------------------------------------------------------------- overrides


def test_set_and_env_precedence_through_the_cli() -> None:
    """YAML < CPT_ environment < --set: the last layer that sets curriculum.base_lr wins."""
    # tiny-cpu: sqrt rule, ref_batch 32, stage 0 batch 32 -> peak = base_lr; warmup 20 -> step 0 = base_lr / 20
    def first_lr(args: list[str], env: dict[str, str]) -> float:
        result = run_cli(["plan", "--config", "tiny-cpu", "--json", *args], env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["stages"][0]["peak_lr"]

    env = {"CPT_CURRICULUM__BASE_LR": "3e-3"}
    assert first_lr([], {}) == pytest.approx(2e-3)  # the YAML
    assert first_lr([], env) == pytest.approx(3e-3)  # environment over YAML
    assert first_lr(["--set", "curriculum.base_lr=4e-3"], env) == pytest.approx(4e-3)  # --set over environment


def test_precedence_in_process() -> None:
    """load_config applies the layers in order; a list element is reachable from both."""
    env = {"CPT_CURRICULUM__BASE_LR": "3e-3", "CPT_CURRICULUM__STAGES__0__GLOBAL_BATCH": "64",
           "CPT_RUN__SEED": "7", "OTHER_VARIABLE": "ignored"}
    config = load_config("tiny-cpu", ["curriculum.stages.0.global_batch=128"], environ=env)
    assert config.curriculum.base_lr == 3e-3
    assert config.curriculum.stages is not None and config.curriculum.stages[0].global_batch == 128
    assert config.run.seed == 7
    assert load_config("tiny-cpu", environ={}).curriculum.base_lr == 2e-3


def test_set_creates_missing_sections() -> None:
    """--set into a section the YAML does not have creates it."""
    config = load_config("tiny-cpu", ["optimizer.eps=1e-6", "run.wandb.enabled=true"], environ={})
    assert config.optimizer.eps == 1e-6 and config.run.wandb.enabled is True


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("6.0e-4", 6e-4), ("-2E+2", -200.0), (".5", 0.5),
                                             ("3", 3), ("auto", "auto"), ("[1, 2]", [1, 2]), ("null", None),
                                             ("true", True)])
def test_values_parse_as_yaml(text: str, value: object) -> None:
    """Override values are YAML, with 1e-3 read as the float it means (YAML 1.1 would give a string)."""
    parsed = parse_yaml_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_exponent_floats_in_a_yaml_file(tmp_path) -> None:
    """`base_lr: 1e-3` in a recipe is a float, not a string rejected by validation."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("curriculum:\n  base_lr: 1e-3\n  stages: [{until_step: 10, seq_len: 64, global_batch: 8, "
                           "lr: 5e-4}]\n")
    config = load_config(str(config_file), environ={})
    assert isinstance(config, Config)
    assert config.curriculum.base_lr == 1e-3
    assert config.curriculum.stages is not None and config.curriculum.stages[0].lr == 5e-4


def test_config_error_names_field_value_and_rule() -> None:
    """ConfigError's message is `field = repr(value): allowed`, and it is a ValueError."""
    err = ConfigError("curriculum.stages.0.seq_len", 100, "must be a multiple of 8")
    assert str(err) == "curriculum.stages.0.seq_len = 100: must be a multiple of 8"
    assert isinstance(err, ValueError)
