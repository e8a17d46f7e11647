"""User-facing errors. Each message says what was wrong and what is accepted."""


class InfinichatError(Exception):
    """An error caused by the user's input (a file, a flag, a request), shown as one clear line."""


class ModelLoadError(InfinichatError):
    """A model file or folder that cannot be loaded: missing, truncated, corrupt or unsupported."""


class DeviceError(InfinichatError):
    """A --device that does not exist here (e.g. cuda without a CUDA device), or a choice it cannot run."""
