/* pipe_tree.c -- pipes between a parent and its child.
 *
 *   up:    child -> parent, 256 KiB, a stream of 100000 sequence numbers (u32); the parent
 *          reads only the first 100000 bytes before READY, so the pipe is full and the
 *          child is blocked in write() when frozen
 *   down:  parent -> child; the child, once done writing, closes its write end of up and
 *          blocks in read() on down
 * After SIGUSR1 the parent reads up to EOF (every number once, in order: EOF proves the
 * child's write end is the only other one), then writes "quit" down; the child must get it
 * and exit 0.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define N 100000
#define UP_SZ (256 << 10)

static int up[2], down[2];

static void child(void)
{
	close(up[0]);
	close(down[1]);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	for (uint32_t i = 0; i < N; i++) {
		const char *p = (const char *)&i;
		size_t left = sizeof(i);
		while (left) {
			ssize_t w = write(up[1], p, left);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				_exit(2);
			p += w;
			left -= w;
		}
	}
	close(up[1]);
	char buf[8] = {0};
	ssize_t r;
	do
		r = read(down[0], buf, sizeof(buf));
	while (r < 0 && errno == EINTR);
	_exit(r == 4 && memcmp(buf, "quit", 4) == 0 ? 0 : 3);
}

int main(void)
{
	zdtm_init(0);
	check(pipe(up) == 0 && pipe(down) == 0, "pipe");
	check(fcntl(up[1], F_SETPIPE_SZ, UP_SZ) == UP_SZ, "F_SETPIPE_SZ");
	pid_t c = fork();
	check(c >= 0, "fork");
	if (c == 0)
		child();
	close(up[1]);
	close(down[0]);

	static uint32_t got[N];
	size_t have = 0;	/* bytes */
	while (have < 100000) {
		ssize_t r = read(up[0], (char *)got + have, 100000 - have);
		check(r > 0, "read: %zd", r);
		have += r;
	}
	/* wait until the child is blocked writing into the full pipe */
	int n = 0;
	double t0 = now_mono();
	do {
		check(now_mono() - t0 < 10, "child never filled the pipe");
		msleep(5);
		ioctl(up[0], FIONREAD, &n);
	} while (n < UP_SZ - 4096);
	ready();
	wait_usr1_polling();
	if (corrupt_requested()) {
		uint32_t lost;
		check(read(up[0], &lost, 4) == 4, "corrupt");
	}

	for (;;) {
		ssize_t r = read(up[0], (char *)got + have, sizeof(got) - have + 1);
		if (r < 0 && errno == EINTR)
			continue;
		check(r >= 0, "read: %s", strerror(errno));
		if (r == 0)
			break;
		have += r;
		check(have <= sizeof(got), "more data than the child wrote");
	}
	check(have == sizeof(got), "got %zu bytes before EOF, expected %zu", have, sizeof(got));
	for (uint32_t i = 0; i < N; i++)
		check(got[i] == i, "number %u is %u", i, got[i]);
	check(write(down[1], "quit", 4) == 4, "write down: %s", strerror(errno));
	int st;
	check(waitpid(c, &st, 0) == c, "waitpid: %s", strerror(errno));
	check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child ended with status %#x", st);
	pass();
	return 0;
}
