"""nbcheckpoint: process-level checkpoint and restore for Jupyter kernels."""
__version__ = "0.1.0"

from .engine import (  # noqa: E402
    DumpError, EngineError, ImageError, RestoreError, UnsupportedError,
    dump as checkpoint, restore,
)

__all__ = ["checkpoint", "restore", "EngineError", "DumpError", "RestoreError",
           "ImageError", "UnsupportedError", "__version__"]
