/* zdtm.h -- tiny shared helpers for the ZDTM-style test targets.
 *
 * Protocol (see tests/conftest.py):
 *   set up state -> "READY\n" -> wait for SIGUSR1 -> verify -> "PASS\n" (exit 0)
 *                                                             or "FAIL: why\n" (exit 1)
 * stdout/stderr are a regular log file opened O_APPEND; every message is one write(2).
 * If the environment variable ZDTM_CORRUPT is set, the target damages its own state after
 * SIGUSR1 and before verifying, to prove that its checker can fail.
 */
#ifndef ZDTM_H
#define ZDTM_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static volatile sig_atomic_t zdtm_got_usr1;

static inline void zdtm_usr1_handler(int sig) { (void)sig; zdtm_got_usr1 = 1; }

static inline void zdtm_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline void zdtm_msg(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0) return;
	if (n > (int)sizeof(buf) - 2) n = sizeof(buf) - 2;
	if (n == 0 || buf[n - 1] != '\n') buf[n++] = '\n';
	ssize_t w = write(1, buf, n);
	(void)w;
}

/* Report a failure and exit 1. */
#define fail(...) do { char _m[900]; snprintf(_m, sizeof(_m), __VA_ARGS__); \
	zdtm_msg("FAIL: %s", _m); exit(1); } while (0)
/* Check a condition; on failure report file:line and the message. */
#define check(cond, ...) do { if (!(cond)) { char _c[700]; snprintf(_c, sizeof(_c), __VA_ARGS__); \
	fail("%s:%d: %s (%s)", __FILE__, __LINE__, _c, #cond); } } while (0)

static inline void pass(void) { zdtm_msg("PASS"); exit(0); }
static inline void ready(void) { zdtm_msg("READY"); }
static inline int corrupt_requested(void) { return getenv("ZDTM_CORRUPT") != NULL; }
static inline pid_t zdtm_gettid(void) { return (pid_t)syscall(SYS_gettid); }

/* Install the SIGUSR1 handler (no SA_RESTART: it must interrupt blocking calls).
 * If block is set, SIGUSR1 is also blocked so that it can be waited for race-free
 * with sigsuspend/ppoll/sigwaitinfo. */
static inline void zdtm_init(int block)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = zdtm_usr1_handler;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL)) { zdtm_msg("FAIL: sigaction: %s", strerror(errno)); exit(1); }
	if (block) {
		sigset_t s;
		sigemptyset(&s);
		sigaddset(&s, SIGUSR1);
		sigprocmask(SIG_BLOCK, &s, NULL);
	}
}

static inline void msleep(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) && errno == EINTR) ;
}

static inline double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Poll-wait (short nanosleeps) for SIGUSR1. */
static inline void wait_usr1_polling(void)
{
	while (!zdtm_got_usr1) msleep(10);
}

#endif
