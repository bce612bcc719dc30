"""Code that runs inside ipykernel: the magics, the hooks, the checkpoints browser.

``%load_ext nbcheckpoint`` (the "Python 3 (checkpointable)" kernelspec passes
``--ext nbcheckpoint``) registers ``%checkpoint``, ``%restore`` and ``%checkpoints`` and
starts the control listener (see core.py for the two modes).
"""
from __future__ import annotations

from .hooks import on_checkpoint, on_restore

__all__ = ["load_ipython_extension", "unload_ipython_extension", "on_checkpoint", "on_restore"]


def load_ipython_extension(ip) -> None:
    from . import core
    from .frontend import gate
    from .magics import CheckpointMagics
    side = core.get(ip)          # the listener starts now: a checkpoint taken while idle needs it
    ip.register_magics(CheckpointMagics)
    ip.events.register("pre_run_cell", side.pre_run_cell)
    ip.events.register("pre_run_cell", gate.pre_run_cell)


def unload_ipython_extension(ip) -> None:
    pass                         # the listener stays: this kernel may be checkpointed from outside
