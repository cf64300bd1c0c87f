"""Kernel errors: bad arguments to a kernel, or a backend that is not available."""


class KernelError(ValueError):
    """A kernel was called with arrays it cannot work on."""


class BackendUnavailable(RuntimeError):
    """The requested backend (e.g. CUDA) cannot run on this machine."""
