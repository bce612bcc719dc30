/* signals.c -- signal dispositions, blocked masks and pending signals (shared and
 * thread-private, standard and queued real-time with payloads).
 *
 * Set-up: handlers for SIGUSR2 (SA_RESTART, sa_mask {SIGINT}), SIGRTMIN+1 (SA_SIGINFO |
 * SA_RESTART, sa_mask {SIGTERM}), SIGRTMIN+3 (SA_SIGINFO | SA_NODEFER), SIGINT
 * (SA_RESETHAND); SIGHUP ignored.  SIGUSR2, SIGRTMIN+1, SIGRTMIN+3 blocked in all threads.
 * Pending: SIGUSR2 queued twice (standard: one instance), SIGRTMIN+1 queued 5 times with
 * payloads 101..105 (process-wide), and to thread T only: SIGRTMIN+3 twice with
 * pthread_sigqueue (301, 302) and once with tgkill.  Main waits in sigwaitinfo(SIGUSR1).
 * After SIGUSR1: the dispositions read back the same; masks and pending sets are the same
 * in each thread; on unblocking, every handler runs the right number of times, in the right
 * thread, with the right payloads in order; SIGHUP is still ignored; SA_RESETHAND works.
 */
#include "zdtm.h"
#include <pthread.h>

#define NRT1 5

static volatile int usr2_count, int_count;
static volatile int rt1_count, rt1_val[16], rt1_code[16], rt1_pid[16], rt1_tid[16];
static volatile int rt3_count, rt3_val[16], rt3_code[16], rt3_pid[16], rt3_tid[16];
static volatile pid_t t_tid;
static volatile int t_go, t_done;
static char t_err[512];

static void usr2_handler(int sig) { (void)sig; usr2_count++; }
static void int_handler(int sig) { (void)sig; int_count++; }

static void rt1_handler(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	int i = rt1_count++;
	if (i < 16) {
		rt1_val[i] = si->si_value.sival_int;
		rt1_code[i] = si->si_code;
		rt1_pid[i] = si->si_pid;
		rt1_tid[i] = zdtm_gettid();
	}
}

static void rt3_handler(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	int i = rt3_count++;
	if (i < 16) {
		rt3_val[i] = si->si_code == SI_QUEUE ? si->si_value.sival_int : -1;
		rt3_code[i] = si->si_code;
		rt3_pid[i] = si->si_pid;
		rt3_tid[i] = zdtm_gettid();
	}
}

struct disp {
	int sig;
	void *handler;		/* sa_handler / sa_sigaction, or SIG_IGN */
	int flags;
	int mask_sig;		/* the one signal in sa_mask, or 0 */
};
static struct disp disps[5];

static void set_disp(int i, int sig, void *handler, int flags, int mask_sig)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;	/* same storage as sa_sigaction */
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	if (mask_sig)
		sigaddset(&sa.sa_mask, mask_sig);
	check(sigaction(sig, &sa, NULL) == 0, "sigaction(%d)", sig);
	disps[i] = (struct disp){ sig, handler, flags, mask_sig };
}

static void check_disps(void)
{
	for (int i = 0; i < 5; i++) {
		struct disp *d = &disps[i];
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		check(sigaction(d->sig, NULL, &sa) == 0, "sigaction query %d", d->sig);
		check((void *)sa.sa_handler == d->handler, "signal %d: handler %p, expected %p",
		      d->sig, (void *)sa.sa_handler, d->handler);
		if (d->handler == (void *)SIG_IGN)
			continue;
		check((sa.sa_flags & ~0x04000000 /* SA_RESTORER */) == d->flags,
		      "signal %d: sa_flags %#x, expected %#x", d->sig, sa.sa_flags, d->flags);
		for (int s = 1; s <= SIGRTMAX; s++)
			check(sigismember(&sa.sa_mask, s) == (s == d->mask_sig),
			      "signal %d: sa_mask has %d wrong", d->sig, s);
	}
}

/* Check the set of signals among `sigs` that are in `set`. */
static int set_matches(const sigset_t *set, const int *sigs, const int *want, int n, char *why)
{
	for (int i = 0; i < n; i++)
		if (sigismember(set, sigs[i]) != want[i]) {
			sprintf(why, "signal %d %s", sigs[i], want[i] ? "missing" : "unexpected");
			return 0;
		}
	return 1;
}

static void *thread_t(void *arg)
{
	(void)arg;
	t_tid = zdtm_gettid();
	while (!t_go)
		msleep(5);
	int sigs[] = { SIGUSR1, SIGUSR2, SIGRTMIN + 1, SIGRTMIN + 3, SIGHUP };
	sigset_t s;
	char why[128];
	sigprocmask(SIG_SETMASK, NULL, &s);
	int mask_want[] = { 1, 1, 1, 1, 0 };
	if (!set_matches(&s, sigs, mask_want, 5, why)) {
		snprintf(t_err, sizeof(t_err), "thread T mask: %s", why);
		t_done = 1;
		return NULL;
	}
	sigpending(&s);		/* thread-private + shared */
	int pend_want[] = { 0, 1, 1, 1, 0 };
	if (!set_matches(&s, sigs, pend_want, 5, why)) {
		snprintf(t_err, sizeof(t_err), "thread T pending: %s", why);
		t_done = 1;
		return NULL;
	}
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 3);
	pthread_sigmask(SIG_UNBLOCK, &s, NULL);	/* the 3 instances run here */
	t_done = 1;
	return NULL;
}

int main(void)
{
	zdtm_init(1);
	pid_t me = getpid();
	set_disp(0, SIGUSR2, (void *)usr2_handler, SA_RESTART, SIGINT);
	set_disp(1, SIGRTMIN + 1, (void *)rt1_handler, SA_SIGINFO | SA_RESTART, SIGTERM);
	set_disp(2, SIGRTMIN + 3, (void *)rt3_handler, SA_SIGINFO | SA_NODEFER, 0);
	set_disp(3, SIGINT, (void *)int_handler, SA_RESETHAND, 0);
	set_disp(4, SIGHUP, (void *)SIG_IGN, 0, 0);

	sigset_t blk;
	sigemptyset(&blk);
	sigaddset(&blk, SIGUSR2);
	sigaddset(&blk, SIGRTMIN + 1);
	sigaddset(&blk, SIGRTMIN + 3);
	sigprocmask(SIG_BLOCK, &blk, NULL);

	pthread_t th;
	check(pthread_create(&th, NULL, thread_t, NULL) == 0, "pthread_create");
	while (!t_tid)
		msleep(1);

	check(sigqueue(me, SIGUSR2, (union sigval){ .sival_int = 7 }) == 0, "sigqueue");
	check(sigqueue(me, SIGUSR2, (union sigval){ .sival_int = 8 }) == 0, "sigqueue");
	for (int i = 0; i < NRT1; i++)
		check(sigqueue(me, SIGRTMIN + 1, (union sigval){ .sival_int = 101 + i }) == 0,
		      "sigqueue rt");
	check(pthread_sigqueue(th, SIGRTMIN + 3, (union sigval){ .sival_int = 301 }) == 0, "psq");
	check(pthread_sigqueue(th, SIGRTMIN + 3, (union sigval){ .sival_int = 302 }) == 0, "psq");
	check(syscall(SYS_tgkill, me, t_tid, SIGRTMIN + 3) == 0, "tgkill");
	kill(me, SIGHUP);	/* ignored: discarded, never pending */

	int sigs[] = { SIGUSR1, SIGUSR2, SIGRTMIN + 1, SIGRTMIN + 3, SIGHUP };
	int pend_want[] = { 0, 1, 1, 0, 0 };
	sigset_t s;
	char why[128];
	sigpending(&s);
	check(set_matches(&s, sigs, pend_want, 5, why), "main pending before READY: %s", why);
	ready();

	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	while (sigwaitinfo(&usr1, NULL) != SIGUSR1)
		;

	if (corrupt_requested())
		sigqueue(me, SIGRTMIN + 1, (union sigval){ .sival_int = 106 });

	check_disps();
	int mask_want[] = { 1, 1, 1, 1, 0 };
	sigprocmask(SIG_SETMASK, NULL, &s);
	check(set_matches(&s, sigs, mask_want, 5, why), "main mask: %s", why);
	sigpending(&s);
	check(set_matches(&s, sigs, pend_want, 5, why), "main pending: %s", why);
	check(usr2_count == 0 && rt1_count == 0 && rt3_count == 0, "a handler ran too early");

	t_go = 1;
	pthread_join(th, NULL);
	check(!t_err[0], "%s", t_err);
	check(rt3_count == 3, "SIGRTMIN+3 delivered %d times, expected 3", rt3_count);
	/* SA_NODEFER lets the kernel stack all three frames at once, so the handlers run in
	 * reverse order: check each arrived exactly once (queue order is checked on RTMIN+1). */
	int seen301 = 0, seen302 = 0, seen_tkill = 0;
	for (int i = 0; i < 3; i++) {
		seen301 += rt3_val[i] == 301 && rt3_code[i] == SI_QUEUE;
		seen302 += rt3_val[i] == 302 && rt3_code[i] == SI_QUEUE;
		seen_tkill += rt3_code[i] == SI_TKILL;
		check(rt3_pid[i] == me, "SIGRTMIN+3 #%d: si_pid %d", i, rt3_pid[i]);
		check(rt3_tid[i] == t_tid, "SIGRTMIN+3 #%d ran in tid %d, not T %d", i, rt3_tid[i],
		      t_tid);
	}
	check(seen301 == 1 && seen302 == 1 && seen_tkill == 1,
	      "SIGRTMIN+3 payloads: %d/%d %d/%d %d/%d", rt3_val[0], rt3_code[0], rt3_val[1],
	      rt3_code[1], rt3_val[2], rt3_code[2]);
	check(usr2_count == 0 && rt1_count == 0, "shared signal went to thread T");

	sigprocmask(SIG_UNBLOCK, &blk, NULL);	/* SIGUSR2 then SIGRTMIN+1 x5 run here */
	check(usr2_count == 1, "SIGUSR2 delivered %d times, expected 1", usr2_count);
	check(rt1_count == NRT1, "SIGRTMIN+1 delivered %d times, expected %d", rt1_count, NRT1);
	for (int i = 0; i < NRT1; i++) {
		check(rt1_val[i] == 101 + i && rt1_code[i] == SI_QUEUE,
		      "SIGRTMIN+1 #%d: value %d code %d", i, rt1_val[i], rt1_code[i]);
		check(rt1_pid[i] == me && rt1_tid[i] == me, "SIGRTMIN+1 #%d: pid %d tid %d", i,
		      rt1_pid[i], rt1_tid[i]);
	}

	raise(SIGHUP);		/* must still be ignored */
	raise(SIGINT);		/* SA_RESETHAND: runs once, then back to SIG_DFL */
	check(int_count == 1, "SIGINT handler ran %d times", int_count);
	struct sigaction sa;
	sigaction(SIGINT, NULL, &sa);
	check(sa.sa_handler == SIG_DFL, "SIGINT not reset by SA_RESETHAND");
	sigpending(&s);
	for (int i = 1; i <= SIGRTMAX; i++)
		check(!sigismember(&s, i), "signal %d still pending at the end", i);
	pass();
	return 0;
}
