"""The one exception family the stage scripts turn into a clear message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix (bad input, bad params, missing data); shown without traceback."""


class ConfigError(PipelineError):
    """params.yaml (or an override) has an unknown key, a wrong type or an invalid value."""


class DataError(PipelineError):
    """The archive or the prepared arrays are missing, corrupt or not what CIFAR-10 looks like."""


class StopAfterCheckpoint(PipelineError):
    """Raised by a training callback to stop training once this epoch is checkpointed (e.g. the
    tracking server went away): the work is kept and a rerun resumes after it."""
