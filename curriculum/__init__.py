"""Sequence-length curriculum: typed config, pure schedules, plan rendering. Imports no torch."""

from curriculum.config import Config
from curriculum.errors import ConfigError
from curriculum.loading import load_config
from curriculum.schedule import Schedule, Stage, build_schedule

__all__ = ["Config", "ConfigError", "Schedule", "Stage", "build_schedule", "load_config"]
