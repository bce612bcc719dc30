"""nbcheckpoint: process-level checkpoint and restore for Jupyter kernels."""
__version__ = "0.1.0"

from .engine import (  # noqa: E402
    DumpError, EngineError, ImageError, RestoreError, UnsupportedError,
    dump as checkpoint, restore,
)
from .engine.errors import NbcheckpointError  # noqa: E402
from .kernel.hooks import on_checkpoint, on_restore  # noqa: E402


def load_ipython_extension(ip):
    """``%load_ext nbcheckpoint``: the %checkpoint, %restore and %checkpoints magics."""
    from .kernel import load_ipython_extension as load
    load(ip)


__all__ = ["checkpoint", "restore", "NbcheckpointError", "EngineError", "DumpError", "RestoreError",
           "ImageError", "UnsupportedError", "__version__",
           "load_ipython_extension", "on_checkpoint", "on_restore"]
