/* timers.c -- interval timers and POSIX timers keep firing after restore, with their ids.
 *
 *   ITIMER_REAL     50 ms interval, SIGALRM counted
 *   ITIMER_VIRTUAL  armed 1000 s, 1000 s interval (never fires here)
 *   POSIX timers    ids 0, 1 (deleted again: a gap), 2, 3:
 *     t0  CLOCK_MONOTONIC, SIGEV_SIGNAL SIGRTMIN, value &objs[0], 30 ms interval
 *     t2  CLOCK_REALTIME, SIGEV_THREAD_ID to thread T, SIGRTMIN+1, value &objs[2], 40 ms
 *     t3  CLOCK_BOOTTIME, SIGEV_NONE, one-shot 1000 s
 * Main waits in sigsuspend, T in pause loops.
 * After SIGUSR1: every id answers timer_gettime with its interval (id 1 is still gone and
 * t3 has at most 1000 s left), the itimers read back, and within 0.5 s each signal timer
 * fires several more times -- SIGRTMIN always with si_timerid 0 and &objs[0], SIGRTMIN+1
 * always in thread T with &objs[2].  A new timer gets an unused id.
 */
#include "zdtm.h"
#include <pthread.h>
#include <stdint.h>
#include <sys/time.h>

struct obj { int id; };
static struct obj objs[4] = { { 0 }, { 1 }, { 2 }, { 3 } };
static volatile int n_alrm, n_t0, n_t2, bad;
static volatile pid_t t_tid;
static char bad_why[256];
static volatile int t_stop;
static timer_t tid0, tid1, tid2, tid3;

static void set_bad(const char *why)
{
	if (!bad) {
		snprintf(bad_why, sizeof(bad_why), "%s", why);
		bad = 1;
	}
}

static void on_alrm(int sig) { (void)sig; n_alrm++; }

static void on_rt(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (si->si_code != SI_TIMER)
		set_bad("timer signal with si_code != SI_TIMER");
	if (sig == SIGRTMIN) {
		if (si->si_value.sival_ptr != &objs[0] || si->si_timerid != 0)
			set_bad("SIGRTMIN: wrong value or timer id");
		n_t0++;
	} else {
		if (si->si_value.sival_ptr != &objs[2] || si->si_timerid != 2)
			set_bad("SIGRTMIN+1: wrong value or timer id");
		if (zdtm_gettid() != t_tid)
			set_bad("SIGRTMIN+1 delivered to the wrong thread");
		n_t2++;
	}
}

static void *thread_t(void *arg)
{
	(void)arg;
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 1);
	pthread_sigmask(SIG_UNBLOCK, &s, NULL);
	t_tid = zdtm_gettid();
	while (!t_stop)
		pause();
	return NULL;
}

static long long ts_ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

int main(void)
{
	zdtm_init(1);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alrm;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGALRM, &sa, NULL);
	sa.sa_sigaction = on_rt;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGRTMIN, &sa, NULL);
	sigaction(SIGRTMIN + 1, &sa, NULL);
	/* SIGRTMIN+1 only in T */
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 1);
	sigprocmask(SIG_BLOCK, &s, NULL);

	pthread_t th;
	check(pthread_create(&th, NULL, thread_t, NULL) == 0, "pthread_create");
	while (!t_tid)
		msleep(1);

	struct sigevent se;
	memset(&se, 0, sizeof(se));
	se.sigev_notify = SIGEV_SIGNAL;
	se.sigev_signo = SIGRTMIN;
	se.sigev_value.sival_ptr = &objs[0];
	check(timer_create(CLOCK_MONOTONIC, &se, &tid0) == 0, "timer_create 0");
	se.sigev_value.sival_ptr = &objs[1];
	check(timer_create(CLOCK_MONOTONIC, &se, &tid1) == 0, "timer_create 1");
	memset(&se, 0, sizeof(se));
	se.sigev_notify = SIGEV_THREAD_ID;
	se._sigev_un._tid = t_tid;
	se.sigev_signo = SIGRTMIN + 1;
	se.sigev_value.sival_ptr = &objs[2];
	check(timer_create(CLOCK_REALTIME, &se, &tid2) == 0, "timer_create 2");
	memset(&se, 0, sizeof(se));
	se.sigev_notify = SIGEV_NONE;
	check(timer_create(CLOCK_BOOTTIME, &se, &tid3) == 0, "timer_create 3");
	check((long)tid0 == 0 && (long)tid1 == 1 && (long)tid2 == 2 && (long)tid3 == 3,
	      "timer ids %ld %ld %ld %ld", (long)tid0, (long)tid1, (long)tid2, (long)tid3);
	check(timer_delete(tid1) == 0, "timer_delete 1");

	struct itimerspec i0 = { { 0, 30000000 }, { 0, 30000000 } };
	struct itimerspec i2 = { { 0, 40000000 }, { 0, 40000000 } };
	struct itimerspec i3 = { { 0, 0 }, { 1000, 0 } };
	check(timer_settime(tid0, 0, &i0, NULL) == 0, "timer_settime 0");
	check(timer_settime(tid2, 0, &i2, NULL) == 0, "timer_settime 2");
	check(timer_settime(tid3, 0, &i3, NULL) == 0, "timer_settime 3");
	struct itimerval real = { { 0, 50000 }, { 0, 50000 } };
	struct itimerval virt = { { 1000, 0 }, { 1000, 0 } };
	check(setitimer(ITIMER_REAL, &real, NULL) == 0, "setitimer real");
	check(setitimer(ITIMER_VIRTUAL, &virt, NULL) == 0, "setitimer virtual");
	msleep(200);
	check(n_alrm > 0 && n_t0 > 0 && n_t2 > 0, "timers not firing: %d %d %d", n_alrm, n_t0, n_t2);
	ready();

	sigset_t wait_mask;
	sigprocmask(SIG_SETMASK, NULL, &wait_mask);
	sigdelset(&wait_mask, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&wait_mask);

	if (corrupt_requested())
		timer_delete(tid2);

	struct itimerspec cur;
	check(timer_gettime(tid0, &cur) == 0, "timer 0 is gone: %s", strerror(errno));
	check(ts_ns(cur.it_interval) == 30000000, "timer 0 interval %lld", ts_ns(cur.it_interval));
	check(timer_gettime(tid1, &cur) < 0 && errno == EINVAL, "deleted timer 1 exists again");
	check(timer_gettime(tid2, &cur) == 0, "timer 2 is gone: %s", strerror(errno));
	check(ts_ns(cur.it_interval) == 40000000, "timer 2 interval %lld", ts_ns(cur.it_interval));
	check(timer_gettime(tid3, &cur) == 0, "timer 3 is gone: %s", strerror(errno));
	check(ts_ns(cur.it_interval) == 0 && ts_ns(cur.it_value) > 900000000000LL &&
	      ts_ns(cur.it_value) <= 1000000000000LL, "timer 3 value %lld", ts_ns(cur.it_value));
	struct itimerval iv;
	check(getitimer(ITIMER_REAL, &iv) == 0 && iv.it_interval.tv_sec == 0 &&
	      iv.it_interval.tv_usec == 50000, "ITIMER_REAL interval");
	check(getitimer(ITIMER_VIRTUAL, &iv) == 0 && iv.it_interval.tv_sec == 1000 &&
	      iv.it_value.tv_sec <= 1000 && (iv.it_value.tv_sec || iv.it_value.tv_usec),
	      "ITIMER_VIRTUAL %ld.%06ld / %ld", (long)iv.it_value.tv_sec, (long)iv.it_value.tv_usec,
	      (long)iv.it_interval.tv_sec);

	int a = n_alrm, b = n_t0, c = n_t2;
	double t0 = now_mono();
	while (now_mono() - t0 < 0.5)
		msleep(10);	/* handlers interrupt and nanosleep restarts the rest */
	check(n_alrm - a >= 4, "SIGALRM: %d in 0.5 s after restore", n_alrm - a);
	check(n_t0 - b >= 5, "timer 0: %d signals in 0.5 s after restore", n_t0 - b);
	check(n_t2 - c >= 4, "timer 2: %d signals in 0.5 s after restore", n_t2 - c);
	check(!bad, "%s", bad_why);

	/* a new timer gets a fresh id (which one is the kernel's business after a restore) */
	timer_t t4;
	memset(&se, 0, sizeof(se));
	se.sigev_notify = SIGEV_NONE;
	check(timer_create(CLOCK_MONOTONIC, &se, &t4) == 0, "timer_create 4");
	check(t4 != tid0 && t4 != tid2 && t4 != tid3, "a new timer got a used id %ld", (long)t4);
	zdtm_msg("timers: %d SIGALRM, %d t0, %d t2", n_alrm, n_t0, n_t2);
	pass();
	return 0;
}
