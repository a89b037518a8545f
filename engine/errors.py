"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class EngineError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class BadInputError(EngineError):
    """A video, caption or argument that cannot be used as given."""


class VideoError(BadInputError):
    """A file that is missing, not a video, corrupt, truncated, empty or out of bounds."""


class MissingWeightsError(EngineError):
    """Model weights are neither on disk nor reachable."""


class ConfigError(EngineError):
    """A config file or profile that does not validate."""


class ChatBackendError(EngineError):
    """A chat model's server stayed unreachable or kept failing after the backend's retries (transient: a
    batch may be retried later)."""


def transient_faults() -> tuple[type[BaseException], ...]:
    """Faults worth a retry of a whole batch rather than a rejection of one item: a model server restarting,
    a GPU momentarily out of memory. Committed items are skipped on the retry."""
    import torch

    return (ConnectionError, TimeoutError, MemoryError, torch.OutOfMemoryError, ChatBackendError)


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU out of memory (torch's error; torch is not imported for the check)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def free_gpu_memory() -> None:
    """Give cached GPU memory back before a smaller retry (nothing without torch or CUDA)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
