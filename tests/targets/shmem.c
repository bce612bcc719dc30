/* shmem.c -- shared memory objects no fd reaches any more, shared by a parent and its child
 * (what an unprivileged dump must read through the processes' own mappings, without
 * /proc/PID/map_files), and one an fd still holds.
 *
 *   anon   16 MB MAP_SHARED|MAP_ANONYMOUS; the parent writes pages 0-3, the child (after
 *          the fork, so only in its own page tables) pages 8-11; the rest never touched
 *   shm    a /dev/shm file (shm_open), 64 KB, mapped MAP_SHARED, unlinked and closed
 *   mfd    a memfd of 1 MB filled by pwrite(2) (page cache only: no process touched it
 *          through a mapping), then mapped MAP_SHARED (all of it) and MAP_PRIVATE (first
 *          256 KB; pages 3 and 5 written there: copied-on-write), and closed
 *   held   a memfd at fd 10, 1 MB, only its first 64 KB mapped MAP_SHARED, pattern written
 *          through the mapping; fd 10's offset at 777
 * Parent and child wait for SIGUSR1 (the child on a flag in `anon`).
 * After SIGUSR1: every byte of each object is as written (never-touched pages zero), the
 * private mapping keeps its own pages 3 and 5 and shows the memfd elsewhere, fd 10 is still
 * the very object mapped at `held` (a write through either shows in the other), 1 MB, at
 * offset 777; then the child checks its view and writes into anon, shm and mfd, and the
 * parent sees those writes: the objects are still shared between the two processes.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define PG 4096ul
#define MB (1024ul * 1024)

static unsigned char pat(int obj, size_t off) { return (unsigned char)(obj * 41 + off * 7 + (off >> 12) + 1); }

struct ctl { volatile int go, done; volatile char why[200]; };
static unsigned char *anon, *shm, *mfd, *mpriv, *held;
static struct ctl *ctl;		/* the last page of anon */

static int anon_written(size_t pg) { return pg < 4 || (pg >= 8 && pg < 12); }

/* Verify every object as this process sees it; returns NULL or what differs. */
static const char *verify(char *buf, size_t n)
{
	for (size_t i = 0; i < 16 * MB - PG; i++) {
		unsigned char want = anon_written(i / PG) ? pat(1, i) : 0;
		if (anon[i] != want)
			return snprintf(buf, n, "anon differs at %#zx: %#x, expected %#x", i, anon[i], want), buf;
	}
	for (size_t i = 0; i < 64 * 1024; i++)
		if (shm[i] != pat(2, i))
			return snprintf(buf, n, "shm differs at %#zx", i), buf;
	for (size_t i = 0; i < MB; i++)
		if (mfd[i] != pat(3, i))
			return snprintf(buf, n, "memfd differs at %#zx", i), buf;
	for (size_t i = 0; i < 256 * 1024; i++) {
		size_t pg = i / PG;
		unsigned char want = (pg == 3 || pg == 5) ? 0xc0 + pg : pat(3, i);
		if (mpriv[i] != want)
			return snprintf(buf, n, "private memfd mapping differs at %#zx", i), buf;
	}
	return NULL;
}

int main(void)
{
	zdtm_init(1);
	close_range(3, ~0u, 0);
	anon = mmap(NULL, 16 * MB, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	check(anon != MAP_FAILED, "mmap anon");
	ctl = (struct ctl *)(anon + 16 * MB - PG);
	for (size_t i = 0; i < 4 * PG; i++)
		anon[i] = pat(1, i);

	char name[64];
	snprintf(name, sizeof(name), "/nbck-shmem-%d", getpid());
	int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
	check(fd >= 0 && ftruncate(fd, 64 * 1024) == 0, "shm_open %s: %s", name, strerror(errno));
	shm = mmap(NULL, 64 * 1024, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	check(shm != MAP_FAILED, "mmap shm");
	shm_unlink(name);
	close(fd);
	for (size_t i = 0; i < 64 * 1024; i++)
		shm[i] = pat(2, i);

	fd = memfd_create("shmem-target", 0);
	check(fd >= 0, "memfd_create");
	static unsigned char b[MB];
	for (size_t i = 0; i < MB; i++)
		b[i] = pat(3, i);
	check(pwrite(fd, b, MB, 0) == (ssize_t)MB, "pwrite memfd");
	mfd = mmap(NULL, MB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	mpriv = mmap(NULL, 256 * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	check(mfd != MAP_FAILED && mpriv != MAP_FAILED, "mmap memfd");
	close(fd);
	memset(mpriv + 3 * PG, 0xc3, PG);
	memset(mpriv + 5 * PG, 0xc5, PG);

	fd = memfd_create("shmem-held", 0);
	check(fd >= 0 && dup2(fd, 10) == 10 && ftruncate(10, MB) == 0, "held memfd");
	close(fd);
	held = mmap(NULL, 64 * 1024, PROT_READ | PROT_WRITE, MAP_SHARED, 10, 0);
	check(held != MAP_FAILED, "mmap held");
	for (size_t i = 0; i < 64 * 1024; i++)
		held[i] = pat(4, i);
	check(lseek(10, 777, SEEK_SET) == 777, "lseek held");

	pid_t child = fork();
	if (child == 0) {
		for (size_t i = 8 * PG; i < 12 * PG; i++)
			anon[i] = pat(1, i);
		ctl->done = 1;
		while (!ctl->go)
			msleep(5);
		char why[200];
		const char *bad = verify(why, sizeof(why));
		if (bad) {
			snprintf((char *)ctl->why, sizeof(ctl->why), "child: %s", bad);
			ctl->done = 3;
			_exit(1);
		}
		anon[5 * PG] = 0x55;
		shm[100] = 0x66;
		mfd[MB - 1] = 0x77;
		ctl->done = 2;
		for (;;)
			pause();
	}
	check(child > 0, "fork");
	while (ctl->done != 1)
		msleep(1);
	ctl->done = 0;
	ready();

	sigset_t m;
	sigprocmask(SIG_SETMASK, NULL, &m);
	sigdelset(&m, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&m);
	if (corrupt_requested())
		mfd[12345] ^= 1;

	char why[200];
	const char *bad = verify(why, sizeof(why));
	if (bad) {
		kill(child, SIGKILL);
		fail("parent: %s", bad);
	}
	for (size_t i = 0; i < 64 * 1024; i++)
		if (held[i] != pat(4, i)) {
			kill(child, SIGKILL);
			fail("held memfd differs at %#zx", i);
		}
	struct stat st;
	if (fstat(10, &st) || st.st_size != (off_t)MB || lseek(10, 0, SEEK_CUR) != 777) {
		kill(child, SIGKILL);
		fail("fd 10: size %lld, expected %lu, or offset not 777", (long long)st.st_size, MB);
	}
	unsigned char c = 0;
	if (pwrite(10, "\x99", 1, 4321) != 1 || held[4321] != 0x99 || (held[100] = 0x42, pread(10, &c, 1, 100) != 1)
	    || c != 0x42) {
		kill(child, SIGKILL);
		fail("fd 10 and the mapping of the held memfd are no longer the same object");
	}
	ctl->go = 1;
	double deadline = now_mono() + 20;
	while (ctl->done == 0 && now_mono() < deadline)
		msleep(2);
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	check(ctl->done != 0, "the child never answered (anon no longer shared?)");
	check(ctl->done == 2, "%s", (const char *)ctl->why);
	check(anon[5 * PG] == 0x55, "the child's write to anon is not visible in the parent");
	check(shm[100] == 0x66, "the child's write to shm is not visible in the parent");
	check(mfd[MB - 1] == 0x77, "the child's write to the memfd is not visible in the parent");
	pass();
	return 0;
}
