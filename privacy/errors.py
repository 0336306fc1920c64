"""Errors the command line turns into a one-line message and exit code 2.

They live below every package (bench, models and privacy all raise them) and are public as
``dpmem.UsageError`` and ``dpmem.ConfigError``."""


class UsageError(Exception):
    """Unusable input: a bad config value, a missing or corrupt run directory."""


class ConfigError(UsageError):
    """A config value that cannot be used; ``field`` names the config key."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field '{field}': {message}")
