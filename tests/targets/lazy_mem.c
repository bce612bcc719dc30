/* lazy_mem.c -- memory that is changed in every way a lazily restored process can change
 * it before its pages have come in (nbcheckpoint/engine/lazy.py, restore --lazy-pages).
 *
 * Regions (anon private, every word a value derived from its region and place, W()):
 *   A  24 MiB: after SIGUSR1, a write into a page not read before (page 100), an mprotect
 *      that splits the VMA in three (PROT_READ in the middle), then a fork whose child
 *      checks all of A (its own copy: pages the child reads come from its own userfaultfd);
 *   D   4 MiB: MADV_DONTNEED of the first half -- it must read zeros, the rest its values;
 *   R   4 MiB: mremap'd onto a reserved spot elsewhere (and grown by 1 MiB): its values
 *      must be there, zeros in the grown part, nothing left at the old place;
 *   U   2 MiB: munmap'd and mapped again (fresh): zeros;
 *   E   8 MiB: not touched until the final check.
 * Then every region is checked in full.  Each action comes first thing after SIGUSR1, so
 * with a page server that holds its stream back they all meet pages still to come.
 * ZDTM_CORRUPT flips a word of E before the check.
 */
#include "zdtm.h"
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096ul
#define MIB (1024ul * 1024)

static uint64_t W(uint64_t tag, size_t word) { return (tag << 56) ^ (word * 0x9E3779B97F4A7C15ull); }

static uint64_t *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) fail("mmap %zu: %s", len, strerror(errno));
	return p;
}

static void fill(uint64_t *p, size_t len, uint64_t tag)
{
	for (size_t i = 0; i < len / 8; i++) p[i] = W(tag, i);
}

/* Words [from, to) of region p must hold tag's values (or 0 if zero). */
static int check_words(const char *name, uint64_t *p, size_t from, size_t to, uint64_t tag, int zero)
{
	for (size_t i = from; i < to; i++) {
		uint64_t want = zero ? 0 : W(tag, i);
		if (p[i] != want) {
			zdtm_msg("FAIL: %s: word %zu (page %zu) is %#lx, want %#lx", name, i, i * 8 / PG,
				 (unsigned long)p[i], (unsigned long)want);
			return 0;
		}
	}
	return 1;
}

int main(void)
{
	const size_t A_LEN = 24 * MIB, D_LEN = 4 * MIB, R_LEN = 4 * MIB, U_LEN = 2 * MIB, E_LEN = 8 * MIB;
	const uint64_t MARK = 0x5a5a5a5a12345678ull;
	zdtm_init(1);
	uint64_t *A = map_anon(A_LEN), *D = map_anon(D_LEN), *R = map_anon(R_LEN);
	uint64_t *U = map_anon(U_LEN), *E = map_anon(E_LEN);
	/* where R goes: reserved now, so that the move cannot land on anything else */
	uint64_t *spot = mmap(NULL, R_LEN + MIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (spot == MAP_FAILED) fail("mmap spot: %s", strerror(errno));
	fill(A, A_LEN, 'A');
	fill(D, D_LEN, 'D');
	fill(R, R_LEN, 'R');
	fill(U, U_LEN, 'U');
	fill(E, E_LEN, 'E');
	ready();
	sigset_t none;
	sigemptyset(&none);
	while (!zdtm_got_usr1) sigsuspend(&none);

	/* the actions, before anything is read */
	A[100 * PG / 8] = MARK;
	if (mprotect((char *)A + 8 * MIB, 4 * MIB, PROT_READ)) fail("mprotect: %s", strerror(errno));
	if (madvise(D, D_LEN / 2, MADV_DONTNEED)) fail("madvise: %s", strerror(errno));
	uint64_t *R2 = mremap(R, R_LEN, R_LEN + MIB, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
	if (R2 == MAP_FAILED) fail("mremap: %s", strerror(errno));
	if (munmap(U, U_LEN)) fail("munmap: %s", strerror(errno));
	if (mmap(U, U_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != U)
		fail("mmap U again: %s", strerror(errno));
	pid_t child = fork();
	if (child < 0) fail("fork: %s", strerror(errno));
	if (child == 0) {
		int ok = check_words("A (child)", A, 0, 100 * PG / 8, 'A', 0) && A[100 * PG / 8] == MARK &&
			 check_words("A (child)", A, 100 * PG / 8 + 1, A_LEN / 8, 'A', 0);
		_exit(ok ? 0 : 1);
	}
	int st;
	if (waitpid(child, &st, 0) != child) fail("waitpid: %s", strerror(errno));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail("the forked child's check of A failed (status %#x)", st);

	if (corrupt_requested()) E[12345] ^= 1;
	if (A[100 * PG / 8] != MARK) fail("A: the word written first is %#lx", (unsigned long)A[100 * PG / 8]);
	A[100 * PG / 8] = W('A', 100 * PG / 8);
	int ok = check_words("A", A, 0, A_LEN / 8, 'A', 0) &&
		 check_words("D (dropped half)", D, 0, D_LEN / 16, 'D', 1) &&
		 check_words("D", D, D_LEN / 16, D_LEN / 8, 'D', 0) &&
		 check_words("R (moved)", R2, 0, R_LEN / 8, 'R', 0) &&
		 check_words("R (grown part)", R2, R_LEN / 8, (R_LEN + MIB) / 8, 'R', 1) &&
		 check_words("U (mapped again)", U, 0, U_LEN / 8, 'U', 1) &&
		 check_words("E", E, 0, E_LEN / 8, 'E', 0);
	if (!ok) exit(1);
	/* nothing is left where R was */
	if (msync(R, PG, MS_ASYNC) == 0 || errno != ENOMEM) fail("R's old place is still mapped");
	pass();
	return 0;
}
