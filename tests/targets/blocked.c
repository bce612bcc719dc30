/* blocked.c -- every thread is blocked inside a syscall when frozen.
 *
 *   waiter:  FUTEX_WAIT (no timeout) on a word that only main changes after SIGUSR1
 *   sleeper: nanosleep(2 s) in a loop, checking each sleep really lasted >= 2 s
 *   main:    sigsuspend() with SIGUSR1 unblocked only in the temporary mask
 * READY is printed only once /proc shows both threads inside those syscalls.
 * After SIGUSR1: main's own signal mask is the one from before sigsuspend (SIGUSR1 blocked
 * again), the waiter is still asleep until main FUTEX_WAKEs it and then wakes, and the
 * sleeper completes another full sleep.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdint.h>

#define SLEEP_S 2

static uint32_t futex_word;
static volatile pid_t waiter_tid, sleeper_tid;
static volatile int waiter_woke, waiter_spurious;
static volatile int sleeps_done, sleeper_stop;
static volatile int bad_sleep;
static volatile double bad_elapsed;

static long futex(uint32_t *uaddr, int op, uint32_t val)
{
	return syscall(SYS_futex, uaddr, op, val, NULL, NULL, 0);
}

static void *waiter(void *arg)
{
	(void)arg;
	waiter_tid = zdtm_gettid();
	while (__atomic_load_n(&futex_word, __ATOMIC_ACQUIRE) == 0) {
		long r = futex(&futex_word, FUTEX_WAIT_PRIVATE, 0);
		if (r != 0 && __atomic_load_n(&futex_word, __ATOMIC_ACQUIRE) == 0)
			waiter_spurious++;	/* EINTR/EAGAIN: fine, but counted */
	}
	waiter_woke = 1;
	return NULL;
}

static void *sleeper(void *arg)
{
	(void)arg;
	sleeper_tid = zdtm_gettid();
	while (!sleeper_stop) {
		double t0 = now_mono();
		struct timespec req = { SLEEP_S, 0 }, rem;
		for (;;) {
			rem = req;	/* if an EINTR comes without rem written, sleep it all again */
			if (nanosleep(&req, &rem) == 0)
				break;
			if (errno != EINTR) { bad_sleep = 2; break; }
			req = rem;
		}
		double dt = now_mono() - t0;
		if (dt < SLEEP_S - 0.001) {
			bad_sleep = 1;
			bad_elapsed = dt;
		}
		sleeps_done++;
	}
	return NULL;
}

/* First field of /proc/self/task/TID/syscall is the syscall number the thread is blocked in. */
static long blocked_in(pid_t tid)
{
	char path[64], buf[256];
	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", tid);
	int fd = open(path, O_RDONLY);
	if (fd < 0) return -2;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0) return -2;
	buf[n] = 0;
	return strtol(buf, NULL, 10);
}

static void wait_blocked(pid_t tid, long nr, const char *what)
{
	double t0 = now_mono();
	while (blocked_in(tid) != nr) {
		check(now_mono() - t0 < 10, "%s (tid %d) never blocked in syscall %ld (at %ld)", what,
		      tid, nr, blocked_in(tid));
		msleep(5);
	}
}

int main(void)
{
	zdtm_init(1);	/* SIGUSR1 blocked; sigsuspend unblocks it */
	pthread_t tw, ts;
	check(pthread_create(&tw, NULL, waiter, NULL) == 0, "pthread_create");
	check(pthread_create(&ts, NULL, sleeper, NULL) == 0, "pthread_create");
	while (!waiter_tid || !sleeper_tid)
		msleep(1);
	wait_blocked(waiter_tid, SYS_futex, "futex waiter");
	wait_blocked(sleeper_tid, SYS_clock_nanosleep, "sleeper");	/* glibc nanosleep */
	ready();

	sigset_t wait_mask;
	sigprocmask(SIG_SETMASK, NULL, &wait_mask);
	sigdelset(&wait_mask, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&wait_mask);

	sigset_t cur;
	sigprocmask(SIG_SETMASK, NULL, &cur);
	check(sigismember(&cur, SIGUSR1), "SIGUSR1 not blocked after sigsuspend returned");

	/* the waiter must still be asleep: nothing has changed the word yet */
	check(!waiter_woke, "futex waiter woke up before being woken");
	msleep(50);
	check(!waiter_woke, "futex waiter woke up before being woken");
	check(blocked_in(waiter_tid) == SYS_futex, "waiter not in futex wait (in %ld)",
	      blocked_in(waiter_tid));

	__atomic_store_n(&futex_word, 1, __ATOMIC_RELEASE);
	if (!corrupt_requested())
		futex(&futex_word, FUTEX_WAKE_PRIVATE, 1);
	double t0 = now_mono();
	while (!waiter_woke) {
		check(now_mono() - t0 < 3, "futex waiter did not wake up after FUTEX_WAKE");
		msleep(1);
	}
	pthread_join(tw, NULL);

	int done = sleeps_done;
	t0 = now_mono();
	while (sleeps_done < done + 1) {
		check(now_mono() - t0 < SLEEP_S * 3, "sleeper stuck: sleeps %d", sleeps_done);
		msleep(10);
	}
	sleeper_stop = 1;
	pthread_join(ts, NULL);
	check(!bad_sleep, "a nanosleep returned early (%s, %.3f s)",
	      bad_sleep == 2 ? "error" : "too short", bad_elapsed);
	zdtm_msg("blocked: spurious futex returns %d, sleeps %d", waiter_spurious, sleeps_done);
	pass();
	return 0;
}
