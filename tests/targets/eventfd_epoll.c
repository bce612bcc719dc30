/* eventfd_epoll.c -- eventfds (counts, EFD_SEMAPHORE, O_NONBLOCK) and epolls whose
 * registrations carry pointers as their data words; a thread blocked in epoll_wait.
 *
 *   e_cnt   count 7                        e_sem  count 3, EFD_SEMAPHORE | EFD_NONBLOCK
 *   e_big   count 0x123456789 (> 32 bits)  e_wake count 0, watched by ep_thr
 *   e_os    EPOLLONESHOT, fired once before READY (so disabled)
 *   e_x     EPOLLEXCLUSIVE                 tfd    timerfd, periodic 20 ms
 *   e_dup   registered as fd N, then dup'ed and N closed; N reused by e_reuse
 *           (not registered): the registration lives on under the old number
 *   ep      watches e_cnt (LT, &obj[0]), e_sem (ET, &obj[1]), e_big (&obj[2]), e_os (&obj[3]),
 *           e_x (&obj[4]), tfd (0xdeadbeefcafebabe), e_dup (&obj[5]); ep_thr watches e_wake
 *           (&obj[6]) and is nested in ep (data 0x1122334455667788)
 *   thread  blocked in epoll_wait(ep_thr, -1)
 * After SIGUSR1: ep's and ep_thr's registrations (fd, events, data) read back from
 * /proc/self/fdinfo as before; the thread is still blocked and wakes with &obj[6] when main
 * writes e_wake; counts and semaphore mode are intact; the fired oneshot stays disabled;
 * the timerfd keeps firing through ep; e_dup's registration reports through the old
 * number, e_reuse's writes report nothing.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>

#define MAXREG 32

struct obj { int id; char pad[60]; };
static struct obj obj[8];

static int e_cnt, e_sem, e_big, e_wake, e_os, e_x, e_dup, e_dup_old, e_reuse, tfd, ep, ep_thr;
static volatile pid_t thr_tid;
static volatile int thr_woke;
static volatile uint64_t thr_data;
static volatile int thr_eintr;

struct reg { int tfd; unsigned events; unsigned long long data; };

/* The registrations of an epoll fd, from our own fdinfo, sorted by (fd, data). */
static int read_regs(int efd, struct reg *out)
{
	char path[64], buf[8192];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", efd);
	int fd = open(path, O_RDONLY);
	check(fd >= 0, "open %s", path);
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	check(n > 0, "read %s", path);
	buf[n] = 0;
	int k = 0;
	for (char *p = strstr(buf, "tfd:"); p && k < MAXREG; p = strstr(p + 1, "tfd:")) {
		check(sscanf(p, "tfd: %d events: %x data: %llx", &out[k].tfd, &out[k].events,
			     &out[k].data) == 3, "parse %s", p);
		k++;
	}
	for (int i = 0; i < k; i++)
		for (int j = i + 1; j < k; j++)
			if (out[j].tfd < out[i].tfd || (out[j].tfd == out[i].tfd && out[j].data < out[i].data)) {
				struct reg t = out[i]; out[i] = out[j]; out[j] = t;
			}
	return k;
}

static void add(int efd, int fd, unsigned events, uint64_t data)
{
	struct epoll_event ev = { .events = events, .data.u64 = data };
	check(epoll_ctl(efd, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD %d: %s", fd, strerror(errno));
}

static void *thread_fn(void *arg)
{
	(void)arg;
	thr_tid = zdtm_gettid();
	struct epoll_event ev;
	int r;
	do {
		r = epoll_wait(ep_thr, &ev, 1, -1);
		if (r < 0 && errno == EINTR)
			thr_eintr++;	/* a freeze interrupts it: like any app, wait again */
	} while (r < 0 && errno == EINTR);
	if (r == 1)
		thr_data = ev.data.u64;
	thr_woke = r == 1 ? 1 : -1;
	return NULL;
}

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

static int in_epoll_wait(pid_t tid)
{
	long nr = blocked_in(tid);
	return nr == SYS_epoll_wait || nr == SYS_epoll_pwait || nr == 441 /* epoll_pwait2 */;
}

static uint64_t rd(int fd)
{
	uint64_t v = 0;
	check(read(fd, &v, 8) == 8, "read eventfd %d: %s", fd, strerror(errno));
	return v;
}

static void wr(int fd, uint64_t v)
{
	check(write(fd, &v, 8) == 8, "write eventfd %d: %s", fd, strerror(errno));
}

/* Wait up to ms for events on ep; returns how many, fills evs. */
static int poll_ep(struct epoll_event *evs, int max, int ms)
{
	int r;
	do r = epoll_wait(ep, evs, max, ms); while (r < 0 && errno == EINTR);
	check(r >= 0, "epoll_wait: %s", strerror(errno));
	return r;
}

static int has_data(struct epoll_event *evs, int n, uint64_t data)
{
	for (int i = 0; i < n; i++)
		if (evs[i].data.u64 == data)
			return 1;
	return 0;
}

int main(void)
{
	zdtm_init(1);
	for (int i = 0; i < 8; i++)
		obj[i].id = i;
	e_cnt = eventfd(7, 0);
	e_sem = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK);
	e_big = eventfd(0, EFD_CLOEXEC);
	wr(e_big, 0x123456789ULL);
	e_wake = eventfd(0, 0);
	e_os = eventfd(1, EFD_NONBLOCK);
	e_x = eventfd(0, 0);
	e_dup_old = eventfd(0, EFD_NONBLOCK);
	tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	ep = epoll_create1(0);
	ep_thr = epoll_create1(EPOLL_CLOEXEC);
	check(e_cnt >= 0 && e_sem >= 0 && e_big >= 0 && e_wake >= 0 && e_os >= 0 && e_x >= 0 &&
	      e_dup_old >= 0 && tfd >= 0 && ep >= 0 && ep_thr >= 0, "create: %s", strerror(errno));
	struct itimerspec its = { { 0, 20000000 }, { 0, 20000000 } };
	check(timerfd_settime(tfd, 0, &its, NULL) == 0, "timerfd_settime");

	add(ep, e_cnt, EPOLLIN, (uintptr_t)&obj[0]);
	add(ep, e_sem, EPOLLIN | EPOLLET, (uintptr_t)&obj[1]);
	add(ep, e_big, EPOLLIN | EPOLLOUT, (uintptr_t)&obj[2]);
	add(ep, e_os, EPOLLIN | EPOLLONESHOT, (uintptr_t)&obj[3]);
	add(ep, e_x, EPOLLIN | EPOLLEXCLUSIVE, (uintptr_t)&obj[4]);
	add(ep, tfd, EPOLLIN, 0xdeadbeefcafebabeULL);
	add(ep, e_dup_old, EPOLLIN, (uintptr_t)&obj[5]);
	add(ep_thr, e_wake, EPOLLIN, (uintptr_t)&obj[6]);
	add(ep, ep_thr, EPOLLIN, 0x1122334455667788ULL);
	/* the registration stays keyed by e_dup_old's number after that fd is gone */
	e_dup = dup(e_dup_old);
	close(e_dup_old);
	e_reuse = eventfd(0, EFD_NONBLOCK);
	check(e_reuse == e_dup_old, "eventfd did not reuse fd %d (got %d)", e_dup_old, e_reuse);

	/* consume the oneshot (and the edge of the ET registration) */
	struct epoll_event evs[16];
	int n = poll_ep(evs, 16, 0);
	check(has_data(evs, n, (uintptr_t)&obj[3]), "oneshot did not fire");
	check(has_data(evs, n, (uintptr_t)&obj[1]), "ET registration did not fire");
	n = poll_ep(evs, 16, 0);
	check(!has_data(evs, n, (uintptr_t)&obj[3]), "oneshot fired twice");

	struct reg before[MAXREG], before_thr[MAXREG], after[MAXREG], after_thr[MAXREG];
	int nb = read_regs(ep, before), nbt = read_regs(ep_thr, before_thr);
	check(nb == 8 && nbt == 1, "%d / %d registrations", nb, nbt);

	pthread_t th;
	check(pthread_create(&th, NULL, thread_fn, NULL) == 0, "pthread_create");
	while (!thr_tid)
		msleep(1);
	double t0 = now_mono();
	while (!in_epoll_wait(thr_tid)) {
		check(now_mono() - t0 < 10, "thread never blocked in epoll_wait (%ld)", blocked_in(thr_tid));
		msleep(5);
	}
	ready();

	sigset_t wait_mask;
	sigprocmask(SIG_SETMASK, NULL, &wait_mask);
	sigdelset(&wait_mask, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&wait_mask);

	if (corrupt_requested()) {
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 42 };
		epoll_ctl(ep, EPOLL_CTL_MOD, e_cnt, &ev);
	}

	/* the registrations, exactly */
	int na = read_regs(ep, after), nat = read_regs(ep_thr, after_thr);
	check(na == nb && nat == nbt, "registrations: %d / %d now, %d / %d before", na, nat, nb, nbt);
	for (int i = 0; i < na; i++)
		check(after[i].tfd == before[i].tfd && after[i].events == before[i].events &&
		      after[i].data == before[i].data,
		      "registration %d: fd %d events %#x data %#llx, was fd %d events %#x data %#llx", i,
		      after[i].tfd, after[i].events, after[i].data, before[i].tfd, before[i].events,
		      before[i].data);
	check(after_thr[0].tfd == before_thr[0].tfd && after_thr[0].data == before_thr[0].data &&
	      after_thr[0].events == before_thr[0].events, "ep_thr registration changed");

	/* flags */
	check(!(fcntl(e_cnt, F_GETFL) & O_NONBLOCK), "e_cnt became non-blocking");
	check(fcntl(e_sem, F_GETFL) & O_NONBLOCK, "e_sem lost O_NONBLOCK");
	check(fcntl(e_big, F_GETFD) & FD_CLOEXEC, "e_big lost FD_CLOEXEC");
	check(!(fcntl(e_cnt, F_GETFD) & FD_CLOEXEC), "e_cnt got FD_CLOEXEC");
	check(fcntl(ep_thr, F_GETFD) & FD_CLOEXEC, "ep_thr lost FD_CLOEXEC");

	/* level-triggered readiness with the right data words; the oneshot stays disabled */
	n = poll_ep(evs, 16, 0);
	check(has_data(evs, n, (uintptr_t)&obj[0]), "e_cnt not reported ready");
	check(has_data(evs, n, (uintptr_t)&obj[2]), "e_big not reported ready");
	check(!has_data(evs, n, (uintptr_t)&obj[3]), "disabled oneshot reported");
	check(!has_data(evs, n, (uintptr_t)&obj[4]), "e_x reported while empty");
	check(!has_data(evs, n, (uintptr_t)&obj[5]), "e_dup reported while empty");
	check(!has_data(evs, n, 0x1122334455667788ULL), "ep_thr reported while empty");

	/* the blocked thread is still blocked and wakes on e_wake */
	check(thr_woke == 0, "thread woke before e_wake was written (%d)", thr_woke);
	t0 = now_mono();
	while (!in_epoll_wait(thr_tid)) {
		check(now_mono() - t0 < 5, "thread not back in epoll_wait (%ld)", blocked_in(thr_tid));
		msleep(5);
	}
	wr(e_wake, 1);
	t0 = now_mono();
	while (!thr_woke) {
		check(now_mono() - t0 < 5, "thread did not wake after e_wake was written");
		msleep(1);
	}
	pthread_join(th, NULL);
	check(thr_woke == 1 && thr_data == (uintptr_t)&obj[6], "thread woke with data %#llx (want %p)",
	      (unsigned long long)thr_data, (void *)&obj[6]);
	n = poll_ep(evs, 16, 0);
	check(has_data(evs, n, 0x1122334455667788ULL), "nested ep_thr not reported after e_wake");
	rd(e_wake);

	/* counts and semaphore mode */
	check(rd(e_cnt) == 7, "e_cnt count");
	check(rd(e_big) == 0x123456789ULL, "e_big count");
	for (int i = 0; i < 3; i++)
		check(rd(e_sem) == 1, "semaphore read %d", i);
	uint64_t v;
	check(read(e_sem, &v, 8) < 0 && errno == EAGAIN, "semaphore not exhausted after 3 reads");
	check(rd(e_os) == 1, "e_os count");

	/* writes report with the right data; the oneshot stays disabled; e_reuse is not watched */
	wr(e_x, 5);
	wr(e_dup, 9);
	wr(e_reuse, 1);
	wr(e_os, 1);
	n = poll_ep(evs, 16, 0);
	check(has_data(evs, n, (uintptr_t)&obj[4]), "e_x write not reported");
	check(has_data(evs, n, (uintptr_t)&obj[5]), "e_dup write not reported through its old fd number");
	check(!has_data(evs, n, (uintptr_t)&obj[3]), "disabled oneshot reported after a write");
	for (int i = 0; i < n; i++)
		for (int j = 0; j < 8; j++)
			check(evs[i].data.u64 != (uintptr_t)&obj[j] || obj[j].id == j, "bad object");

	/* the timerfd keeps firing through ep */
	t0 = now_mono();
	int seen = 0;
	while (!seen) {
		check(now_mono() - t0 < 2, "timerfd never reported through epoll");
		n = poll_ep(evs, 16, 100);
		seen = has_data(evs, n, 0xdeadbeefcafebabeULL);
	}
	check(rd(tfd) >= 1, "timerfd ticks");
	zdtm_msg("eventfd_epoll: thread EINTRs %d", thr_eintr);
	pass();
	return 0;
}
