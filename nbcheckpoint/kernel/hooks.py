"""`on_checkpoint` / `on_restore` hooks: user functions run inside the kernel.

`on_checkpoint` hooks run in the kernel just before a checkpoint is requested (flush a
buffer, close a connection that cannot survive); `on_restore` hooks run in every kernel
that comes back from a checkpoint (reopen a database connection, reseed a generator).
Both run on the kernel's main thread.  A hook that raises is reported and the others
still run: a hook never stops a checkpoint or a restore.

A hook takes no argument, or one: a dict describing the checkpoint (for `on_restore`
the checkpoint's metadata, for `on_checkpoint` ``{"name": ...}``).  Registering a
function with the same module and qualified name as a registered one replaces it, so
re-running a notebook cell does not run its hook twice.
"""
from __future__ import annotations

import inspect
import sys
import traceback
from typing import Callable

_hooks: dict[str, list[Callable]] = {"checkpoint": [], "restore": []}


def _key(fn) -> tuple:
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None)
    if mod is None or qual is None or "<lambda>" in qual:
        return ("id", id(fn))
    return (mod, qual)


def _register(kind: str, fn: Callable) -> Callable:
    if not callable(fn):
        raise TypeError(f"on_{kind} takes a function, not {type(fn).__name__}")
    lst = _hooks[kind]
    k = _key(fn)
    for i, old in enumerate(lst):
        if old is fn or _key(old) == k:
            lst[i] = fn
            return fn
    lst.append(fn)
    return fn


def on_checkpoint(fn: Callable) -> Callable:
    """Run `fn` in the kernel before each checkpoint of it.  Usable as a decorator."""
    return _register("checkpoint", fn)


def on_restore(fn: Callable) -> Callable:
    """Run `fn` in every kernel restored from a checkpoint.  Usable as a decorator."""
    return _register("restore", fn)


def _takes_argument(fn) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in sig.parameters.values())


def run(kind: str, info: dict | None = None, stream=None) -> list[tuple[Callable, BaseException]]:
    """Run the `kind` hooks; report each failure on `stream` (stderr) and return them."""
    stream = stream or sys.stderr
    failed = []
    for fn in list(_hooks[kind]):            # a hook may register another
        try:
            if _takes_argument(fn):
                fn(dict(info or {}))
            else:
                fn()
        except Exception as e:          # reported, never fatal
            failed.append((fn, e))
            name = getattr(fn, "__qualname__", repr(fn))
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            print(f"nbcheckpoint: the on_{kind} hook {name} failed (ignored):\n{tb}",
                  file=stream, end="")
    return failed
