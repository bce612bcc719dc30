"""%checkpoint, %restore and %checkpoints (registered by ``%load_ext nbcheckpoint``)."""
from __future__ import annotations

from IPython.core.magic import Magics, line_magic, magics_class

from . import core
from .messages import CheckpointError


@magics_class
class CheckpointMagics(Magics):

    @line_magic
    def checkpoint(self, line: str):
        """%checkpoint [--wait] [NAME] -- checkpoint this kernel (its whole process tree).

        Returns as soon as the kernel runs again ("checkpoint 'NAME' taken ..."), while
        its image is written in the background from a copy-on-write snapshot; with
        --wait, once the image is complete ("saved 'NAME' ...").  In every kernel later
        restored from this checkpoint it returns again ("restored from 'NAME' ...").
        Without NAME the checkpoint gets a name with the date and time.
        """
        args = line.split()
        wait = "--wait" in args
        args = [a for a in args if a != "--wait"]
        if len(args) > 1 or any(a.startswith("-") for a in args):
            raise CheckpointError(f"usage: %checkpoint [--wait] [NAME] (got {line.strip()!r})")
        core.get(self.shell).checkpoint(args[0] if args else None, wait=wait)

    @line_magic
    def restore(self, line: str):
        """%restore [NAME] -- replace this kernel, in place, by checkpoint NAME.

        The notebook stays connected; the next cell sees the checkpoint's variables.
        Without NAME: this kernel's latest checkpoint.  Needs the "Python 3
        (checkpointable)" kernel.  A missing or damaged checkpoint leaves this kernel as
        it was.
        """
        name = line.strip() or None
        core.get(self.shell).restore(name)

    @line_magic
    def checkpoints(self, line: str):
        """%checkpoints -- browse the checkpoint store: restore, delete, refresh."""
        from .browser import Browser
        from IPython.display import display
        b = Browser(core.get(self.shell))
        display(b)
