"""Every error nnwheel reports to a user. The CLI turns them into one line and an exit code."""

from __future__ import annotations


class NnwheelError(Exception):
    """Base class: the message is written for a human and says what to do next."""

    exit_code = 1


class UsageError(NnwheelError):
    """An option or argument has a value nnwheel cannot use."""

    exit_code = 2


class InvalidNameError(NnwheelError):
    """A package name or version pip cannot use, or one that would shadow another module."""

    exit_code = 2


class CheckpointError(NnwheelError):
    """The checkpoint cannot be read safely, or its format is not supported."""


class ArchitectureError(NnwheelError):
    """The model class given with --arch cannot be found, built, or does not fit the weights."""


class SchemaError(NnwheelError):
    """The input or output schema cannot be determined or does not fit the model."""


class OutputError(NnwheelError):
    """The wheel or project cannot be written where it was asked for."""


class MissingDependencyError(NnwheelError):
    """An optional dependency nnwheel needs for this command is not installed."""


class ModelNotFoundError(NnwheelError):
    """No installed model or wheel file answers to the given name."""


class IntegrityError(NnwheelError):
    """Installed weights do not match the hashes in the model's manifest."""


class BuildError(NnwheelError):
    """The project cannot be built into a wheel exactly as hatchling would build it."""
