/* counter.c -- single thread running in user space (never in a syscall) when frozen.
 *
 * State checked: general registers (the loop counter and running checksum live in
 * registers), a 16 MB malloc'ed heap buffer whose words are rewritten as the loop runs
 * while an incremental checksum is kept, and a global mirror of the counter.
 * After SIGUSR1: the counter equals its mirror, has kept growing since READY (no reset),
 * the buffer's recomputed checksum equals the incremental one, and it all stays
 * consistent for a few million more iterations.
 */
#include "zdtm.h"
#include <stdint.h>

#define NWORDS (16u * 1024 * 1024 / sizeof(uint64_t))

static volatile uint64_t mirror;	/* memory copy of the register counter */

static uint64_t full_sum(const uint64_t *buf)
{
	uint64_t s = 0;
	for (size_t i = 0; i < NWORDS; i++)
		s += buf[i];
	return s;
}

/* One step: rewrite one word of the buffer, keep the checksum incremental. */
static inline void step(uint64_t *buf, uint64_t n, uint64_t *sum)
{
	size_t idx = (n * 2654435761u) % NWORDS;
	uint64_t old = buf[idx];
	uint64_t new = old * 6364136223846793005ull + n;
	buf[idx] = new;
	*sum += new - old;
}

int main(void)
{
	zdtm_init(0);
	uint64_t *buf = malloc(NWORDS * sizeof(uint64_t));
	check(buf, "malloc 16 MB");
	for (size_t i = 0; i < NWORDS; i++)
		buf[i] = i * 0x9e3779b97f4a7c15ull;
	uint64_t sum = full_sum(buf);
	uint64_t n = 0;

	for (; n < 100000; n++) {
		step(buf, n, &sum);
		mirror = n;
	}
	uint64_t n_ready = n;
	ready();

	while (!zdtm_got_usr1) {	/* the checkpoint lands somewhere in here */
		step(buf, n, &sum);
		mirror = n;
		if (mirror != n)
			fail("mirror %llu != counter %llu", (unsigned long long)mirror,
			     (unsigned long long)n);
		n++;
	}

	if (corrupt_requested())
		buf[12345] ^= 1;

	check(mirror == n - 1, "mirror %llu, counter %llu", (unsigned long long)mirror,
	      (unsigned long long)n);
	check(n > n_ready, "counter %llu did not grow past %llu", (unsigned long long)n,
	      (unsigned long long)n_ready);
	uint64_t s = full_sum(buf);
	check(s == sum, "buffer checksum %016llx != incremental %016llx",
	      (unsigned long long)s, (unsigned long long)sum);

	uint64_t n_go = n;
	for (int i = 0; i < 4000000; i++, n++) {
		step(buf, n, &sum);
		mirror = n;
	}
	check(n == n_go + 4000000, "counter jumped");
	check(mirror == n - 1, "mirror lost");
	s = full_sum(buf);
	check(s == sum, "checksum diverged after resuming");
	zdtm_msg("counter: %llu iterations, %llu before READY", (unsigned long long)n,
		 (unsigned long long)n_ready);
	pass();
	return 0;
}
