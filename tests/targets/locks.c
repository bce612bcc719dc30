/* locks.c DIR [KINDS] -- file locks of the three kinds, at fixed fd numbers.
 *
 * KINDS is a comma-separated subset of flock,posix,ofd or "all" (default: none, so that the
 * generic engine tests, which dump without --file-locks, see the files without locks).
 *   fd 10: DIR/flock.dat  O_RDWR, flock(LOCK_EX); fd 13 is a dup of it (same description)
 *   fd 14: DIR/shared.dat O_RDONLY, flock(LOCK_SH)
 *   fd 11: DIR/posix.dat  O_RDWR, POSIX (F_SETLK) locks: WRITE 0-9, READ 100-104, WRITE 200-EOF
 *   fd 12: DIR/ofd.dat    O_RDWR, OFD (F_OFD_SETLK) locks: WRITE 3-9, READ 50-59
 * (each kind's locks only if selected; the fds always).  Main waits in sigsuspend.
 * After SIGUSR1, a forked child (another process, with descriptions of its own) must be
 * refused every conflicting lock with EWOULDBLOCK/EAGAIN and granted the compatible ones
 * (F_GETLK / F_OFD_GETLK name the holder) -- and granted everything on the files of the kinds
 * not selected; /proc/locks must show exactly the selected locks, owned by this process
 * (POSIX, FLOCK with our pid; OFDLCK with -1), on the right inodes and ranges.
 * ZDTM_CORRUPT drops the flock of fd 10 (with flock selected), else takes one.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>

static char fpath[4096], spath[4096], ppath[4096], opath[4096];
static int want_flock, want_posix, want_ofd;

static void move_fd(int fd, int to)
{
	check(fd >= 0, "open: %s", strerror(errno));
	check(dup3(fd, to, 0) == to, "dup3");
	close(fd);
}

static int setlk(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len, .l_pid = 0 };
	return fcntl(fd, cmd, &fl);
}

/* In the child: a lock that must conflict if `held`, else be granted (and is then released
 * with the rest when the child exits). */
#define EXPECT(held, call, what) do { errno = 0; int _r = (call); \
	if ((held) && !(_r < 0 && (errno == EWOULDBLOCK || errno == EAGAIN))) { \
		zdtm_msg("child: %s was not refused (ret %d, %s)", what, _r, strerror(errno)); bad++; } \
	if (!(held) && _r < 0) { zdtm_msg("child: %s refused (%s)", what, strerror(errno)); bad++; } } while (0)
#define GRANTED(call, what) EXPECT(0, call, what)

static int child_checks(pid_t parent)
{
	int bad = 0;
	int f = open(fpath, O_RDWR), s = open(spath, O_RDONLY), p = open(ppath, O_RDWR), o = open(opath, O_RDWR);
	if (f < 0 || s < 0 || p < 0 || o < 0) {
		zdtm_msg("child: open: %s", strerror(errno));
		return 1;
	}
	/* flock */
	EXPECT(want_flock, flock(f, LOCK_SH | LOCK_NB), "flock(LOCK_SH) on flock.dat");
	EXPECT(want_flock, flock(f, LOCK_EX | LOCK_NB), "flock(LOCK_EX) on flock.dat");
	EXPECT(want_flock, flock(s, LOCK_EX | LOCK_NB), "flock(LOCK_EX) on shared.dat");
	GRANTED(flock(s, LOCK_SH | LOCK_NB), "flock(LOCK_SH) on shared.dat");
	flock(s, LOCK_UN);
	/* POSIX: another process */
	EXPECT(want_posix, setlk(p, F_SETLK, F_RDLCK, 5, 1), "POSIX read lock on posix.dat byte 5");
	EXPECT(want_posix, setlk(p, F_SETLK, F_WRLCK, 102, 1), "POSIX write lock on posix.dat byte 102");
	EXPECT(want_posix, setlk(p, F_SETLK, F_RDLCK, 1 << 20, 1), "POSIX read lock on posix.dat byte 1M (to-EOF lock)");
	GRANTED(setlk(p, F_SETLK, F_RDLCK, 100, 5), "POSIX read lock on posix.dat 100-104");
	GRANTED(setlk(p, F_SETLK, F_WRLCK, 50, 10), "POSIX write lock on posix.dat 50-59");
	setlk(p, F_SETLK, F_UNLCK, 0, 0);
	struct flock q = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1 };
	check(fcntl(p, F_GETLK, &q) == 0, "F_GETLK: %s", strerror(errno));
	if (want_posix ? (q.l_type != F_WRLCK || q.l_pid != parent || q.l_start != 0 || q.l_len != 10)
		       : q.l_type != F_UNLCK) {
		zdtm_msg("child: F_GETLK on posix.dat byte 0: type %d pid %d range %lld+%lld (parent %d)",
			 q.l_type, q.l_pid, (long long)q.l_start, (long long)q.l_len, parent);
		bad++;
	}
	/* OFD: another description conflicts, whoever holds it */
	EXPECT(want_ofd, setlk(o, F_OFD_SETLK, F_RDLCK, 9, 1), "OFD read lock on ofd.dat byte 9");
	EXPECT(want_ofd, setlk(o, F_OFD_SETLK, F_WRLCK, 55, 1), "OFD write lock on ofd.dat byte 55");
	EXPECT(want_ofd, setlk(o, F_SETLK, F_WRLCK, 3, 1), "POSIX write lock on ofd.dat byte 3");
	GRANTED(setlk(o, F_OFD_SETLK, F_RDLCK, 50, 10), "OFD read lock on ofd.dat 50-59");
	GRANTED(setlk(o, F_OFD_SETLK, F_WRLCK, 10, 30), "OFD write lock on ofd.dat 10-39");
	setlk(o, F_OFD_SETLK, F_UNLCK, 0, 0);
	setlk(o, F_SETLK, F_UNLCK, 0, 0);
	struct flock r = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0, .l_pid = 0 };
	check(fcntl(o, F_OFD_GETLK, &r) == 0, "F_OFD_GETLK: %s", strerror(errno));
	if (want_ofd ? (r.l_type != F_WRLCK || r.l_pid != -1 || r.l_start != 3 || r.l_len != 7)
		     : r.l_type != F_UNLCK) {
		zdtm_msg("child: F_OFD_GETLK on ofd.dat: type %d pid %d range %lld+%lld",
			 r.l_type, r.l_pid, (long long)r.l_start, (long long)r.l_len);
		bad++;
	}
	return bad ? 1 : 0;
}

static ino_t ino_of(int fd)
{
	struct stat st;
	check(fstat(fd, &st) == 0, "fstat %d", fd);
	return st.st_ino;
}

/* /proc/locks must list exactly what we hold. */
static void check_proc_locks(void)
{
	FILE *f = fopen("/proc/locks", "r");
	check(f, "open /proc/locks");
	char line[512];
	int flock_ex = 0, flock_sh = 0, posix = 0, ofd = 0;
	ino_t fi = ino_of(10), si = ino_of(14), pi = ino_of(11), oi = ino_of(12);
	while (fgets(line, sizeof(line), f)) {
		char kind[16], mode[16], type[16], end[32];
		int pid, ok;
		unsigned maj, min;
		unsigned long ino;
		long long start;
		if (strstr(line, "->"))
			continue;
		if (sscanf(line, "%*d: %15s %15s %15s %d %x:%x:%lu %lld %31s",
			   kind, mode, type, &pid, &maj, &min, &ino, &start, end) != 9)
			continue;
		if (ino != fi && ino != si && ino != pi && ino != oi)
			continue;
		if (!strcmp(kind, "FLOCK") && ino == fi) {
			check(pid == getpid() && !strcmp(type, "WRITE"), "flock.dat: %.100s", line);
			flock_ex++;
		} else if (!strcmp(kind, "FLOCK") && ino == si) {
			check(pid == getpid() && !strcmp(type, "READ"), "shared.dat: %.100s", line);
			flock_sh++;
		} else if (!strcmp(kind, "POSIX") && ino == pi) {
			check(pid == getpid(), "posix.dat lock of pid %d: %.100s", pid, line);
			ok = (start == 0 && !strcmp(end, "9") && !strcmp(type, "WRITE")) ||
			     (start == 100 && !strcmp(end, "104") && !strcmp(type, "READ")) ||
			     (start == 200 && !strcmp(end, "EOF") && !strcmp(type, "WRITE"));
			check(ok, "posix.dat: unexpected %.100s", line);
			posix++;
		} else if (!strcmp(kind, "OFDLCK") && ino == oi) {
			check(pid == -1, "ofd.dat: %.100s", line);
			ok = (start == 3 && !strcmp(end, "9") && !strcmp(type, "WRITE")) ||
			     (start == 50 && !strcmp(end, "59") && !strcmp(type, "READ"));
			check(ok, "ofd.dat: unexpected %.100s", line);
			ofd++;
		} else {
			fail("/proc/locks: unexpected lock %.100s", line);
		}
	}
	fclose(f);
	int want_f = want_flock ? 1 : 0, want_p = want_posix ? 3 : 0, want_o = want_ofd ? 2 : 0;
	check(flock_ex == want_f && flock_sh == want_f && posix == want_p && ofd == want_o,
	      "/proc/locks: %d flock EX, %d flock SH, %d POSIX, %d OFD locks (want %d, %d, %d, %d)",
	      flock_ex, flock_sh, posix, ofd, want_f, want_f, want_p, want_o);
}

static void check_fdinfo_lock(int fd, const char *kind, int want)
{
	char path[64], buf[4096];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	FILE *f = fopen(path, "r");
	check(f, "open %s", path);
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	check(!strstr(buf, kind) == !want, "fd %d fdinfo %s a %s lock", fd, want ? "lacks" : "has", kind);
}

int main(int argc, char **argv)
{
	zdtm_init(1);
	close_range(3, ~0u, 0);
	check(argc > 1, "usage: locks DIR [flock,posix,ofd|all]");
	const char *kinds = argc > 2 ? argv[2] : "";
	int all = !strcmp(kinds, "all");
	want_flock = all || strstr(kinds, "flock");
	want_posix = all || strstr(kinds, "posix");
	want_ofd = all || strstr(kinds, "ofd");
	snprintf(fpath, sizeof(fpath), "%s/flock.dat", argv[1]);
	snprintf(spath, sizeof(spath), "%s/shared.dat", argv[1]);
	snprintf(ppath, sizeof(ppath), "%s/posix.dat", argv[1]);
	snprintf(opath, sizeof(opath), "%s/ofd.dat", argv[1]);

	move_fd(open(fpath, O_RDWR | O_CREAT | O_TRUNC, 0600), 10);
	check(dup3(10, 13, 0) == 13, "dup3");
	move_fd(open(spath, O_RDONLY | O_CREAT | O_TRUNC, 0600), 14);
	if (want_flock) {
		check(flock(10, LOCK_EX | LOCK_NB) == 0, "flock EX: %s", strerror(errno));
		check(flock(14, LOCK_SH | LOCK_NB) == 0, "flock SH: %s", strerror(errno));
	}
	move_fd(open(ppath, O_RDWR | O_CREAT | O_TRUNC, 0600), 11);
	check(write(11, "0123456789", 10) == 10, "write");
	if (want_posix) {
		check(setlk(11, F_SETLK, F_WRLCK, 0, 10) == 0, "POSIX 0-9: %s", strerror(errno));
		check(setlk(11, F_SETLK, F_RDLCK, 100, 5) == 0, "POSIX 100-104: %s", strerror(errno));
		check(setlk(11, F_SETLK, F_WRLCK, 200, 0) == 0, "POSIX 200-: %s", strerror(errno));
	}
	move_fd(open(opath, O_RDWR | O_CREAT | O_TRUNC, 0600), 12);
	if (want_ofd) {
		check(setlk(12, F_OFD_SETLK, F_WRLCK, 3, 7) == 0, "OFD 3-9: %s", strerror(errno));
		check(setlk(12, F_OFD_SETLK, F_RDLCK, 50, 10) == 0, "OFD 50-59: %s", strerror(errno));
	}
	check_proc_locks();
	ready();

	sigset_t m;
	sigprocmask(SIG_SETMASK, NULL, &m);
	sigdelset(&m, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&m);
	if (corrupt_requested())
		flock(10, want_flock ? LOCK_UN : LOCK_EX);

	check_fdinfo_lock(10, "FLOCK", want_flock);
	check_fdinfo_lock(13, "FLOCK", want_flock);
	check_fdinfo_lock(14, "FLOCK", want_flock);
	check_fdinfo_lock(11, "POSIX", want_posix);
	check_fdinfo_lock(12, "OFDLCK", want_ofd);
	check_proc_locks();
	pid_t parent = getpid(), c = fork();
	check(c >= 0, "fork");
	if (c == 0)
		_exit(child_checks(parent));
	int st;
	check(waitpid(c, &st, 0) == c, "waitpid");
	check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child's lock checks failed (status %#x)", st);
	check_proc_locks();	/* the child's own locks are gone with it */
	pass();
	return 0;
}
