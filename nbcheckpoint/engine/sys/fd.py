"""An fd the engine owns (trio's FdStream idea): it forgets its number once closed, so a
second close() is a no-op and can never close a number the kernel has handed out again."""
from __future__ import annotations

import os


class Fd:
    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed fd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """The number, now the caller's to close."""
        fd, self._fd = self._fd, -1
        return fd

    def __enter__(self) -> "Fd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fd({self._fd})" if self._fd >= 0 else "Fd(closed)"
