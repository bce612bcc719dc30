"""What the user reads in the cell: the error shown without a traceback, the result lines."""
from __future__ import annotations

from ..engine.errors import NbcheckpointError
from ..engine.units import format_size
from .progress import format_time

CHECKPOINTABLE = "Python 3 (checkpointable)"


class CheckpointError(NbcheckpointError):
    """An operation failed; the message is for the user.  Shown without a traceback."""

    def _render_traceback_(self):
        return [f"\x1b[0;31mnbcheckpoint:\x1b[0m {self}"]


def taken_line(msg: dict) -> str:
    frozen = msg.get("frozen_s")
    paused = f" (kernel paused {frozen:.2f} s)" if isinstance(frozen, (int, float)) else ""
    return (f"checkpoint '{msg.get('name', '?')}' taken{paused}; its image is being written in the "
            "background (%checkpoints lists it once complete; %checkpoint --wait waits for that)")


def saved_line(meta: dict) -> str:
    name = meta.get("name", "?")
    size = format_size(meta.get("size_bytes"))
    total = meta.get("total_s")
    frozen = meta.get("frozen_s")
    took = f" in {total:.1f} s" if isinstance(total, (int, float)) else ""
    paused = f" (kernel paused {frozen:.1f} s)" if isinstance(frozen, (int, float)) else ""
    return f"saved '{name}', {size}{took}{paused}"


def restored_line(meta: dict, in_place: bool = False) -> str:
    count = meta.get("execution_count")
    where = f" in {meta['notebook']}" if meta.get("notebook") else ""
    cell = f" after cell [{count}]" if count is not None else ""
    verb = "restored in place from" if in_place else "restored from"
    return f"{verb} '{meta.get('name', '?')}' taken at {format_time(meta.get('created'))}{where}{cell}"


def helper_restore_message(name: str | None) -> str:
    what = f"'{name}'" if name else "a checkpoint"
    return (f"%restore cannot replace this kernel with {what}: only a kernel started as "
            f"\"{CHECKPOINTABLE}\" can be restored in place (its parent process, nbcheckpoint's shim, "
            "does the restore; a kernel cannot replace itself). Switch this notebook to the "
            f"\"{CHECKPOINTABLE}\" kernel, or restore a checkpoint from a shell: "
            "`nbcheckpoint restore -D <checkpoint dir>/image --tcp-close --file-locks -d` "
            "once this kernel is shut down (%checkpoints shows where each one is).")


def helper_mode_note(name: str, command: str) -> str:
    return (f"note: this kernel is not \"{CHECKPOINTABLE}\", so nbcheckpoint took this checkpoint "
            "with a helper process: %restore and the \"restored\" return of %checkpoint need the "
            f"checkpointable kernel. To bring '{name}' back, shut this kernel down and run "
            f"`{command}` from a terminal (same ports, same connection file; reconnect the "
            "notebook to it).")
