/* ttyjob.c -- a shell job (tests/test_ttys.py): started by a shell on a terminal whose
 * master and session leader (the shell) are outside the dumped tree.
 *
 * stdin/stdout/stderr are the terminal; the protocol runs on it.  Before READY it turns
 * ECHO off (a mode the restored job must find again) and checks that the terminal is its
 * controlling tty and that it is the foreground job.  After SIGUSR1 it checks the same
 * things (on whatever terminal it was restored onto), says "ASK", reads a line and answers
 * "pong LINE", then PASS.
 */
#include "../zdtm.h"
#include <fcntl.h>
#include <sys/stat.h>
#include <termios.h>

static long tty_nr_of_self(void)
{
	char buf[1024];
	int fd = open("/proc/self/stat", O_RDONLY);
	ssize_t r = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	check(r > 0, "read stat");
	buf[r] = 0;
	char *p = strrchr(buf, ')') + 2;
	long v[4];
	char st;
	check(sscanf(p, "%c %ld %ld %ld %ld", &st, &v[0], &v[1], &v[2], &v[3]) == 5, "parse stat");
	return v[3];
}

static void verify(void)
{
	for (int fd = 0; fd < 3; fd++)
		check(isatty(fd), "fd %d is not a terminal", fd);
	struct stat s;
	check(fstat(0, &s) == 0, "fstat");
	check(tty_nr_of_self() == (long)s.st_rdev, "controlling tty %lx, stdin is %lx",
	      tty_nr_of_self(), (long)s.st_rdev);
	check(tcgetpgrp(0) == getpgrp(), "foreground group %d, ours %d", tcgetpgrp(0), getpgrp());
	struct termios t;
	check(tcgetattr(0, &t) == 0, "tcgetattr");
	check(!(t.c_lflag & ECHO) && (t.c_lflag & ICANON), "lflag %o: ECHO back on or ICANON off", t.c_lflag);
}

int main(void)
{
	zdtm_init(0);
	struct termios t;
	check(tcgetattr(0, &t) == 0, "tcgetattr: %s", strerror(errno));
	t.c_lflag &= ~ECHO;
	check(tcsetattr(0, TCSANOW, &t) == 0, "tcsetattr: %s", strerror(errno));
	verify();
	ready();
	wait_usr1_polling();
	verify();
	zdtm_msg("ASK");
	char line[128] = {0};
	ssize_t n;
	do
		n = read(0, line, sizeof(line) - 1);
	while (n < 0 && errno == EINTR);
	check(n > 0, "read: %s", strerror(errno));
	if (line[n - 1] == '\n')
		line[n - 1] = 0;
	zdtm_msg("pong %s", line);
	pass();
	return 0;
}
