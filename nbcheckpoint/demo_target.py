"""The process `nbcheckpoint demo` checkpoints and restores.

Run as a script (``python demo_target.py LOG``), not with ``-m``, so the
target stays a plain interpreter that imports only the standard library.
It builds state that pickling cannot save or that a re-run would lose:
counters that keep counting, 256 MB of data, a running thread, a generator
half-way through.  On SIGUSR1 it appends one JSON line with that state to
LOG; SIGTERM ends it.
"""
import hashlib
import json
import os
import signal
import struct
import sys
import threading
import time

MB = 1 << 20
DATA_SIZE = 256 * MB
PAGE = 4096


def make_data() -> bytearray:
    # A random 1 MiB block repeated, each page stamped with its index: quick
    # to build (urandom is slow here), and a page restored at the wrong
    # address changes the hash.
    block = os.urandom(MB)
    data = bytearray(DATA_SIZE)
    for off in range(0, DATA_SIZE, MB):
        data[off:off + MB] = block
    for i in range(DATA_SIZE // PAGE):
        struct.pack_into("<Q", data, i * PAGE, i)
    return data


def numbers():
    n = 0
    while True:
        yield n
        n += 1


def main() -> None:
    log = open(sys.argv[1], "a", buffering=1)
    counters = {"ticks": 0, "beats": 0}
    token = os.urandom(8).hex()        # differs on every real start
    data = make_data()
    gen = numbers()
    for _ in range(50):                # half-consumed: next item is 50
        next(gen)

    def beat():
        while True:
            counters["beats"] += 1
            time.sleep(0.02)

    worker = threading.Thread(target=beat, name="beater", daemon=True)
    worker.start()

    asked = []
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def state(event: str) -> None:
        log.write(json.dumps({
            "event": event, "pid": os.getpid(), "token": token,
            "ticks": counters["ticks"], "beats": counters["beats"],
            "thread_alive": worker.is_alive(), "gen_next": next(gen),
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
        }) + "\n")

    state("ready")
    while True:
        time.sleep(0.02)
        counters["ticks"] += 1
        if asked:
            asked.clear()
            state("state")


if __name__ == "__main__":
    main()
