"""The process bench_engine.py checkpoints: N MiB of random data, then wait.

Run as a script, ``python engine_target.py MIB`` (stdout to a regular file,
stdin /dev/null, its own session: the engine cannot dump pipes or ttys yet).

It fills a bytearray with os.urandom, hashes it, prints ``READY <pid>
<fill_s> <hash_s>`` and then waits.  On every SIGUSR1 it hashes the data
again and prints ``PASS <hash_s>`` (or ``FAIL ...``): after a restore that
line says the process runs and its memory came back intact.  SIGTERM or
SIGKILL ends it.
"""
import hashlib
import os
import signal
import sys
import time

MIB = 1 << 20
CHUNK = 16 * MIB


def main() -> None:
    size = int(sys.argv[1]) * MIB
    t0 = time.monotonic()
    data = bytearray(size)
    view = memoryview(data)
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        view[off:off + n] = os.urandom(n)
    del view
    t1 = time.monotonic()
    digest = hashlib.sha256(data).digest()
    t2 = time.monotonic()

    asked = []
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
    print(f"READY {os.getpid()} {t1 - t0:.3f} {t2 - t1:.3f}", flush=True)
    while True:
        # A short sleep loop (not pause()): the engine restarts an
        # interrupted clock_nanosleep, and Python retries it on EINTR.
        time.sleep(0.005)
        if asked:
            asked.clear()
            t = time.monotonic()
            ok = hashlib.sha256(data).digest() == digest
            took = time.monotonic() - t
            print(f"{'PASS' if ok else 'FAIL'} {took:.3f} pid={os.getpid()}", flush=True)


if __name__ == "__main__":
    main()
