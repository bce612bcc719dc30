"""mppool.py -- a multiprocessing Pool (fork) survives: worker processes, the pipes and
POSIX semaphores (deleted /dev/shm files) between them, the pool's handler threads.
After restore the same workers (same PIDs) compute new tasks."""
import multiprocessing as mp
import os
import signal
import sys
import time

go = False


def on_usr1(sig, frame):
    global go
    go = True


def square(x):
    return x * x, os.getpid()


def main():
    signal.signal(signal.SIGUSR1, on_usr1)
    ctx = mp.get_context("fork")
    pool = ctx.Pool(2)
    res = pool.map(square, range(20))
    workers = sorted({pid for _, pid in res} | {p.pid for p in pool._pool})
    assert [r for r, _ in res] == [x * x for x in range(20)]
    print("READY", flush=True)
    while not go:
        time.sleep(0.01)
    if os.environ.get("ZDTM_CORRUPT"):
        workers = workers[1:]       # forget a worker: the check must notice it
    res = pool.map(square, range(100, 140), chunksize=1)
    if [r for r, _ in res] != [x * x for x in range(100, 140)]:
        print("FAIL: wrong results", flush=True)
        sys.exit(1)
    now = sorted({p.pid for p in pool._pool})
    if now != sorted(p.pid for p in pool._pool) or not set(now) <= set(workers):
        print(f"FAIL: workers changed {workers} -> {now}", flush=True)
        sys.exit(1)
    pool.close()
    pool.join()
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
