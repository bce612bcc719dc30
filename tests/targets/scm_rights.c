/* scm_rights.c DIR -- file descriptors in flight (SCM_RIGHTS) in unix socket queues.
 *
 *   st[2]   stream socketpair, queued st[0] -> st[1] in three sends:
 *             100 bytes 'A' (no fds), 10 bytes 'B' carrying seven fds, 50 bytes 'C' (no fds):
 *             reg    DIR/data opened, at offset 5, closed here (only in flight)
 *             shared DIR/shared at offset 3, also kept here as `keep` (one description)
 *             prd    a pipe's read end with "pipe-data" queued; its write end `pw` kept
 *             x1     a socketpair end with "x-data" queued; its peer `x0` kept
 *             efd    an eventfd with count 7, closed here
 *             y0     a socketpair end which itself has an eventfd (count 3) in flight in its
 *                    queue, after "y-data"; its peer `y1` kept
 *             gone   DIR/gone opened and unlinked (deleted while in flight), "ghost" in it
 *   dg[2]   datagram socketpair, three messages on dg[1]: "m1" (no fds), "m2" carrying
 *           a second description of DIR/data at offset 0, "m3" carrying z1
 *   z0      made first, so dumped before any queue is peeked: a socketpair end whose peer z1
 *           is only in flight (its peer looks external until the dump finds z1 in m3);
 *           "z-data" queued on z1
 * After SIGUSR1 every queue is read back: the stream's first read gets A and B with B's fds,
 * the next one C without any, each received fd is checked (offsets, queued data,
 * counts, connections to the kept ends, the shared description by kcmp), the nested eventfd
 * comes out of y0, and the datagrams arrive in order with their fds.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#define NFDS 7

static int st[2], dg[2], keep, pw, x0, y1, z0;
static char dir[3000];

static void sendfds(int sk, const void *buf, size_t n, const int *fds, int nfds, const char *what)
{
	struct iovec iov = { (void *)buf, n };
	char cbuf[CMSG_SPACE(sizeof(int) * NFDS)];
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		memset(cbuf, 0, sizeof(cbuf));
		m.msg_control = cbuf;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	ssize_t w = sendmsg(sk, &m, MSG_NOSIGNAL);
	check(w == (ssize_t)n, "sendmsg %s: %zd (%s)", what, w, strerror(errno));
}

/* Exactly n bytes (or one datagram), and the fds that came with them. */
static ssize_t recvfds(int sk, void *buf, size_t n, int *fds, int *nfds, const char *what)
{
	struct iovec iov = { buf, n };
	char cbuf[CMSG_SPACE(sizeof(int) * NFDS * 2)];
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			    .msg_controllen = sizeof(cbuf) };
	ssize_t r = recvmsg(sk, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	check(r >= 0, "recvmsg %s: %s", what, strerror(errno));
	check(!(m.msg_flags & MSG_CTRUNC), "recvmsg %s: control data truncated", what);
	*nfds = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			memcpy(fds + *nfds, CMSG_DATA(c), sizeof(int) * k);
			*nfds += k;
		}
	}
	return r;
}

static int open_file(const char *name, const char *content, int flags)
{
	char p[4096];
	snprintf(p, sizeof(p), "%s/%s", dir, name);
	int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | flags, 0600);
	check(fd >= 0, "open %s: %s", p, strerror(errno));
	check(write(fd, content, strlen(content)) == (ssize_t)strlen(content), "write %s", p);
	return fd;
}

static void expect_read(int fd, const char *want, const char *what)
{
	char b[256];
	ssize_t n = read(fd, b, sizeof(b) - 1);
	check(n == (ssize_t)strlen(want) && !memcmp(b, want, n), "%s: read %zd bytes, want \"%s\"", what, n, want);
}

static void expect_recv(int fd, const char *want, const char *what)
{
	char b[256];
	ssize_t n = recv(fd, b, sizeof(b), MSG_DONTWAIT);
	check(n == (ssize_t)strlen(want) && !memcmp(b, want, n), "%s: recv %zd bytes, want \"%s\" (%s)", what, n,
	      want, n < 0 ? strerror(errno) : "");
}

static uint64_t evread(int fd, const char *what)
{
	uint64_t v = 0;
	check(read(fd, &v, 8) == 8, "%s: eventfd read: %s", what, strerror(errno));
	return v;
}

static void setup(void)
{
	int z[2];
	check(!socketpair(AF_UNIX, SOCK_STREAM, 0, z), "socketpair: %s", strerror(errno));
	check(send(z[0], "z-data", 6, 0) == 6, "send z");
	z0 = z[0];
	check(!socketpair(AF_UNIX, SOCK_STREAM, 0, st), "socketpair: %s", strerror(errno));
	check(!socketpair(AF_UNIX, SOCK_DGRAM, 0, dg), "socketpair: %s", strerror(errno));

	int reg = open_file("data", "0123456789abcdef", 0);
	check(lseek(reg, 5, SEEK_SET) == 5, "lseek");
	keep = open_file("shared", "shared-file", 0);
	check(lseek(keep, 3, SEEK_SET) == 3, "lseek");
	int p[2];
	check(!pipe2(p, 0), "pipe");
	check(write(p[1], "pipe-data", 9) == 9, "pipe write");
	pw = p[1];
	int x[2], y[2];
	check(!socketpair(AF_UNIX, SOCK_STREAM, 0, x), "socketpair");
	check(send(x[0], "x-data", 6, 0) == 6, "send x");
	x0 = x[0];
	int efd = eventfd(7, EFD_NONBLOCK);
	check(efd >= 0, "eventfd");
	check(!socketpair(AF_UNIX, SOCK_STREAM, 0, y), "socketpair");
	int efd2 = eventfd(3, 0);
	check(efd2 >= 0, "eventfd");
	sendfds(y[1], "y-data", 6, &efd2, 1, "y");
	close(efd2);
	y1 = y[1];
	int gone = open_file("gone", "ghost", 0);
	char gp[4096];
	snprintf(gp, sizeof(gp), "%s/gone", dir);
	check(!unlink(gp), "unlink");
	check(lseek(gone, 0, SEEK_SET) == 0, "lseek");

	char a[100], b[10], c[50];
	memset(a, 'A', sizeof(a));
	memset(b, 'B', sizeof(b));
	memset(c, 'C', sizeof(c));
	int fds[NFDS] = { reg, keep, p[0], x[1], efd, y[0], gone };
	sendfds(st[0], a, sizeof(a), NULL, 0, "A");
	sendfds(st[0], b, sizeof(b), fds, NFDS, "B");
	sendfds(st[0], c, sizeof(c), NULL, 0, "C");
	close(reg); close(p[0]); close(x[1]); close(efd); close(y[0]); close(gone);

	int d = open_file("data2", "", 0);
	close(d);
	char dp[4096];
	snprintf(dp, sizeof(dp), "%s/data", dir);
	d = open(dp, O_RDONLY);
	check(d >= 0, "open data");
	sendfds(dg[0], "m1", 2, NULL, 0, "m1");
	sendfds(dg[0], "m2", 2, &d, 1, "m2");
	sendfds(dg[0], "m3", 2, &z[1], 1, "m3");
	close(d);
	close(z[1]);
}

static void verify(void)
{
	char buf[256];
	int fds[NFDS * 2], n;

	/* One read takes A and B (the kernel glues stream pieces up to one with fds) and B's
	 * fds.  (Reading fewer bytes than 110 first is where a restore differs: see unix.py.) */
	ssize_t r = recvfds(st[1], buf, sizeof(buf), fds, &n, "A+B");
	check(r == 110 && buf[0] == 'A' && buf[99] == 'A' && buf[100] == 'B' && buf[109] == 'B',
	      "A+B: got %zd bytes", r);
	check(n == NFDS, "A+B came with %d fds, want %d", n, NFDS);
	int reg = fds[0], shared = fds[1], prd = fds[2], x1 = fds[3], efd = fds[4], y0 = fds[5], gone = fds[6];

	check(lseek(reg, 0, SEEK_CUR) == 5, "reg: offset %ld, want 5", (long)lseek(reg, 0, SEEK_CUR));
	expect_read(reg, "56789abcdef", "reg");
	check(syscall(SYS_kcmp, getpid(), getpid(), 0, shared, keep) == 0,
	      "the fd in flight and the kept fd of DIR/shared are no longer one description");
	check(lseek(keep, 0, SEEK_CUR) == 3, "shared: offset %ld, want 3", (long)lseek(keep, 0, SEEK_CUR));
	expect_read(shared, "red-file", "shared");
	expect_read(prd, "pipe-data", "pipe");
	check(write(pw, "more", 4) == 4, "pipe write after restore");
	expect_read(prd, "more", "pipe after restore");
	expect_recv(x1, "x-data", "x1");
	check(send(x0, "ping", 4, 0) == 4, "send x0");
	expect_recv(x1, "ping", "x1 after restore");
	check(evread(efd, "efd") == 7, "efd count");
	check(fcntl(efd, F_GETFL) & O_NONBLOCK, "efd lost O_NONBLOCK");
	expect_read(gone, "ghost", "deleted file");

	int inner[NFDS], ni;
	r = recvfds(y0, buf, sizeof(buf), inner, &ni, "y0");
	check(r == 6 && !memcmp(buf, "y-data", 6) && ni == 1, "y0: %zd bytes, %d fds", r, ni);
	check(evread(inner[0], "nested eventfd") == 3, "nested eventfd count");
	check(send(y0, "hi", 2, 0) == 2, "send y0");
	expect_recv(y1, "hi", "y1");

	r = recvfds(st[1], buf, sizeof(buf), fds, &n, "C");
	check(r == 50 && buf[0] == 'C' && buf[49] == 'C' && n == 0, "C: %zd bytes, %d fds", r, n);
	r = recv(st[1], buf, sizeof(buf), MSG_DONTWAIT);
	check(r < 0 && errno == EAGAIN, "stream queue not empty after C: %zd", r);

	static const char *want[] = { "m1", "m2", "m3" };
	for (int i = 0; i < 3; i++) {
		r = recvfds(dg[1], buf, sizeof(buf), fds, &n, want[i]);
		check(r == 2 && !memcmp(buf, want[i], 2), "datagram %d: %zd bytes", i, r);
		check(n == (i != 0), "datagram %s came with %d fds", want[i], n);
		if (i == 1) {
			check(lseek(fds[0], 0, SEEK_CUR) == 0, "m2's file at %ld", (long)lseek(fds[0], 0, SEEK_CUR));
			expect_read(fds[0], "0123456789abcdef", "m2's file");
		}
		if (i == 2) {
			expect_recv(fds[0], "z-data", "z1");
			check(send(fds[0], "zz", 2, 0) == 2, "send z1");
			expect_recv(z0, "zz", "z0");
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 2) { zdtm_msg("FAIL: usage: scm_rights DIR"); return 1; }
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	zdtm_init(0);
	setup();
	ready();
	wait_usr1_polling();
	if (corrupt_requested()) {          /* take the fds of the B piece out of the queue */
		char b[110];
		int f[NFDS * 2], n;
		recvfds(st[1], b, sizeof(b), f, &n, "corrupt");
		for (int i = 0; i < n; i++) close(f[i]);
	}
	verify();
	pass();
}
