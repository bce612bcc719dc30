"""IPython's history database around a checkpoint: no write may be under way in the image."""
from __future__ import annotations

import sqlite3
import threading
import time

from .messages import CheckpointError


def flush_history(shell) -> None:
    """Write IPython's pending history now, so no transaction is open at the checkpoint.

    The history is written by a background thread; caught in the middle of a transaction
    the image would hold the database's -journal file, deleted right after, and such an
    image cannot be restored (the file it had open is gone).  writeout_cache takes the
    lock the saving thread writes under, so when it returns no write is in progress and
    nothing is left for the thread to write.  A failed write raises CheckpointError: it
    leaves no such guarantee.  Callable from any thread.
    """
    hm = getattr(shell, "history_manager", None)
    if hm is None or not getattr(hm, "enabled", False) or str(hm.hist_file) == ":memory:":
        return
    try:
        # a connection of our own: IPython's (hm.db) works only in the thread that opened it
        conn = sqlite3.connect(hm.hist_file, **getattr(hm, "connection_options", {}))
        try:
            hm.writeout_cache(conn)
        finally:
            conn.close()
    except Exception as e:
        raise CheckpointError(
            f"cannot checkpoint: IPython could not write its history to {hm.hist_file} ({e}); an image "
            "taken now could hold that database in the middle of a write and could not be restored. "
            "Make the file writable (or close what holds it locked), then checkpoint again.") from None


def quiesce_history(shell):
    """From any thread: make sure no history write is under way or starts for a while.

    Waits until IPython's history cache is written out and no write holds its locks, then
    raises the cache size so that new lines stay in memory (the saving thread is not woken).
    Returns a function that puts things back, or None when there is no history.
    """
    hm = getattr(shell, "history_manager", None)
    if hm is None or not getattr(hm, "enabled", False):
        return None
    deadline = time.monotonic() + 5.0
    while True:
        with hm.db_input_cache_lock, hm.db_output_cache_lock:
            if (not hm.db_input_cache and not hm.db_output_cache) or time.monotonic() > deadline:
                with _quiet_lock:
                    if _quiet[0] == 0:
                        _quiet[1] = hm.db_cache_size
                        hm.db_cache_size = 1 << 30
                    _quiet[0] += 1
                break
        hm.save_flag.set()                   # let the saving thread write what is cached
        time.sleep(0.01)

    def resume():
        with _quiet_lock:
            _quiet[0] -= 1
            if _quiet[0]:
                return                       # another quiet period is still on
            hm.db_cache_size = _quiet[1]
        if hm.db_input_cache or hm.db_output_cache:
            hm.save_flag.set()
    return resume


_quiet = [0, 0]                  # quiet periods under way, the cache size to go back to
_quiet_lock = threading.Lock()


def new_history_session(shell) -> None:
    """A restored kernel writes its history under a new session number.

    The original kernel went on numbering lines in the session the image knows; the
    restored one would collide with them in IPython's history database.
    """
    hm = getattr(shell, "history_manager", None)
    if hm is None or not getattr(hm, "enabled", False):
        return
    try:
        with hm.db_input_cache_lock:
            hm.db_input_cache = []
        with hm.db_output_cache_lock:
            hm.db_output_cache = []
        hm.new_session()
    except Exception:
        pass
