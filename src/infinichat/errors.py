"""User-facing errors. Each message says what was wrong and what is accepted."""


class InfinichatError(Exception):
    """An error caused by the user's input (a file, a flag, a request), shown as one clear line."""


class ModelLoadError(InfinichatError):
    """A model file or folder that cannot be loaded: missing, truncated, corrupt or unsupported."""


class DeviceError(InfinichatError):
    """A --device that does not exist here (e.g. cuda without a CUDA device), or a choice it cannot run."""


class StorageError(InfinichatError):
    """The session store cannot be read or written: a read-only or full disk, a damaged database. Not the
    client's fault: the server answers 503 and /health reports it. Messages name no internal paths."""


class DamagedSessionError(StorageError):
    """A stored session whose data does not parse. It is refused (and left untouched on disk); other sessions
    are unaffected."""


def gpu_out_of_memory(e: BaseException) -> bool:
    """`e` is torch.OutOfMemoryError (a GPU's; a RuntimeError), told apart without importing torch here."""
    return isinstance(e, RuntimeError) and type(e).__name__ == "OutOfMemoryError"


class OverloadedError(InfinichatError):
    """The server's memory limit for resident KV caches is reached by generations in progress; retry later."""
