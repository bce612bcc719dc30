"""pybig.py -- a CPython target: many threads, a large heap.

State checked: 8 threads each bump their own counter in a loop with short sleeps (so when
frozen they are in nanosleep/futex waits for the GIL, or running bytecode); a 200 MB
bytearray of random data whose sha256 is taken at set-up.  Main waits for SIGUSR1 in a
time.sleep loop.  After SIGUSR1: every thread is alive and its counter keeps advancing,
the counters never went backwards, and the buffer's sha256 is unchanged.
Protocol as the C targets: READY / PASS / FAIL: why (exit 0/1); ZDTM_CORRUPT damages the
buffer before verifying.  Optional argv[1]: buffer size in MB (default 200).
"""
import hashlib
import os
import signal
import sys
import threading
import time

NTHREADS = 8


def say(msg):
    os.write(1, (msg + "\n").encode())


def fail(msg):
    say("FAIL: " + msg)
    os._exit(1)


def main():
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    got_usr1 = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: got_usr1.set())

    buf = bytearray(size_mb * 1024 * 1024)
    chunk = 1024 * 1024
    for off in range(0, len(buf), chunk):
        buf[off:off + chunk] = os.urandom(chunk)
    digest = hashlib.sha256(buf).hexdigest()

    counters = [0] * NTHREADS
    stop = threading.Event()
    errors = []

    def worker(i):
        last = -1
        while not stop.is_set():
            if counters[i] <= last:
                errors.append(f"thread {i}: counter went from {last} to {counters[i]}")
            last = counters[i]
            counters[i] += 1
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(i,), name=f"w{i}", daemon=True)
               for i in range(NTHREADS)]
    for t in threads:
        t.start()
    while min(counters) < 10:
        time.sleep(0.01)
    say("READY")

    while not got_usr1.is_set():
        time.sleep(0.05)

    if os.environ.get("ZDTM_CORRUPT"):
        buf[len(buf) // 2] ^= 1

    for rnd in range(3):
        before = list(counters)
        deadline = time.monotonic() + 10
        while any(counters[i] < before[i] + 5 for i in range(NTHREADS)):
            if time.monotonic() > deadline:
                stuck = [i for i in range(NTHREADS) if counters[i] < before[i] + 5]
                fail(f"threads {stuck} made no progress (counters {counters})")
            time.sleep(0.01)
    dead = [t.name for t in threads if not t.is_alive()]
    if dead:
        fail(f"threads died: {dead}")
    if errors:
        fail(errors[0])
    if hashlib.sha256(buf).hexdigest() != digest:
        fail("sha256 of the buffer changed")
    stop.set()
    for t in threads:
        t.join(5)
    say(f"pybig: counters {counters}")
    say("PASS")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any crash is a FAIL with a reason
        fail(f"{type(e).__name__}: {e}")
