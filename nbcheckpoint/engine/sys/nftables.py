"""nftables through libnftables (the library behind nft(8)), loaded on first use.

One :class:`Nft` is one libnftables context, and so one netlink socket for its whole life
(nft_ctx_new opens it).  That matters for tables with ``flags owner`` (Linux >= 5.12,
nft(8) "TABLES"): such a table belongs to the socket that made it and is deleted by the
kernel when that socket closes -- when the context is freed, or when the process dies.
"""
from __future__ import annotations

import ctypes

from ..errors import EngineError

_lib = None


class NftError(EngineError):
    """Raised by Nft.run: libnftables refused a command (its message is in the text), or the
    library is not installed."""


def _load():
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError as e:
            raise NftError(f"libnftables is not installed ({e}); install nftables "
                           "(Debian: apt-get install nftables)") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _lib = lib
    return _lib


def available() -> str | None:
    """None if libnftables can be used here, else why not."""
    try:
        _load()
    except NftError as e:
        return str(e)
    return None


class Nft:
    def __init__(self):
        lib = _load()
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._ctx = ctx

    def run(self, commands: str) -> str:
        """Run nft commands (one transaction); their output.  NftError on failure."""
        if not self._ctx:
            raise NftError("this nftables context is closed")
        lib = _load()
        rc = lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        if rc != 0:
            err = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace").strip()
            raise NftError(f"nftables refused {commands.strip()!r}: {err or f'error {rc}'}")
        return (lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")

    def close(self) -> None:
        """Free the context: the tables it owns ("flags owner") go with its socket."""
        if self._ctx:
            _load().nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Nft":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
