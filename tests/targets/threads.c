/* threads.c -- 4 worker threads: 2 producers and 2 consumers handing numbered items
 * through a bounded queue guarded by one mutex and two condvars (so when frozen, threads
 * are variously in futex waits, nanosleep, or user code).
 *
 * State checked: each thread's __thread values equal a function of its index; gettid()
 * still equals the tid recorded at start and pthread_self() is unchanged; glibc's cached
 * tid is right (pthread_kill(pthread_self()) lands in this very thread); per-producer
 * sequence numbers arrive exactly in order (no item lost or duplicated); after SIGUSR1
 * every thread keeps making progress.  Main waits for SIGUSR1 polling with nanosleep.
 */
#include "zdtm.h"
#include <pthread.h>
#include <stdint.h>

#define NTHREADS 4
#define NPROD 2
#define QCAP 16

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static uint64_t queue[QCAP];
static unsigned qhead, qlen;
static uint64_t next_expected[NPROD];

static volatile int stop, corrupt_now;
static volatile int error;
static char errmsg[512];

struct worker {
	int idx;
	pthread_t self;
	pid_t tid;
	volatile uint64_t ops;
	volatile int ok;
} workers[NTHREADS];

static __thread uint64_t tls_val;
static __thread int tls_idx = -1;
static __thread volatile pid_t tls_sig_tid;	/* set by the SIGUSR2 handler */

static uint64_t tls_expect(int idx) { return 0xabcd0000ull + idx * 0x1111ull; }

#include <stdarg.h>
static void set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_error(const char *fmt, ...)
{
	static volatile int claimed;
	if (__sync_lock_test_and_set(&claimed, 1))
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(errmsg, sizeof(errmsg), fmt, ap);
	va_end(ap);
	error = 1;
}

static void usr2_handler(int sig) { (void)sig; tls_sig_tid = zdtm_gettid(); }

/* Identity checks every thread runs often. */
static void check_identity(struct worker *w)
{
	if (tls_idx != w->idx || tls_val != tls_expect(w->idx))
		set_error("thread %d: TLS idx/value wrong (%d, %llx)", w->idx, tls_idx,
			  (unsigned long long)tls_val);
	if (zdtm_gettid() != w->tid)
		set_error("thread %d: gettid %d != recorded %d", w->idx, zdtm_gettid(), w->tid);
	if (!pthread_equal(pthread_self(), w->self))
		set_error("thread %d: pthread_self changed", w->idx);
}

static void check_cached_tid(struct worker *w)
{
	tls_sig_tid = 0;
	int r = pthread_kill(pthread_self(), SIGUSR2);	/* uses glibc's cached tid */
	if (r)
		set_error("thread %d: pthread_kill(self) failed: %d", w->idx, r);
	else if (tls_sig_tid != w->tid)
		set_error("thread %d: self-signal ran in tid %d, expected %d", w->idx,
			  (int)tls_sig_tid, w->tid);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	tls_idx = w->idx;
	tls_val = tls_expect(w->idx);
	w->tid = zdtm_gettid();
	w->self = pthread_self();
	uint64_t seq = 0;
	int producer = w->idx < NPROD;

	while (!stop) {
		if (corrupt_now && w->idx == 0)
			tls_val++;
		check_identity(w);
		if (w->ops % 256 == 0)
			check_cached_tid(w);

		pthread_mutex_lock(&lock);
		if (producer) {
			while (qlen == QCAP && !stop)
				pthread_cond_wait(&not_full, &lock);
			if (!stop) {
				queue[(qhead + qlen) % QCAP] = ((uint64_t)w->idx << 56) | seq++;
				qlen++;
				pthread_cond_signal(&not_empty);
			}
		} else {
			while (qlen == 0 && !stop)
				pthread_cond_wait(&not_empty, &lock);
			if (qlen) {
				uint64_t item = queue[qhead];
				qhead = (qhead + 1) % QCAP;
				qlen--;
				int p = item >> 56;
				uint64_t s = item & ((1ull << 56) - 1);
				if (p >= NPROD || s != next_expected[p])
					set_error("item from producer %d seq %llu, expected %llu", p,
						  (unsigned long long)s,
						  p < NPROD ? (unsigned long long)next_expected[p] : 0ull);
				else
					next_expected[p]++;
				pthread_cond_signal(&not_full);
			}
		}
		pthread_mutex_unlock(&lock);
		w->ops++;
		if (producer)
			usleep(200);	/* keeps the CPU cost low; queue often empty */
	}
	check_identity(w);
	check_cached_tid(w);
	w->ok = 1;
	return NULL;
}

int main(void)
{
	zdtm_init(0);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = usr2_handler;
	sigaction(SIGUSR2, &sa, NULL);

	pthread_t th[NTHREADS];
	for (int i = 0; i < NTHREADS; i++) {
		workers[i].idx = i;
		check(pthread_create(&th[i], NULL, worker_main, &workers[i]) == 0, "pthread_create");
	}
	/* wait until every thread has done some work */
	for (int i = 0; i < NTHREADS; i++)
		while (workers[i].ops < 50 && !error)
			msleep(1);
	check(!error, "%s", errmsg);
	ready();

	wait_usr1_polling();
	if (corrupt_requested())
		corrupt_now = 1;

	/* progress: every thread advances within a short window, a few times over */
	for (int round = 0; round < 3; round++) {
		uint64_t before[NTHREADS];
		for (int i = 0; i < NTHREADS; i++)
			before[i] = workers[i].ops;
		double t0 = now_mono();
		for (int i = 0; i < NTHREADS; i++)
			while (workers[i].ops < before[i] + 20) {
				check(now_mono() - t0 < 5, "thread %d (tid %d) made no progress: ops %llu",
				      i, workers[i].tid, (unsigned long long)workers[i].ops);
				msleep(1);
			}
	}
	stop = 1;
	pthread_mutex_lock(&lock);
	pthread_cond_broadcast(&not_empty);
	pthread_cond_broadcast(&not_full);
	pthread_mutex_unlock(&lock);
	for (int i = 0; i < NTHREADS; i++)
		pthread_join(th[i], NULL);
	check(!error, "%s", errmsg);
	for (int i = 0; i < NTHREADS; i++)
		check(workers[i].ok, "thread %d did not finish its checks", i);
	zdtm_msg("threads: items %llu + %llu", (unsigned long long)next_expected[0],
		 (unsigned long long)next_expected[1]);
	pass();
	return 0;
}
