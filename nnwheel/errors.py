"""Every error nnwheel reports to a user. The CLI turns them into one line and an exit code."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of another library's error, for quoting it inside one of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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


class ProcessingError(NnwheelError):
    """--preprocess, --postprocess, --labels or --asset cannot be used: a function fails on the example, or the
    labels do not fit the model's outputs."""


class OutputError(NnwheelError):
    """The wheel or project cannot be written where it was asked for."""


class ExistingWheelError(OutputError):
    """The output directory has a wheel of the same name and version with other content."""


class MissingDependencyError(NnwheelError):
    """An optional dependency nnwheel needs for this command is not installed."""


class ModelNotFoundError(NnwheelError):
    """No installed model or wheel file answers to the given name."""


class IntegrityError(NnwheelError):
    """Installed weights do not match the hashes in the model's manifest."""


class DamagedInstallError(NnwheelError):
    """An installed model's package directory or manifest is gone or unreadable; reinstalling mends it."""


class BuildError(NnwheelError):
    """The project cannot be built into a wheel exactly as hatchling would build it."""


class LocalIndexError(NnwheelError):
    """The local devpi-server cannot be initialised, started or stopped."""


class IndexNotRunningError(NnwheelError):
    """A command needs the local index, and it is not running."""


class NotAModelWheelError(NnwheelError):
    """A file given to publish is not a wheel made by nnwheel."""

    exit_code = 2


class DamagedWheelError(NnwheelError):
    """A model wheel's files do not match its RECORD, its manifest or its file name; publish refuses it."""


class UnknownRepositoryError(NnwheelError):
    """--index names a repository that ~/.pypirc does not define."""

    exit_code = 2


class IndexUnreachableError(NnwheelError):
    """The package index refused the connection or did not answer in time."""


class AlreadyReleasedError(NnwheelError):
    """The index already has this file name with different content; released files never change."""


class MissingPartsError(NnwheelError):
    """A model wheel's weight parts are neither in the batch nor on the index: pip could not install it."""


class UploadRejectedError(NnwheelError):
    """The package index answered the upload with an error."""


class AuthenticationError(UploadRejectedError):
    """The index did not accept the user name and password (HTTP 401)."""


class UploadPermissionError(UploadRejectedError):
    """The user may not upload to this index (HTTP 403)."""


class UploadTooLargeError(UploadRejectedError):
    """The index refuses files this large (HTTP 413)."""


class ServeError(NnwheelError):
    """The model cannot be served: it does not import or load, or the address cannot be listened on."""


class DeployError(NnwheelError):
    """The deployment files cannot be made: the model's version cannot be found on the index."""


class ContainerEngineError(DeployError):
    """deploy --build finds no container engine that answers, or the one asked for is not there."""


class ImageBuildError(DeployError):
    """The container engine could not build the image: the base image, or pip inside the build, failed."""


class ContainerRunError(DeployError):
    """deploy --run cannot start the built image, or the container stops before it is ready."""


class ConversionError(NnwheelError):
    """wrap --to cannot convert the model, or the converted model does not give the same outputs."""


class BatchInputError(NnwheelError):
    """nnwheel batch cannot read its input, or the input's columns do not fit the model's inputs."""


class OutputExistsError(OutputError):
    """nnwheel batch's output path exists, and --overwrite was not given."""


class EngineError(NnwheelError):
    """Spark or Ray cannot be started, or the job failed on it."""


class WorkerInstallError(EngineError):
    """The workers' environment cannot be made: pip could not install the model from its index."""
