"""nbcheckpoint: process-level checkpoint and restore for Jupyter kernels."""
from ._version import __version__

from .engine import (  # noqa: E402
    DumpError, EngineError, ImageError, RestoreError, UnsupportedError,
    dump as checkpoint, restore,
)
from .engine.errors import NbcheckpointError  # noqa: E402


def __getattr__(name):
    # the hooks live in kernel/: imported on first use, so that importing the engine
    # (which imports this package first) does not import kernel/
    if name in ("on_checkpoint", "on_restore"):
        from .kernel import hooks
        return getattr(hooks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(ip):
    """``%load_ext nbcheckpoint``: the %checkpoint, %restore and %checkpoints magics."""
    from .kernel import load_ipython_extension as load
    load(ip)


__all__ = ["checkpoint", "restore", "NbcheckpointError", "EngineError", "DumpError", "RestoreError",
           "ImageError", "UnsupportedError", "__version__",
           "load_ipython_extension", "on_checkpoint", "on_restore"]
