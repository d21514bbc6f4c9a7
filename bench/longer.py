"""The ``--set`` arguments that make a curriculum YAML's run FACTOR times as long, every stage's end and pacing's
length scaled alike, so that the curriculum keeps its shape in fractions of the run (bench/study.sh's longer runs):

    python3 bench/longer.py bench/study-gpu/length.yaml 4
"""
import sys

import yaml


def longer_sets(config: dict, factor: int) -> list[str]:
    sets = [f"run.total_tokens={factor * config['run']['total_tokens']}"]
    curriculum = config["curriculum"]
    for i, stage in enumerate(curriculum.get("stages", [])):
        sets += [f"curriculum.stages.{i}.{key}={factor * stage[key]}"
                 for key in ("until_tokens", "until_step") if key in stage]
    if "pacing" in curriculum:
        steps = curriculum["pacing"]["total_curriculum_steps"]
        sets.append(f"curriculum.pacing.total_curriculum_steps={factor * steps}")
    return sets


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(" ".join(f"--set {s}" for s in longer_sets(yaml.safe_load(f), int(sys.argv[2]))))
