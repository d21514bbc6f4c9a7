"""The one error type for bad user input (YAML, CLI values, environment variables, data files).

The CLI catches it, prints its one-line message and exits with status 2. Everything that a user can get wrong
raises it with the field (or flag, or file), the value and what is allowed, so the message says how to fix it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: ``field = value: allowed``."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field} = {value!r}: {allowed}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, object, str]]:
        """Pickled as its three parts, so an error raised in a worker process reaches the CLI whole."""
        return type(self), (self.field, self.value, self.allowed)
