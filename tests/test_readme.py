"""What README.md says about the shipped recipes, ZeRO stages and installing torch, against what the code does."""

from __future__ import annotations

import re

from conftest import REPO_ROOT, run_cli

from curriculum.loading import recipe_names

README = (REPO_ROOT / "README.md").read_text()
CPU_INDEX = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def section(title: str) -> str:
    """A ``## title`` section's text, up to the next ``## `` heading."""
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def first_block(text: str) -> str:
    """The first fenced block in ``text``, without its fences."""
    return re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1)


def test_every_shipped_recipe_is_in_the_readme_and_its_listing_is_the_commands() -> None:
    shipped = README.split("Shipped recipes", 1)[1].split("```", 1)[0]
    assert all(f"`{name}`" in shipped for name in recipe_names()), shipped
    listing = first_block(README.split("Shipped recipes", 1)[1])
    assert listing == "$ curriculum-pretrain recipes\n" + run_cli(["recipes"]).stdout


def test_the_readme_lists_the_zero_stages_and_quotes_the_error_for_others() -> None:
    """The deepspeed row names the ZeRO stages the pipeline runs and quotes the one error line it prints for a stage
    that does not exist."""
    row = next(line for line in README.splitlines() if line.startswith("| `deepspeed` |"))
    assert "ZeRO stages 0 (the default), 1, 2 and 3" in row
    quoted = re.search(r"`(error: deepspeed\.overrides\.zero_optimization\.stage = 4: [^`]*)`", row).group(1)
    result = run_cli(["ds-config", "--config", "tiny-cpu", "--set", "deepspeed.overrides.zero_optimization.stage=4"])
    assert (result.returncode, result.stderr) == (2, quoted + "\n")
    assert run_cli(["ds-config", "--config", "tiny-cpu", "--set",
                    "deepspeed.overrides.zero_optimization.stage=3"]).returncode == 0


def test_the_cpu_torch_build_is_a_note_beside_the_install_commands_not_in_them() -> None:
    """Quick start and Tests say how to get torch's CPU build; the fenced command blocks (CI runs the Tests one as
    written) install torch from the package index they are given."""
    for title in ("Quick start", "Tests"):
        text = section(title)
        command = first_block(text)
        assert "pip install torch==2.13.0 &&" in command and "--index-url" not in command, title
        assert CPU_INDEX in text.replace("\n", " "), title
    assert section("Tests").startswith("\n<!-- test-command -->\n```")  # the block CI runs is that command
