"""pipe_stdin.py -- reads its stdin to EOF after SIGUSR1.

Run by the harness stdin is /dev/null; tests/test_pipes.py runs it with stdin on a pipe whose
write end the test holds (an *external* pipe: its other end is outside the dump).
After SIGUSR1 it reads stdin until EOF (fails if none comes within 10 s) and reports what it
read as "GOT <hex>" before PASS; the test checks that.  ZDTM_CORRUPT: it does not wait for EOF.
"""
import os
import select
import signal
import sys
import threading
import time


def say(msg):
    os.write(1, (msg + "\n").encode())


def main():
    got_usr1 = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: got_usr1.set())
    say("READY")
    while not got_usr1.is_set():
        time.sleep(0.02)
    data = bytearray()
    deadline = time.monotonic() + 10
    while True:
        if os.environ.get("ZDTM_CORRUPT"):
            say("FAIL: corrupted: did not wait for EOF")
            return 1
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([0], [], [], left)[0]:
            say(f"FAIL: no EOF on stdin within 10 s (read {bytes(data)!r})")
            return 1
        chunk = os.read(0, 65536)
        if not chunk:
            break
        data.extend(chunk)
    say(f"GOT {bytes(data).hex()}")
    say("PASS")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any crash is a FAIL with a reason
        say(f"FAIL: {type(e).__name__}: {e}")
        sys.exit(1)
