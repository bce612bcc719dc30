/* pty.c -- pseudo-terminals (files/tty.py).
 *
 * A  the main pair.  Raw mode and an odd speed (termios2 BOTHER, 12345 baud), a window
 *    size.  Child C: setsid(), opens the slave (its controlling tty) at fd 100 and /dev/tty
 *    at fd 101; grandchild G: its own process group, made the foreground one.  The parent
 *    holds a slave description too, and before READY writes "queued-out" to the slave and
 *    "queued-in" to the master, which nobody reads until SIGUSR1.
 * B  a dead peer: the slave was opened, wrote "dead-data" and was closed: the master reads
 *    that, then EIO, and polls POLLHUP; the master is O_NONBLOCK.
 * L  locked: never unlocked (TIOCGPTLCK 1), the slave cannot be opened.
 * P  packet mode (TIOCPKT), slave held by the parent, "pkt-data" queued.
 * After SIGUSR1 the parent checks termios, window size, indices (unless ZDTM_PTY_ANY_INDEX),
 * the queued data both ways, then C and G check their session, process groups and
 * controlling tty, and data goes both ways through the pair; B, L, P are checked.
 * PTY_PTMX names the ptmx to open (default /dev/ptmx), for a devpts mounted elsewhere.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>

struct k_termios2 {
	unsigned int c_iflag, c_oflag, c_cflag, c_lflag;
	unsigned char c_line;
	unsigned char c_cc[19];
	unsigned int c_ispeed, c_ospeed;
};
#define K_TCGETS2 _IOR('T', 0x2A, struct k_termios2)
#define K_TCSETS2 _IOW('T', 0x2B, struct k_termios2)
#define K_CBAUD 0010017
#define K_BOTHER 0010000
#define SPEED 12345

static const char *ptmx = "/dev/ptmx";

static int open_master(char *name, size_t n, int unlock)
{
	int m = open(ptmx, O_RDWR | O_NOCTTY);
	check(m >= 0, "open %s: %s", ptmx, strerror(errno));
	int idx;
	check(ioctl(m, TIOCGPTN, &idx) == 0, "TIOCGPTN");
	char dir[256];
	snprintf(dir, sizeof(dir), "%s", ptmx);
	char *slash = strrchr(dir, '/');
	*slash = 0;
	/* the kernel's rule: a ptmx on devpts has its slaves next to it, else in ./pts */
	struct stat a, b;
	check(stat(ptmx, &a) == 0 && stat(dir, &b) == 0, "stat");
	char probe[300];
	snprintf(probe, sizeof(probe), "%s/%d", dir, idx);
	if (stat(probe, &b) == 0 && b.st_rdev == makedev(136 + idx / 256, idx % 256))
		snprintf(name, n, "%s/%d", dir, idx);
	else
		snprintf(name, n, "%s/pts/%d", dir, idx);
	if (unlock)
		check(unlockpt(m) == 0, "unlockpt");
	return m;
}

static long tty_nr_of_self(void)
{
	char buf[1024];
	int fd = open("/proc/self/stat", O_RDONLY);
	ssize_t r = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	check(r > 0, "read stat");
	buf[r] = 0;
	char *p = strrchr(buf, ')') + 2;
	long v[6];
	char st;
	check(sscanf(p, "%c %ld %ld %ld %ld", &st, &v[0], &v[1], &v[2], &v[3]) == 5, "parse stat");
	return v[3];
}

static void read_exact(int fd, char *buf, size_t n)
{
	size_t have = 0;
	double t0 = now_mono();
	while (have < n) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		check(now_mono() - t0 < 20, "read: only %zu of %zu bytes in 20 s", have, n);
		if (poll(&p, 1, 100) == 0)
			continue;
		ssize_t r = read(fd, buf + have, n - have);
		if (r < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		check(r > 0, "read: %zd %s", r, strerror(errno));
		have += r;
	}
}

static int queued(int fd)
{
	int n = -1;
	check(ioctl(fd, FIONREAD, &n) == 0, "FIONREAD: %s", strerror(errno));
	return n;
}

static int go[2], up[2], cg[2];
static char name_a[300];

static void grandchild(void)
{
	char b;
	char buf[64] = {0};
	check(read(go[0], &b, 1) == 1, "G: go");
	read_exact(100, buf, 9);
	check(memcmp(buf, "queued-in", 9) == 0, "G: queued input is '%.9s'", buf);
	check(getpgrp() == getpid(), "G: pgrp %d", getpgrp());
	check(tcgetpgrp(100) == getpid(), "G: foreground pgrp %d, expected %d", tcgetpgrp(100), getpid());
	struct stat s;
	check(fstat(100, &s) == 0, "fstat");
	check(tty_nr_of_self() == (long)s.st_rdev, "G: tty_nr %lx, slave %lx", tty_nr_of_self(), (long)s.st_rdev);
	check(write(100, "G-OK\n", 5) == 5, "G: write");
	memset(buf, 0, sizeof(buf));
	read_exact(100, buf, 4);
	check(memcmp(buf, "ping", 4) == 0, "G: got '%.4s'", buf);
	check(read(cg[0], &b, 1) == 1, "G: cg");
	_exit(0);
}

static void child(void)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	check(setsid() == getpid(), "setsid");
	int s = open(name_a, O_RDWR);		/* a session leader without a tty: it becomes ours */
	check(s >= 0, "C: open %s: %s", name_a, strerror(errno));
	check(dup2(s, 100) == 100, "dup2");
	close(s);
	int t = open("/dev/tty", O_RDWR);
	check(t >= 0, "C: open /dev/tty: %s", strerror(errno));
	check(dup2(t, 101) == 101, "dup2");
	close(t);
	pid_t g = fork();
	check(g >= 0, "fork");
	if (g == 0) {
		setpgid(0, 0);
		grandchild();
	}
	setpgid(g, g);
	check(tcsetpgrp(100, g) == 0, "tcsetpgrp: %s", strerror(errno));
	check(write(up[1], "c", 1) == 1, "C: up");

	char b;
	check(read(go[0], &b, 1) == 1, "C: go");
	check(getsid(0) == getpid(), "C: sid %d", getsid(0));
	check(tcgetsid(100) == getpid(), "C: tty's session %d", tcgetsid(100));
	check(tcgetpgrp(100) == g, "C: foreground pgrp %d, expected %d", tcgetpgrp(100), g);
	struct stat st;
	check(fstat(100, &st) == 0, "fstat");
	check(tty_nr_of_self() == (long)st.st_rdev, "C: tty_nr %lx, slave %lx", tty_nr_of_self(), (long)st.st_rdev);
	struct stat dt;
	check(fstat(101, &dt) == 0 && dt.st_rdev == makedev(5, 0), "C: fd 101 is not /dev/tty");
	check(write(cg[1], "x", 1) == 1, "C: cg");
	int status;
	check(waitpid(g, &status, 0) == g, "waitpid G");
	check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "G ended with %#x", status);
	check(write(101, "via-devtty", 10) == 10, "C: write /dev/tty: %s", strerror(errno));
	_exit(0);
}

int main(void)
{
	zdtm_init(0);
	if (getenv("PTY_PTMX"))
		ptmx = getenv("PTY_PTMX");
	check(pipe(go) == 0 && pipe(up) == 0 && pipe(cg) == 0, "pipe");

	/* A */
	int ma = open_master(name_a, sizeof(name_a), 1);
	struct termios tio;
	check(tcgetattr(ma, &tio) == 0, "tcgetattr");
	cfmakeraw(&tio);
	check(tcsetattr(ma, TCSANOW, &tio) == 0, "tcsetattr");
	struct k_termios2 t2;
	check(ioctl(ma, K_TCGETS2, &t2) == 0, "TCGETS2");
	t2.c_cflag = (t2.c_cflag & ~K_CBAUD) | K_BOTHER;
	t2.c_ispeed = t2.c_ospeed = SPEED;
	check(ioctl(ma, K_TCSETS2, &t2) == 0, "TCSETS2: %s", strerror(errno));
	struct winsize ws = { .ws_row = 37, .ws_col = 123, .ws_xpixel = 777, .ws_ypixel = 555 };
	check(ioctl(ma, TIOCSWINSZ, &ws) == 0, "TIOCSWINSZ");
	pid_t c = fork();
	check(c >= 0, "fork");
	if (c == 0)
		child();
	char b;
	check(read(up[0], &b, 1) == 1, "up");
	int sa = open(name_a, O_RDWR | O_NOCTTY);
	check(sa >= 0, "open %s", name_a);

	/* B: dead peer */
	char name_b[300];
	int mb = open_master(name_b, sizeof(name_b), 1);
	int sb = open(name_b, O_RDWR | O_NOCTTY);
	check(sb >= 0, "open %s", name_b);
	check(write(sb, "dead-data", 9) == 9, "write B");
	close(sb);
	check(fcntl(mb, F_SETFL, O_NONBLOCK) == 0, "F_SETFL");

	/* L: locked */
	char name_l[300];
	int ml = open_master(name_l, sizeof(name_l), 0);

	/* P: packet mode */
	char name_p[300];
	int mp = open_master(name_p, sizeof(name_p), 1);
	int sp = open(name_p, O_RDWR | O_NOCTTY);
	check(sp >= 0, "open %s", name_p);
	check(tcgetattr(sp, &tio) == 0, "tcgetattr");
	cfmakeraw(&tio);
	check(tcsetattr(sp, TCSANOW, &tio) == 0, "tcsetattr");
	int one = 1;		/* after: an IXON change in packet mode queues a status byte */
	check(ioctl(mp, TIOCPKT, &one) == 0, "TIOCPKT");
	check(write(sp, "pkt-data", 8) == 8, "write P");

	/* queued both ways on A, read by nobody before SIGUSR1 */
	check(write(ma, "queued-in", 9) == 9, "write A");
	check(write(sa, "queued-out", 10) == 10, "write A slave");
	double t0 = now_mono();
	while (queued(sa) < 9 || queued(mp) < 8 || queued(mb) < 9) {
		check(now_mono() - t0 < 10, "data never queued");
		msleep(2);
	}
	while (queued(ma) < 10) {
		check(now_mono() - t0 < 10, "output never queued");
		msleep(2);
	}
	ready();
	wait_usr1_polling();
	if (corrupt_requested()) {
		char x;
		check(read(ma, &x, 1) == 1, "corrupt");
	}

	/* indices */
	if (!getenv("ZDTM_PTY_ANY_INDEX")) {
		char now[300];
		check(ptsname_r(ma, now, sizeof(now)) == 0, "ptsname");
		check(strcmp(strrchr(now, '/'), strrchr(name_a, '/')) == 0, "A is %s, was %s", now, name_a);
		check(ptsname_r(mb, now, sizeof(now)) == 0, "ptsname");
		check(strcmp(strrchr(now, '/'), strrchr(name_b, '/')) == 0, "B is %s, was %s", now, name_b);
		check(ptsname_r(mp, now, sizeof(now)) == 0, "ptsname");
		check(strcmp(strrchr(now, '/'), strrchr(name_p, '/')) == 0, "P is %s, was %s", now, name_p);
	}
	/* termios and window size */
	memset(&t2, 0, sizeof(t2));
	check(ioctl(sa, K_TCGETS2, &t2) == 0, "TCGETS2");
	check((t2.c_cflag & K_CBAUD) == K_BOTHER && t2.c_ospeed == SPEED && t2.c_ispeed == SPEED,
	      "speed: cflag %o, %u/%u", t2.c_cflag, t2.c_ispeed, t2.c_ospeed);
	check(!(t2.c_lflag & (ICANON | ECHO | ISIG)) && !(t2.c_oflag & OPOST) && !(t2.c_iflag & ICRNL),
	      "not raw: iflag %o oflag %o lflag %o", t2.c_iflag, t2.c_oflag, t2.c_lflag);
	struct winsize w2;
	check(ioctl(sa, TIOCGWINSZ, &w2) == 0, "TIOCGWINSZ");
	check(w2.ws_row == 37 && w2.ws_col == 123 && w2.ws_xpixel == 777 && w2.ws_ypixel == 555,
	      "winsize %ux%u %ux%u", w2.ws_row, w2.ws_col, w2.ws_xpixel, w2.ws_ypixel);
	/* queued data */
	check(queued(ma) == 10, "master A has %d bytes queued, expected 10", queued(ma));
	char buf[64] = {0};
	read_exact(ma, buf, 10);
	check(memcmp(buf, "queued-out", 10) == 0, "master A read '%.10s'", buf);
	check(queued(sa) == 9, "slave A has %d bytes queued, expected 9", queued(sa));

	/* C and G take over: G reads queued-in, says G-OK, gets ping; C writes via /dev/tty */
	check(write(go[1], "gg", 2) == 2, "go");
	memset(buf, 0, sizeof(buf));
	read_exact(ma, buf, 5);
	check(memcmp(buf, "G-OK\n", 5) == 0, "master A read '%.5s'", buf);
	check(write(ma, "ping", 4) == 4, "ping");
	memset(buf, 0, sizeof(buf));
	read_exact(ma, buf, 10);
	check(memcmp(buf, "via-devtty", 10) == 0, "master A read '%.10s'", buf);
	int status;
	check(waitpid(c, &status, 0) == c, "waitpid C");
	check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "C ended with %#x", status);

	/* B: dead peer, O_NONBLOCK: what the slave wrote, then EIO */
	struct pollfd pfd = { .fd = mb, .events = POLLIN };
	check(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLHUP), "B: revents %#x", pfd.revents);
	memset(buf, 0, sizeof(buf));
	check(read(mb, buf, sizeof(buf)) == 9 && memcmp(buf, "dead-data", 9) == 0, "B: read '%.9s'", buf);
	check(read(mb, buf, 1) < 0 && errno == EIO, "B: read gave %s", strerror(errno));
	check(fcntl(mb, F_GETFL) & O_NONBLOCK, "B lost O_NONBLOCK");

	/* L: locked, slave never opened */
	int lock = 0;
	check(ioctl(ml, TIOCGPTLCK, &lock) == 0 && lock == 1, "L: lock %d", lock);
	pfd.fd = ml;
	pfd.revents = 0;
	check(poll(&pfd, 1, 0) >= 0 && !(pfd.revents & POLLHUP), "L: revents %#x", pfd.revents);
	/* through the master (TIOCGPTPEER), not ptsname(): glibc's ptsname names /dev/pts
	 * even when the master comes from a devpts mounted elsewhere */
	check(ioctl(ml, TIOCGPTPEER, O_RDWR | O_NOCTTY) < 0 && errno == EIO, "L: slave opened (%s)", strerror(errno));

	/* P: packet mode, queued data comes with its TIOCPKT_DATA byte */
	int pkt = 0;
	check(ioctl(mp, TIOCGPKT, &pkt) == 0 && pkt == 1, "P: packet %d", pkt);
	memset(buf, 0, sizeof(buf));
	check(read(mp, buf, sizeof(buf)) == 9 && buf[0] == 0 && memcmp(buf + 1, "pkt-data", 8) == 0,
	      "P: read '%.9s'", buf);
	check(write(sp, "more", 4) == 4, "P: write");
	memset(buf, 0, sizeof(buf));
	check(read(mp, buf, sizeof(buf)) == 5 && buf[0] == 0 && memcmp(buf + 1, "more", 4) == 0, "P: read 2");
	pass();
	return 0;
}
