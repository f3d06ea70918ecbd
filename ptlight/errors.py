"""Errors ptlight raises for things the user can fix. The CLI prints them as one message."""


class PtlightError(Exception):
    """Base class: a problem with the user's config, data, model or plugins (not a bug)."""


class ConfigError(PtlightError, ValueError):
    """A config key has a value ptlight cannot use; the message names the key."""


class DataError(PtlightError, ValueError):
    """A data file or row is unusable; the message names the file and row."""


class ModelLoadError(PtlightError, OSError):
    """A model or tokenizer could not be loaded; the message says what to do instead."""


class PluginError(PtlightError, ImportError):
    """An entry-point plugin failed to import or breaks the contract; names the entry point."""


class TrainingError(PtlightError, RuntimeError):
    """Training cannot go on (e.g. non-finite loss under nonfinite.policy=stop); says why and
    where the last good checkpoint is."""
