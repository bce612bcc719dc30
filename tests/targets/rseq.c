/* rseq.c -- glibc's per-thread rseq registration (glibc >= 2.35 registers every thread).
 *
 * Two threads (main and one more) each loop: pin themselves to CPU a, then CPU b (from the
 * initial affinity set), and check that cpu_id in their rseq area (thread pointer +
 * __rseq_offset) follows, compared with the raw getcpu syscall -- NOT sched_getcpu(),
 * which in glibc >= 2.35 itself reads rseq cpu_id.  A stale, unregistered area would keep
 * its last cpu_id and fail as soon as the thread moves.  They also re-register the same
 * area with the same length and signature, which the kernel answers EBUSY only if exactly
 * that registration is active (EINVAL if another one is; success if none).
 */
#include "zdtm.h"
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/rseq.h>

static int cpus[2], ncpus;
static volatile int stop, corrupt_now;
static volatile unsigned long rounds[2];
static char err[2][512];

static struct rseq *rseq_area(void)
{
	return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

/* The length glibc passed to rseq(2).  NOT __rseq_size: since the glibc fix backported to
 * Debian 12's 2.36 (and upstream 2.40), __rseq_size is the feature size (20), while the
 * area is still registered with the original 32-byte length (the kernel minimum). */
static unsigned registered_len(void)
{
	return __rseq_size < 32 ? 32 : __rseq_size;
}

static int raw_getcpu(void)
{
	unsigned cpu = ~0u;
	syscall(SYS_getcpu, &cpu, NULL, NULL);
	return cpu;
}

/* 0 if the registration of this thread is exactly glibc's; else writes why. */
static int check_registered(char *why, size_t n)
{
	long r = syscall(SYS_rseq, rseq_area(), registered_len(), 0, RSEQ_SIG);
	if (r == -1 && errno == EBUSY)
		return 0;
	if (r == 0)
		snprintf(why, n, "rseq was NOT registered (registering it again succeeded)");
	else
		snprintf(why, n, "rseq re-register gave %s (a different registration is active?)",
			 strerror(errno));
	return -1;
}

static int check_round(int who)
{
	char *why = err[who];
	for (int k = 0; k < ncpus; k++) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpus[k], &set);
		if (sched_setaffinity(0, sizeof(set), &set)) {
			snprintf(why, 512, "sched_setaffinity(%d): %s", cpus[k], strerror(errno));
			return -1;
		}
		int raw = raw_getcpu();
		int rs = (int)__atomic_load_n(&rseq_area()->cpu_id, __ATOMIC_RELAXED);
		int rs_start = (int)__atomic_load_n(&rseq_area()->cpu_id_start, __ATOMIC_RELAXED);
		cpu_set_t now;
		if (sched_getaffinity(0, sizeof(now), &now) == 0 &&
		    (CPU_COUNT(&now) != 1 || !CPU_ISSET(cpus[k], &now))) {
			/* frozen between setaffinity and here: the pinning itself was lost */
			snprintf(why, 512, "thread %d: CPU affinity lost: pinned to CPU %d, mask now "
				 "has %d CPUs", who, cpus[k], CPU_COUNT(&now));
			return -1;
		}
		if (raw != cpus[k] || rs != raw || rs_start != raw) {
			snprintf(why, 512, "thread %d pinned to CPU %d: getcpu %d, rseq cpu_id %d, "
				 "cpu_id_start %d", who, cpus[k], raw, rs, rs_start);
			return -1;
		}
	}
	return 0;
}

static void simulate_lost_registration(void)
{
	/* what an engine that forgets to re-register rseq would leave behind */
	uint32_t cpu = rseq_area()->cpu_id;
	syscall(SYS_rseq, rseq_area(), registered_len(), RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
	rseq_area()->cpu_id = cpu;
	rseq_area()->cpu_id_start = cpu;
}

static void *loop(void *arg)
{
	int who = (int)(intptr_t)arg;
	int corrupted = 0;
	while (!stop && !err[who][0]) {
		if (corrupt_now && !corrupted) {
			simulate_lost_registration();
			corrupted = 1;
		}
		if (check_round(who) == 0)
			rounds[who]++;
		usleep(500);
	}
	if (!err[who][0])
		check_registered(err[who], sizeof(err[who]));	/* writes err only on failure */
	return NULL;
}

/* After SIGUSR1: wait until thread `who` (1) has done 20 more good rounds. */
static void wait_rounds(int who)
{
	unsigned long r0 = rounds[who];
	double t0 = now_mono();
	while (rounds[who] < r0 + 20 && !err[who][0] && now_mono() - t0 < 5)
		msleep(1);
	if (!err[who][0] && rounds[who] < r0 + 20)
		snprintf(err[who], 512, "thread %d made no progress", who);
}

int main(void)
{
	zdtm_init(0);
	check(__rseq_size > 0, "glibc did not register rseq (__rseq_size 0; tunable off?)");
	cpu_set_t set;
	sched_getaffinity(0, sizeof(set), &set);
	for (int c = 0; c < CPU_SETSIZE && ncpus < 2; c++)
		if (CPU_ISSET(c, &set))
			cpus[ncpus++] = c;
	char why[256];
	check(check_registered(why, sizeof(why)) == 0, "before READY: %s", why);

	pthread_t th;
	check(pthread_create(&th, NULL, loop, (void *)1) == 0, "pthread_create");
	while (rounds[1] < 10 && !err[1][0])
		msleep(1);
	check(!err[1][0], "%s", err[1]);
	for (int i = 0; i < 10; i++)
		check(check_round(0) == 0, "%s", err[0]);
	ready();

	while (!zdtm_got_usr1) {	/* main keeps migrating until SIGUSR1 */
		check(check_round(0) == 0, "%s", err[0]);
		rounds[0]++;
		usleep(500);
	}
	if (corrupt_requested()) {
		corrupt_now = 1;
		simulate_lost_registration();
	}
	for (int i = 0; i < 20; i++) {
		check(check_round(0) == 0, "%s", err[0]);
		usleep(500);
	}
	wait_rounds(1);
	check(!err[1][0], "%s", err[1]);
	check(check_registered(why, sizeof(why)) == 0, "main: %s", why);
	stop = 1;
	pthread_join(th, NULL);
	check(!err[1][0], "%s", err[1]);
	zdtm_msg("rseq: %d cpus (%d, %d), rounds %lu/%lu, __rseq_size %u, __rseq_offset %ld",
		 ncpus, cpus[0], cpus[ncpus - 1], rounds[0], rounds[1], __rseq_size,
		 (long)__rseq_offset);
	pass();
	return 0;
}
