/* timerfd_signalfd.c -- timerfds (relative, periodic, absolute, with unread ticks) and
 * signalfds.
 *
 *   t_per   CLOCK_MONOTONIC, periodic 100 ms, blocking
 *   t_abs   CLOCK_REALTIME, TFD_TIMER_ABSTIME one-shot at now + 60 s, O_NONBLOCK
 *   t_tick  CLOCK_BOOTTIME one-shot 1 ms, expired before READY: 1 unread tick, O_NONBLOCK
 *   t_off   CLOCK_MONOTONIC, never armed
 *   t_long  CLOCK_MONOTONIC relative one-shot 30 s, interval 7 s
 *   s_fd    signalfd for {SIGUSR2, SIGRTMIN+1}, O_NONBLOCK; both blocked; SIGUSR2 pending
 *   s_fd2   signalfd for {SIGHUP}, blocking, FD_CLOEXEC
 * After SIGUSR1: clocks (via fdinfo), intervals and flags read back; t_abs still expires at
 * the same wall-clock time; t_long has at most 30 s left; t_tick has exactly one tick; t_off
 * is disarmed; t_per keeps ticking; s_fd delivers the pending SIGUSR2, then a queued
 * SIGRTMIN+1 with its value; s_fd2's mask is {SIGHUP} and it does not see SIGUSR2.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

static int t_per, t_abs, t_tick, t_off, t_long, s_fd, s_fd2;

static long long ts_ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

static long long now_ns(clockid_t c)
{
	struct timespec t;
	clock_gettime(c, &t);
	return ts_ns(t);
}

/* A field of our own fdinfo ("clockid", "sigmask" ...) as text. */
static void fdinfo_field(int fd, const char *key, char *out, size_t len)
{
	char path[64], buf[4096];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	int f = open(path, O_RDONLY);
	check(f >= 0, "open %s", path);
	ssize_t n = read(f, buf, sizeof(buf) - 1);
	close(f);
	check(n > 0, "read %s", path);
	buf[n] = 0;
	char *p = strstr(buf, key);
	check(p, "%s has no %s", path, key);
	p += strlen(key);
	while (*p == ':' || *p == ' ' || *p == '\t')
		p++;
	size_t k = strcspn(p, "\n");
	if (k >= len)
		k = len - 1;
	memcpy(out, p, k);
	out[k] = 0;
}

static uint64_t ticks(int fd)
{
	uint64_t v = 0;
	ssize_t r = read(fd, &v, 8);
	if (r < 0 && errno == EAGAIN)
		return 0;
	check(r == 8, "read timerfd %d: %s", fd, strerror(errno));
	return v;
}

int main(void)
{
	zdtm_init(1);
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	sigaddset(&m, SIGRTMIN + 1);
	sigaddset(&m, SIGHUP);
	sigprocmask(SIG_BLOCK, &m, NULL);

	t_per = timerfd_create(CLOCK_MONOTONIC, 0);
	t_abs = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
	t_tick = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK);
	t_off = timerfd_create(CLOCK_MONOTONIC, 0);
	t_long = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
	check(t_per >= 0 && t_abs >= 0 && t_tick >= 0 && t_off >= 0 && t_long >= 0, "timerfd_create");

	struct itimerspec per = { { 0, 100000000 }, { 0, 100000000 } };
	check(timerfd_settime(t_per, 0, &per, NULL) == 0, "settime per");
	long long deadline = now_ns(CLOCK_REALTIME) + 60 * 1000000000LL;
	struct itimerspec abs = { { 0, 0 }, { deadline / 1000000000LL, deadline % 1000000000LL } };
	check(timerfd_settime(t_abs, TFD_TIMER_ABSTIME, &abs, NULL) == 0, "settime abs");
	struct itimerspec once = { { 0, 0 }, { 0, 1000000 } };
	check(timerfd_settime(t_tick, 0, &once, NULL) == 0, "settime tick");
	struct itimerspec lng = { { 7, 0 }, { 30, 0 } };
	check(timerfd_settime(t_long, 0, &lng, NULL) == 0, "settime long");
	msleep(20);	/* t_tick expires, unread */

	sigset_t sm;
	sigemptyset(&sm);
	sigaddset(&sm, SIGUSR2);
	sigaddset(&sm, SIGRTMIN + 1);
	s_fd = signalfd(-1, &sm, SFD_NONBLOCK);
	sigset_t sm2;
	sigemptyset(&sm2);
	sigaddset(&sm2, SIGHUP);
	s_fd2 = signalfd(-1, &sm2, SFD_CLOEXEC);
	check(s_fd >= 0 && s_fd2 >= 0, "signalfd: %s", strerror(errno));
	kill(getpid(), SIGUSR2);

	char mask_before[64], mask2_before[64];
	fdinfo_field(s_fd, "sigmask", mask_before, sizeof(mask_before));
	fdinfo_field(s_fd2, "sigmask", mask2_before, sizeof(mask2_before));
	ready();

	sigset_t wait_mask;
	sigprocmask(SIG_SETMASK, NULL, &wait_mask);
	sigdelset(&wait_mask, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&wait_mask);

	if (corrupt_requested())
		timerfd_settime(t_abs, 0, &once, NULL);

	/* clocks and flags */
	char buf[64];
	struct { int fd; const char *clock; int nonblock; int cloexec; } want[] = {
		{ t_per, "1", 0, 0 }, { t_abs, "0", 1, 0 }, { t_tick, "7", 1, 0 },
		{ t_off, "1", 0, 0 }, { t_long, "1", 0, 1 },
	};
	for (int i = 0; i < 5; i++) {
		fdinfo_field(want[i].fd, "clockid", buf, sizeof(buf));
		check(strcmp(buf, want[i].clock) == 0, "timerfd %d: clockid %s, want %s", i, buf, want[i].clock);
		check(!!(fcntl(want[i].fd, F_GETFL) & O_NONBLOCK) == want[i].nonblock, "timerfd %d O_NONBLOCK", i);
		check(!!(fcntl(want[i].fd, F_GETFD) & FD_CLOEXEC) == want[i].cloexec, "timerfd %d FD_CLOEXEC", i);
	}
	fdinfo_field(t_abs, "settime flags", buf, sizeof(buf));
	check(strtol(buf, NULL, 8) & TFD_TIMER_ABSTIME, "t_abs lost TFD_TIMER_ABSTIME (flags %s)", buf);

	/* the absolute timer still expires at its wall-clock deadline */
	struct itimerspec cur;
	check(timerfd_gettime(t_abs, &cur) == 0, "gettime abs");
	long long at = now_ns(CLOCK_REALTIME) + ts_ns(cur.it_value);
	check(cur.it_value.tv_sec || cur.it_value.tv_nsec, "t_abs disarmed");
	check(llabs(at - deadline) < 50000000LL, "t_abs deadline moved by %lld ms",
	      (at - deadline) / 1000000);
	check(ticks(t_abs) == 0, "t_abs fired early");

	/* relative one-shot with interval: at most 30 s left, interval 7 s */
	check(timerfd_gettime(t_long, &cur) == 0, "gettime long");
	check(cur.it_interval.tv_sec == 7 && cur.it_interval.tv_nsec == 0, "t_long interval");
	check(ts_ns(cur.it_value) > 0 && ts_ns(cur.it_value) <= 30000000000LL, "t_long value %lld",
	      ts_ns(cur.it_value));

	/* the unread tick, exactly one */
	check(timerfd_gettime(t_tick, &cur) == 0, "gettime tick");
	check(!cur.it_value.tv_sec && !cur.it_value.tv_nsec, "t_tick re-armed");
	uint64_t tk = ticks(t_tick);
	check(tk == 1, "t_tick: %llu ticks, want 1", (unsigned long long)tk);
	check(ticks(t_tick) == 0, "t_tick: a second read had ticks");

	/* never armed */
	check(timerfd_gettime(t_off, &cur) == 0, "gettime off");
	check(!cur.it_value.tv_sec && !cur.it_value.tv_nsec && !cur.it_interval.tv_sec &&
	      !cur.it_interval.tv_nsec, "t_off armed");

	/* periodic keeps ticking, with its interval */
	check(timerfd_gettime(t_per, &cur) == 0, "gettime per");
	check(cur.it_interval.tv_sec == 0 && cur.it_interval.tv_nsec == 100000000, "t_per interval");
	ticks(t_per);		/* whatever piled up */
	double t0 = now_mono();
	uint64_t got = 0;
	while (got < 3)
		got += ticks(t_per);
	double dt = now_mono() - t0;
	check(dt > 0.15 && dt < 1.0, "3 periodic ticks took %.3f s", dt);

	/* signalfds */
	char mask_after[64], mask2_after[64];
	fdinfo_field(s_fd, "sigmask", mask_after, sizeof(mask_after));
	fdinfo_field(s_fd2, "sigmask", mask2_after, sizeof(mask2_after));
	check(strcmp(mask_before, mask_after) == 0, "s_fd sigmask %s, was %s", mask_after, mask_before);
	check(strcmp(mask2_before, mask2_after) == 0, "s_fd2 sigmask %s, was %s", mask2_after, mask2_before);
	check(fcntl(s_fd, F_GETFL) & O_NONBLOCK, "s_fd lost O_NONBLOCK");
	check(fcntl(s_fd2, F_GETFD) & FD_CLOEXEC, "s_fd2 lost FD_CLOEXEC");
	struct pollfd pfd = { s_fd2, POLLIN, 0 };
	check(poll(&pfd, 1, 0) == 0, "s_fd2 readable without SIGHUP pending");

	struct signalfd_siginfo si;
	check(read(s_fd, &si, sizeof(si)) == sizeof(si), "s_fd: pending SIGUSR2 not delivered: %s",
	      strerror(errno));
	check(si.ssi_signo == SIGUSR2, "s_fd read signal %u, want SIGUSR2", si.ssi_signo);
	check(read(s_fd, &si, sizeof(si)) < 0 && errno == EAGAIN, "s_fd: more than one signal");
	union sigval sv = { .sival_int = 4242 };
	check(sigqueue(getpid(), SIGRTMIN + 1, sv) == 0, "sigqueue");
	check(read(s_fd, &si, sizeof(si)) == sizeof(si), "s_fd: SIGRTMIN+1 not read");
	check(si.ssi_signo == (unsigned)SIGRTMIN + 1 && si.ssi_int == 4242, "s_fd read %u/%d",
	      si.ssi_signo, si.ssi_int);
	kill(getpid(), SIGHUP);
	check(read(s_fd2, &si, sizeof(si)) == sizeof(si) && si.ssi_signo == SIGHUP, "s_fd2: SIGHUP");
	pass();
	return 0;
}
