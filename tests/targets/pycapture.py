"""pycapture.py -- ipykernel's stdout/stderr capture, in miniature.

os.pipe(); the write end dup2'd onto fds 1 and 2 (the original stdout is kept as a dup, for
the protocol messages, as ipykernel keeps one); a thread reads the read end and collects
everything; main keeps printing numbered lines (print() to sys.stdout, and os.write to fd 2),
so a dump catches data in flight in the pipe, the reader blocked in read(), or both.
After SIGUSR1: main prints some more and closes fds 1 and 2; the reader must see EOF, and
what it read must be exactly every line printed, in order, each once.
Protocol as the C targets: READY / PASS / FAIL: why (exit 0/1) -- on the dup'd stdout.
ZDTM_CORRUPT: one line is recorded as printed but never written.
"""
import os
import signal
import sys
import threading
import time

log_fd = os.dup(1)


def say(msg):
    os.write(log_fd, (msg + "\n").encode())


def fail(msg):
    say("FAIL: " + msg)
    os._exit(1)


def main():
    got_usr1 = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: got_usr1.set())

    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)

    captured = bytearray()
    nbytes = [0]
    eof = threading.Event()

    def reader():
        while True:
            data = os.read(r, 1024)
            if not data:
                break
            captured.extend(data)
            nbytes[0] += len(data)
            time.sleep(0.002)     # a slow reader: bursts pile up in the pipe
        eof.set()

    t = threading.Thread(target=reader, name="capture", daemon=True)
    t.start()

    expected = bytearray()
    i = 0

    def emit():
        nonlocal i
        line = f"line {i} " + "x" * (i % 97) + "\n"
        if i % 3 == 2:
            os.write(2, line.encode())
        else:
            print(line, end="", flush=True)
        expected.extend(line.encode())
        i += 1

    while i < 200:
        emit()
    say("READY")
    while not got_usr1.is_set():
        emit()
        if i % 300 == 0:
            time.sleep(0.05)
    for _ in range(100):
        emit()
    if os.environ.get("ZDTM_CORRUPT"):
        expected.extend(b"never written\n")
    sys.stdout.flush()
    os.close(1)
    os.close(2)
    if not eof.wait(20):
        fail(f"no EOF on the capture pipe (read {nbytes[0]} of {len(expected)} bytes)")
    if bytes(captured) != bytes(expected):
        n = next((k for k in range(min(len(captured), len(expected))) if captured[k] != expected[k]),
                 min(len(captured), len(expected)))
        fail(f"captured {len(captured)} bytes, printed {len(expected)}; first difference at {n}: "
             f"{bytes(captured[n:n + 40])!r} vs {bytes(expected[n:n + 40])!r}")
    say(f"pycapture: {i} lines, {nbytes[0]} bytes captured")
    say("PASS")
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any crash is a FAIL with a reason
        fail(f"{type(e).__name__}: {e}")
