/* pidfd.c -- pidfds of a child that waits, of a zombie child, of a reaped child and of itself.
 *
 *   p_blk   pidfd_open(kid, 0); p_dup: F_DUPFD_CLOEXEC of it (same description)
 *   p_nb    pidfd_open(kid, PIDFD_NONBLOCK), close-on-exec off
 *   p_zomb  pidfd of a child that exited with 7 and is not reaped (a zombie)
 *   p_gone  pidfd of a child that exited and was reaped (fdinfo "Pid: -1")
 *   p_self  pidfd_open(getpid(), PIDFD_THREAD): the main thread, the holder itself
 * Usage: pidfd [OUTSIDE_PID] -- also holds a pidfd of that process (outside the tree: the
 * dump must refuse it; tests/test_pidfd.py), checked like p_blk's first half.
 * After SIGUSR1: every fd is still "anon_inode:[pidfd]" with its flags and close-on-exec, and
 * fdinfo names the same processes; pidfd_send_signal(0) reaches the kid; p_nb's waitid says
 * EAGAIN while the kid lives; the kid is killed through p_blk, p_nb polls readable, waitid
 * on p_blk reaps it (CLD_KILLED, SIGKILL); waitid on p_zomb reaps the zombie (exit 7); p_gone
 * polls readable, waitid ECHILD, pidfd_send_signal fails (ESRCH; EINVAL in a PID namespace).
 */
#include "zdtm.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#ifndef PIDFD_NONBLOCK
#define PIDFD_NONBLOCK O_NONBLOCK
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static int pidfd_open(pid_t pid, unsigned flags) { return syscall(SYS_pidfd_open, pid, flags); }
static int pidfd_send_signal(int fd, int sig) { return syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0); }

/* fdinfo's "Pid:" of fd (as this process sees it) */
static long fdinfo_pid(int fd)
{
	char path[64], line[256];
	long pid = -2;
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	FILE *f = fopen(path, "r");
	check(f, "open %s: %s", path, strerror(errno));
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Pid: %ld", &pid) == 1) break;
	fclose(f);
	return pid;
}

static void check_pidfd(int fd, const char *name, long pid, int flags, int cloexec)
{
	char path[64], link[64] = "";
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	check(readlink(path, link, sizeof(link) - 1) > 0 && !strcmp(link, "anon_inode:[pidfd]"),
	      "%s (fd %d) is %s", name, fd, link);
	int fl = fcntl(fd, F_GETFL);
	check((fl & (O_NONBLOCK | O_EXCL)) == flags, "%s flags %#o, want %#o", name, fl, flags);
	check(!!(fcntl(fd, F_GETFD) & FD_CLOEXEC) == cloexec, "%s close-on-exec changed", name);
	check(fdinfo_pid(fd) == pid, "%s refers to %ld, want %ld", name, fdinfo_pid(fd), pid);
}

static int readable(int fd, int ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	return poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

int main(int argc, char **argv)
{
	pid_t me = getpid();
	pid_t kid = fork();
	if (kid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		for (;;) pause();
	}
	check(kid > 0, "fork: %s", strerror(errno));
	pid_t zomb = fork();
	if (zomb == 0) _exit(7);
	pid_t gone = fork();
	if (gone == 0) _exit(0);

	int p_blk = pidfd_open(kid, 0);
	int p_nb = pidfd_open(kid, PIDFD_NONBLOCK);
	int p_zomb = pidfd_open(zomb, 0);
	int p_gone = pidfd_open(gone, 0);
	int p_self = pidfd_open(me, PIDFD_THREAD);
	check(p_blk >= 0 && p_nb >= 0 && p_zomb >= 0 && p_gone >= 0 && p_self >= 0, "pidfd_open: %s", strerror(errno));
	int p_dup = fcntl(p_blk, F_DUPFD_CLOEXEC, 0);
	check(p_dup >= 0, "F_DUPFD_CLOEXEC: %s", strerror(errno));
	fcntl(p_nb, F_SETFD, 0);
	check(waitpid(gone, NULL, 0) == gone, "waitpid(gone): %s", strerror(errno));
	siginfo_t si;
	check(waitid(P_PID, zomb, &si, WEXITED | WNOWAIT) == 0, "waitid(zombie, WNOWAIT): %s", strerror(errno));
	int p_out = -1;
	long outside = argc > 1 ? atol(argv[1]) : 0;
	if (outside) {
		p_out = pidfd_open(outside, 0);
		check(p_out >= 0, "pidfd_open(%ld): %s", outside, strerror(errno));
	}

	zdtm_init(0);
	ready();
	wait_usr1_polling();

	if (corrupt_requested())
		dup3(p_gone, p_blk, O_CLOEXEC);

	check_pidfd(p_blk, "p_blk", kid, 0, 1);
	check_pidfd(p_dup, "p_dup", kid, 0, 1);
	check_pidfd(p_nb, "p_nb", kid, O_NONBLOCK, 0);
	check_pidfd(p_zomb, "p_zomb", zomb, 0, 1);
	check_pidfd(p_gone, "p_gone", -1, 0, 1);
	check_pidfd(p_self, "p_self", me, O_EXCL, 1);
	check(syscall(SYS_kcmp, me, me, 0 /* KCMP_FILE */, p_blk, p_dup) == 0, "p_dup is no longer p_blk's description");
	if (p_out >= 0) {
		check_pidfd(p_out, "p_out", outside, 0, 1);
		check(pidfd_send_signal(p_out, 0) == 0, "pidfd_send_signal(p_out, 0): %s", strerror(errno));
	}

	check(pidfd_send_signal(p_blk, 0) == 0, "pidfd_send_signal(p_blk, 0): %s", strerror(errno));
	check(pidfd_send_signal(p_self, 0) == 0, "pidfd_send_signal(p_self, 0): %s", strerror(errno));
	check(!readable(p_nb, 0), "p_nb readable while the kid lives");
	check(waitid(P_PIDFD, p_nb, &si, WEXITED) == -1 && errno == EAGAIN, "waitid(p_nb) on a live kid: %s",
	      strerror(errno));
	check(pidfd_send_signal(p_blk, SIGKILL) == 0, "pidfd_send_signal(p_blk, SIGKILL): %s", strerror(errno));
	check(readable(p_nb, 5000), "p_nb not readable after the kid was killed");
	memset(&si, 0, sizeof(si));
	check(waitid(P_PIDFD, p_blk, &si, WEXITED) == 0, "waitid(p_blk): %s", strerror(errno));
	check(si.si_pid == kid && si.si_code == CLD_KILLED && si.si_status == SIGKILL,
	      "kid reaped as pid %d code %d status %d", si.si_pid, si.si_code, si.si_status);

	check(readable(p_zomb, 0), "p_zomb not readable");
	memset(&si, 0, sizeof(si));
	check(waitid(P_PIDFD, p_zomb, &si, WEXITED) == 0, "waitid(p_zomb): %s", strerror(errno));
	check(si.si_pid == zomb && si.si_code == CLD_EXITED && si.si_status == 7,
	      "zombie reaped as pid %d code %d status %d", si.si_pid, si.si_code, si.si_status);

	check(readable(p_gone, 0), "p_gone not readable");
	check(waitid(P_PIDFD, p_gone, &si, WEXITED) == -1 && errno == ECHILD, "waitid(p_gone): %s", strerror(errno));
	/* ESRCH; EINVAL once restored into a PID namespace: the engine made that pidfd outside it */
	check(pidfd_send_signal(p_gone, 0) == -1 && (errno == ESRCH || errno == EINVAL),
	      "pidfd_send_signal(p_gone): %s", strerror(errno));
	pass();
}
