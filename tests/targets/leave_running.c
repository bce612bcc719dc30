/* leave_running.c DIR [MODE] -- files a process goes on changing after a --leave-running dump.
 *
 *   fd 10: DIR/data.dat   O_RDWR, 4096 bytes of pattern, offset 1000
 *   fd 11: DIR/victim.dat O_RDONLY, "victim file", offset 3
 * Main waits in sigsuspend for SIGUSR1 or SIGUSR2.
 * SIGUSR2 ("go on after the dump"): pwrite()s 100 bytes at 8192 into data.dat (it grows, its
 * mtime moves), then by MODE: "delete" unlinks victim.dat, "replace" renames a new file over
 * it, "grow" (the default) does nothing more; prints MUTATED.  May come more than once; only the first acts.
 * SIGUSR1: fd 10's offset is 1000 and its first 4096 bytes the pattern; fd 11 reads "tim"
 * at its offset 3.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <sys/stat.h>

static volatile sig_atomic_t got_usr2;
static void usr2(int sig) { (void)sig; got_usr2 = 1; }

static unsigned char pattern(size_t i) { return (unsigned char)(i * 13 + (i >> 8) + 1); }

static void move_fd(int fd, int to)
{
	check(fd >= 0, "open: %s", strerror(errno));
	check(dup3(fd, to, 0) == to, "dup3");
	close(fd);
}

int main(int argc, char **argv)
{
	zdtm_init(1);
	close_range(3, ~0u, 0);
	check(argc > 1, "usage: leave_running DIR [delete|replace|grow]");
	const char *mode = argc > 2 ? argv[2] : "grow";
	char dpath[4096], vpath[4096], tpath[4200];
	snprintf(dpath, sizeof(dpath), "%s/data.dat", argv[1]);
	snprintf(vpath, sizeof(vpath), "%s/victim.dat", argv[1]);
	snprintf(tpath, sizeof(tpath), "%s.new", vpath);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = usr2;
	sigaction(SIGUSR2, &sa, NULL);
	sigset_t b;
	sigemptyset(&b);
	sigaddset(&b, SIGUSR2);
	sigprocmask(SIG_BLOCK, &b, NULL);

	static unsigned char buf[4096], got[4096];
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = pattern(i);
	move_fd(open(dpath, O_RDWR | O_CREAT | O_TRUNC, 0600), 10);
	check(write(10, buf, sizeof(buf)) == sizeof(buf), "write data");
	check(lseek(10, 1000, SEEK_SET) == 1000, "lseek");
	int v = open(vpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	check(v >= 0 && write(v, "victim file", 11) == 11, "write victim");
	close(v);
	move_fd(open(vpath, O_RDONLY), 11);
	check(lseek(11, 3, SEEK_SET) == 3, "lseek victim");
	ready();

	sigset_t m;
	sigprocmask(SIG_SETMASK, NULL, &m);
	sigdelset(&m, SIGUSR1);
	sigdelset(&m, SIGUSR2);
	int mutated = 0;
	while (!zdtm_got_usr1) {
		sigsuspend(&m);
		if (got_usr2 && !mutated) {
			mutated = 1;
			static char more[100];
			memset(more, 'z', sizeof(more));
			check(pwrite(10, more, sizeof(more), 8192) == sizeof(more), "pwrite data");
			if (!strcmp(mode, "delete")) {
				check(unlink(vpath) == 0, "unlink victim: %s", strerror(errno));
			} else if (!strcmp(mode, "replace")) {
				int n = open(tpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
				check(n >= 0 && write(n, "another one", 11) == 11, "write replacement");
				close(n);
				check(rename(tpath, vpath) == 0, "rename: %s", strerror(errno));
			}
			zdtm_msg("MUTATED");
		}
	}
	if (corrupt_requested())
		lseek(10, 0, SEEK_SET);

	off_t off = lseek(10, 0, SEEK_CUR);
	check(off == 1000, "data.dat offset %lld, expected 1000", (long long)off);
	check(pread(10, got, sizeof(got), 0) == sizeof(got) && memcmp(got, buf, sizeof(buf)) == 0,
	      "data.dat content differs");
	char t[4] = {0};
	check(read(11, t, 3) == 3 && !memcmp(t, "tim", 3), "victim.dat at offset 3 reads '%.3s'", t);
	pass();
	return 0;
}
