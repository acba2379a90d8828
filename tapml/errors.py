"""Errors meant for users: each says what failed, the values involved and what to do next."""


class TapmlError(Exception):
    """Base of every error tapml shows to users (the CLI prints it without a traceback)."""


class ModelNotFound(TapmlError):
    """An unknown model name, a missing weights package or an unreadable model file."""


class WeightsError(TapmlError):
    """Weight shards that are missing, truncated or fail their checksum."""


class CompileError(TapmlError):
    """A model or kernel that cannot be compiled for the requested target."""


class ExecutorError(TapmlError):
    """A kernel that cannot be run by an executor, or a plan the executor cannot load."""


class PlanError(TapmlError):
    """A plan file that is malformed, of an unknown version, or inconsistent with its kernels;
    or a request the plan refuses (a scalar or token id out of its bounds)."""


class GenerationError(TapmlError):
    """Bad generation input, e.g. a prompt longer than the compiled context."""


class SuiteError(TapmlError):
    """A carved suite that is missing, corrupt, truncated or of another version."""


class DeviceError(TapmlError):
    """A remote device (tapml device agent, TVM RPC) that refuses a request or cannot be used."""


class DeviceLost(DeviceError):
    """A remote device that stopped answering: its connection closed or a call timed out."""


class BundleError(TapmlError):
    """A bundle that cannot be packaged, or whose manifest is missing, corrupt or unknown."""
