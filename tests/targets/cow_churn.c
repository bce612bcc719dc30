/* cow_churn.c [A_MIB [STATIC_MIB]] -- memory that never stops changing, for the
 * copy-on-write snapshot of --leave-running dumps (nbcheckpoint/engine/snapshot.py).
 *
 * The main thread writes its memory in an endless loop, one step at a time; each region
 * has a step counter, stored after the step's writes, from which the whole content of the
 * region follows.  An image must therefore be one instant of this loop: a page saved
 * earlier or later than the counters breaks the invariant.
 *
 *   A        A_MIB (default 8) anon private: page j of round r holds V(r, j) in every word;
 *            a step writes the next page of the ring with the next round
 *   B        64 pages anon: each round is MADV_DONTNEED of the region, then the pages one by
 *            one (a page not yet written is zero again)
 *   C        32 pages, a fresh mmap every round: filled, made current, the old one unmapped
 *   D        64 pages MADV_DONTFORK, a ring like A (a fork does not have it)
 *   E        64 pages MADV_WIPEONFORK, a ring like A (a fork sees it empty)
 *   F        cow_churn.dat (64 pages, in the cwd) mapped MAP_PRIVATE rw: the even pages are
 *            a ring like A (copied on write), the odd ones stay the file's page cache
 *   S        STATIC_MIB (default 0) anon, written once, never again
 * Before each write a ring checks that the page holds what the counters say (so a restored
 * image that mixes instants is caught as soon as the loop gets there).  A second thread
 * ticks every millisecond and keeps the longest gap between two ticks: SIGUSR2 makes it
 * print "GAP <seconds> <ticks> <CLOCK_MONOTONIC at its end>" and start again (how long the
 * process was frozen).  The
 * loop also checks that getpid() is still the pid it started with: a copy of the process
 * running this code would say "DUPLICATE".
 * After SIGUSR1 the loop stops between two steps and every region is checked in full
 * against its counter.  ZDTM_CORRUPT flips a word of A first.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>

#define PG 4096ul
#define WORDS (PG / 8)
#define MIB (1024ul * 1024)

static uint64_t V(uint64_t tag, uint64_t r, uint64_t j) { return (tag << 56) | (r << 24) | (j + 1); }
static uint64_t FILEV(uint64_t j) { return V(0x46, 0xfffff, j); }     /* F's file content */

struct ring {
	const char *name;
	uint64_t tag;
	unsigned char *base;
	size_t npages;
	size_t stride;		/* in pages: F writes every other page */
	int file;		/* round 0 is the file's content, not zero */
	volatile uint64_t c;	/* steps done */
};

static struct ring A = { "A", 0x41 }, D = { "D", 0x44 }, E = { "E", 0x45 }, F = { "F", 0x46 };
static volatile uint64_t cB, cC;
static unsigned char *B, *C;
static volatile unsigned char *Ccur;
static unsigned char *S;
static size_t nS;
enum { NB = 64, NC = 32, ND = 64, NE = 64, NF = 64 };

static char first_error[512];
static volatile unsigned long errors;
static pid_t my_pid;

static void error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void error(const char *fmt, ...)
{
	if (!errors++) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(first_error, sizeof(first_error), fmt, ap);
		va_end(ap);
	}
}

static uint64_t *page(unsigned char *base, size_t j) { return (uint64_t *)(base + j * PG); }

/* What page j of a ring holds in round r (0: before its first write). */
static uint64_t ring_val(struct ring *g, uint64_t r, size_t j)
{
	if (r == 0)
		return g->file ? FILEV(j * g->stride) : 0;
	return V(g->tag, r, j);
}

/* Does the page hold `want` in every word?  Reports the first difference. */
static int page_is(uint64_t *p, uint64_t want, const char *what, size_t j, uint64_t c)
{
	for (size_t w = 0; w < WORDS; w++)
		if (p[w] != want) {
			error("%s page %zu word %zu holds %#llx, expected %#llx (step counter %llu)", what, j, w,
			      (unsigned long long)p[w], (unsigned long long)want, (unsigned long long)c);
			return 0;
		}
	return 1;
}

static void ring_step(struct ring *g)
{
	uint64_t c = g->c;
	size_t j = c % g->npages;
	uint64_t r = c / g->npages + 1;
	uint64_t *p = page(g->base, j * g->stride);
	page_is(p, ring_val(g, r - 1, j), g->name, j * g->stride, c);
	uint64_t v = ring_val(g, r, j);
	for (size_t w = 0; w < WORDS; w++)
		p[w] = v;
	g->c = c + 1;
}

static void ring_check(struct ring *g)
{
	uint64_t c = g->c;
	for (size_t j = 0; j < g->npages; j++) {
		uint64_t rounds = c / g->npages + (j < c % g->npages);	/* writes of page j so far */
		page_is(page(g->base, j * g->stride), ring_val(g, rounds, j), g->name, j * g->stride, c);
	}
	if (g->file)		/* the pages it never writes are the file's */
		for (size_t j = 1; j < NF; j += 2)
			page_is(page(g->base, j), FILEV(j), "F (clean)", j, c);
}

/* B: round r (1-based) = MADV_DONTNEED, then pages 0..NB-1 with V(r). */
static void b_state(uint64_t c, uint64_t *r, uint64_t *q) { *r = c / (NB + 1); *q = c % (NB + 1); }

static uint64_t b_expected(uint64_t c, size_t j)
{
	uint64_t r, q;
	b_state(c, &r, &q);
	if (q == 0)
		return r ? V(0x42, r, j) : 0;
	return j + 1 < q ? V(0x42, r + 1, j) : 0;
}

static void b_step(void)
{
	uint64_t c = cB, r, q;
	b_state(c, &r, &q);
	if (q == 0) {
		if (madvise(B, NB * PG, MADV_DONTNEED))
			error("madvise(B, DONTNEED): %s", strerror(errno));
	} else {
		uint64_t *p = page(B, q - 1);
		page_is(p, 0, "B", q - 1, c);
		for (size_t w = 0; w < WORDS; w++)
			p[w] = V(0x42, r + 1, q - 1);
	}
	cB = c + 1;
}

static void b_check(void)
{
	for (size_t j = 0; j < NB; j++)
		page_is(page(B, j), b_expected(cB, j), "B", j, cB);
}

/* C: a new mapping per round, filled with V(round), then current; the old one unmapped. */
static void c_round(void)
{
	uint64_t r = cC + 1;
	unsigned char *n = mmap(NULL, NC * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (n == MAP_FAILED) {
		error("mmap C: %s", strerror(errno));
		return;
	}
	for (size_t j = 0; j < NC; j++)
		for (size_t w = 0; w < WORDS; w++)
			page(n, j)[w] = V(0x43, r, j);
	unsigned char *old = (unsigned char *)Ccur;
	Ccur = n;
	cC = r;
	if (old && munmap(old, NC * PG))
		error("munmap C: %s", strerror(errno));
}

static void c_check(void)
{
	for (size_t j = 0; j < NC; j++)
		page_is(page((unsigned char *)Ccur, j), V(0x43, cC, j), "C", j, cC);
}

static void s_check(void)
{
	for (size_t j = 0; j < nS; j++)
		page_is(page(S, j), V(0x53, 1, j), "S", j, 0);
}

/* --- the ticking thread ------------------------------------------------------------- */
static volatile sig_atomic_t gap_request;
static void usr2(int sig) { (void)sig; gap_request = 1; }

static void *ticker(void *arg)
{
	(void)arg;
	double last = now_mono(), max_gap = 0, max_at = 0;
	unsigned long ticks = 0;
	for (;;) {
		struct timespec ts = { 0, 1000000 };
		nanosleep(&ts, NULL);
		double t = now_mono();
		if (t - last > max_gap) {
			max_gap = t - last;
			max_at = t;
		}
		last = t;
		ticks++;
		if (gap_request) {
			gap_request = 0;
			zdtm_msg("GAP %.6f %lu %.6f", max_gap, ticks, max_at);
			max_gap = 0;
			ticks = 0;
		}
	}
	return NULL;
}

static unsigned char *map_anon(size_t len)
{
	unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	check(p != MAP_FAILED, "mmap %zu: %s", len, strerror(errno));
	return p;
}

int main(int argc, char **argv)
{
	zdtm_init(0);
	size_t a_mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 8;
	size_t s_mib = argc > 2 ? strtoul(argv[2], NULL, 0) : 0;
	my_pid = getpid();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = usr2;
	sa.sa_flags = SA_RESTART;
	check(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction USR2");

	A.npages = a_mib * MIB / PG;
	A.stride = 1;
	A.base = map_anon(A.npages * PG);
	B = map_anon(NB * PG);
	D.npages = ND, D.stride = 1, D.base = map_anon(ND * PG);
	check(madvise(D.base, ND * PG, MADV_DONTFORK) == 0, "MADV_DONTFORK: %s", strerror(errno));
	E.npages = NE, E.stride = 1, E.base = map_anon(NE * PG);
	check(madvise(E.base, NE * PG, MADV_WIPEONFORK) == 0, "MADV_WIPEONFORK: %s", strerror(errno));

	int fd = open("cow_churn.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
	check(fd >= 0, "open cow_churn.dat: %s", strerror(errno));
	static uint64_t buf[WORDS];
	for (size_t j = 0; j < NF; j++) {
		for (size_t w = 0; w < WORDS; w++)
			buf[w] = FILEV(j);
		check(write(fd, buf, PG) == (ssize_t)PG, "write cow_churn.dat");
	}
	F.npages = NF / 2, F.stride = 2, F.file = 1;
	F.base = mmap(NULL, NF * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	check(F.base != MAP_FAILED, "mmap cow_churn.dat: %s", strerror(errno));
	close(fd);

	nS = s_mib * MIB / PG;
	if (nS) {
		S = map_anon(nS * PG);
		for (size_t j = 0; j < nS; j++)
			for (size_t w = 0; w < WORDS; w++)
				page(S, j)[w] = V(0x53, 1, j);
	}

	/* one full round everywhere before READY: every region holds data */
	for (size_t i = 0; i < A.npages; i++)
		ring_step(&A);
	for (int i = 0; i < NB + 1; i++)
		b_step();
	c_round();
	for (int i = 0; i < ND; i++)
		ring_step(&D);
	for (int i = 0; i < NE; i++)
		ring_step(&E);
	for (int i = 0; i < NF / 2; i++)
		ring_step(&F);

	pthread_t th;
	check(pthread_create(&th, NULL, ticker, NULL) == 0, "pthread_create");
	ready();

	for (unsigned long it = 0; !zdtm_got_usr1; it++) {
		ring_step(&A);
		if (it % 16 == 0) {
			b_step();
			ring_step(&D);
			ring_step(&E);
			ring_step(&F);
		}
		if (it % 256 == 0)
			c_round();
		if (it % 1024 == 0) {
			pid_t p = getpid();
			if (p != my_pid) {
				zdtm_msg("DUPLICATE: process %d runs the code of %d", (int)p, (int)my_pid);
				_exit(3);
			}
			msleep(1);	/* leave some CPU to the others */
		}
	}
	if (corrupt_requested())
		page(A.base, A.npages / 2)[7] ^= 1;
	ring_check(&A);
	b_check();
	c_check();
	ring_check(&D);
	ring_check(&E);
	ring_check(&F);
	s_check();
	if (errors)
		fail("%lu inconsistencies; first: %s", errors, first_error);
	zdtm_msg("cow_churn: steps A %llu B %llu C %llu D %llu E %llu F %llu",
		 (unsigned long long)A.c, (unsigned long long)cB, (unsigned long long)cC,
		 (unsigned long long)D.c, (unsigned long long)E.c, (unsigned long long)F.c);
	pass();
	return 0;
}
