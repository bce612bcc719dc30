/* unix_sockets.c DIR -- unix domain sockets of every kind in one process.
 *
 *   st[2]   stream socketpair: 100000 bytes queued st[1]->st[0] (in 3 writes), 7000 st[0]->st[1];
 *           st[0] has SO_RCVBUF set, st[1] is O_NONBLOCK
 *   dg[2]   dgram socketpair: 6 messages of sizes 1, 0, 100, 3000, 60000, 7 queued on dg[0];
 *           2 on dg[1]; dg[0] O_NONBLOCK
 *   sp[2]   seqpacket socketpair: 2 records queued on sp[1]; sp[1] has SO_PEEK_OFF 0;
 *           a thread is blocked in recv(sp[0]) (nothing queued there)
 *   lst     stream listener on DIR/listen.sock, backlog 4, mode 0600;
 *           cli + acc: a connection accepted from it, with data queued both ways;
 *           pend: a connection not accepted yet
 *   ab      dgram socket bound to the abstract name "\0nbck-unix-PID", SO_PASSCRED;
 *           q: dgram socket connect()ed to it, 2 messages sent; u: unbound, 1 message sent
 *   hs[2]   stream pair: hs[0] wrote "bye" then shutdown(SHUT_WR)
 *   dead    stream socket whose peer wrote "last words" and closed
 * After SIGUSR1 everything above is checked: queues byte for byte and message by message,
 * names, peers, options, flags, shutdown/EOF states; the blocked thread is still blocked
 * until a record is sent to it, then wakes with it; all connections still carry data.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#ifndef SO_PEEK_OFF
#define SO_PEEK_OFF 42
#endif

#define ST_TO0 100000
#define ST_TO1 7000
static const int dg_sizes[] = { 1, 0, 100, 3000, 60000, 7 };
#define NDG (int)(sizeof(dg_sizes) / sizeof(dg_sizes[0]))

static int st[2], dg[2], sp[2], hs[2], lst, cli, acc, pend, ab, q, u, dead;
static char lpath[sizeof(((struct sockaddr_un *)0)->sun_path)];
static struct sockaddr_un ab_addr;
static socklen_t ab_len;
static int rcvbuf_set;

static volatile pid_t waiter_tid;
static volatile int waiter_done;
static char waiter_buf[64];
static volatile ssize_t waiter_n;
static volatile int waiter_errno;

static unsigned char pat(int stream, size_t i) { return (unsigned char)(i * 13 + stream * 7 + (i >> 8)); }

static void fill(unsigned char *b, size_t n, int stream)
{
	for (size_t i = 0; i < n; i++)
		b[i] = pat(stream, i);
}

static void xsend(int fd, const void *b, size_t n, const char *what)
{
	ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
	check(w == (ssize_t)n, "send %s: %zd of %zu (%s)", what, w, n, strerror(errno));
}

static void *waiter(void *arg)
{
	(void)arg;
	waiter_tid = zdtm_gettid();
	ssize_t n;
	do
		n = recv(sp[0], waiter_buf, sizeof(waiter_buf), 0);
	while (n < 0 && errno == EINTR);
	waiter_errno = errno;
	waiter_n = n;
	__atomic_store_n(&waiter_done, 1, __ATOMIC_RELEASE);
	return NULL;
}

static long blocked_in(pid_t tid)
{
	char path[64], buf[256];
	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", tid);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -2;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -2;
	buf[n] = 0;
	return strtol(buf, NULL, 10);
}

static void set_nonblock(int fd)
{
	check(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0, "F_SETFL");
}

static int is_nonblock(int fd) { return !!(fcntl(fd, F_GETFL) & O_NONBLOCK); }

static int sotype(int fd)
{
	int t = -1;
	socklen_t l = sizeof(t);
	check(getsockopt(fd, SOL_SOCKET, SO_TYPE, &t, &l) == 0, "SO_TYPE of %d", fd);
	return t;
}

static int getopt_int(int fd, int opt)
{
	int v = -12345;
	socklen_t l = sizeof(v);
	check(getsockopt(fd, SOL_SOCKET, opt, &v, &l) == 0, "getsockopt %d of fd %d: %s", opt, fd,
	      strerror(errno));
	return v;
}

/* read exactly n bytes, non-blocking: everything must already be queued */
static void read_stream(int fd, unsigned char *b, size_t n, const char *what)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = recv(fd, b + got, n - got, MSG_DONTWAIT);
		check(r > 0, "%s: read %zu of %zu bytes, then %zd (%s)", what, got, n, r,
		      r < 0 ? strerror(errno) : "EOF");
		got += r;
	}
}

static void expect_empty(int fd, const char *what)
{
	char c;
	ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
	check(r < 0 && errno == EAGAIN, "%s: expected an empty queue, got %zd (%s)", what, r,
	      r < 0 ? strerror(errno) : "data/EOF");
}

static void expect_eof(int fd, const char *what)
{
	char c;
	ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
	check(r == 0, "%s: expected EOF, got %zd (%s)", what, r, r < 0 ? strerror(errno) : "data");
}

static void setup(const char *dir)
{
	unsigned char *big = malloc(ST_TO0);
	check(big, "malloc");

	/* stream pair */
	check(socketpair(AF_UNIX, SOCK_STREAM, 0, st) == 0, "socketpair stream");
	rcvbuf_set = 300000;
	check(setsockopt(st[0], SOL_SOCKET, SO_RCVBUF, &rcvbuf_set, sizeof(rcvbuf_set)) == 0, "SO_RCVBUF");
	rcvbuf_set = getopt_int(st[0], SO_RCVBUF);
	fill(big, ST_TO0, 0);
	xsend(st[1], big, 1000, "st1 a");
	xsend(st[1], big + 1000, 49000, "st1 b");
	xsend(st[1], big + 50000, ST_TO0 - 50000, "st1 c");
	fill(big, ST_TO1, 1);
	xsend(st[0], big, ST_TO1, "st0");
	set_nonblock(st[1]);

	/* dgram pair */
	check(socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) == 0, "socketpair dgram");
	for (int i = 0; i < NDG; i++) {
		fill(big, dg_sizes[i], 10 + i);
		xsend(dg[1], big, dg_sizes[i], "dg1");
	}
	xsend(dg[0], "first", 5, "dg0");
	xsend(dg[0], "second!", 7, "dg0");
	set_nonblock(dg[0]);

	/* seqpacket pair */
	check(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp) == 0, "socketpair seqpacket");
	xsend(sp[0], "record one", 10, "sp0");
	xsend(sp[0], "record two!", 11, "sp0");
	int zero = 0;
	check(setsockopt(sp[1], SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof(zero)) == 0, "SO_PEEK_OFF");

	/* named listener, an accepted connection, a pending one */
	snprintf(lpath, sizeof(lpath), "%s/listen.sock", dir);
	unlink(lpath);
	struct sockaddr_un la = { .sun_family = AF_UNIX };
	strcpy(la.sun_path, lpath);
	lst = socket(AF_UNIX, SOCK_STREAM, 0);
	check(lst >= 0 && bind(lst, (void *)&la, sizeof(la)) == 0, "bind %s: %s", lpath, strerror(errno));
	check(chmod(lpath, 0600) == 0, "chmod");
	check(listen(lst, 4) == 0, "listen");
	cli = socket(AF_UNIX, SOCK_STREAM, 0);
	check(connect(cli, (void *)&la, sizeof(la)) == 0, "connect cli: %s", strerror(errno));
	acc = accept(lst, NULL, NULL);
	check(acc >= 0, "accept");
	xsend(cli, "from the client", 15, "cli");
	xsend(acc, "from the server", 15, "acc");
	xsend(acc, " again", 6, "acc");
	pend = socket(AF_UNIX, SOCK_STREAM, 0);
	check(connect(pend, (void *)&la, sizeof(la)) == 0, "connect pend: %s", strerror(errno));

	/* abstract dgram with a connected sender and an unbound one */
	ab_addr.sun_family = AF_UNIX;
	int l = snprintf(ab_addr.sun_path + 1, sizeof(ab_addr.sun_path) - 1, "nbck-unix-%d", getpid());
	ab_len = offsetof(struct sockaddr_un, sun_path) + 1 + l;
	ab = socket(AF_UNIX, SOCK_DGRAM, 0);
	check(ab >= 0 && bind(ab, (void *)&ab_addr, ab_len) == 0, "bind abstract: %s", strerror(errno));
	q = socket(AF_UNIX, SOCK_DGRAM, 0);
	check(connect(q, (void *)&ab_addr, ab_len) == 0, "connect q: %s", strerror(errno));
	xsend(q, "q1", 2, "q");
	xsend(q, "q-two", 5, "q");
	u = socket(AF_UNIX, SOCK_DGRAM, 0);
	check(sendto(u, "from u", 6, 0, (void *)&ab_addr, ab_len) == 6, "sendto ab: %s", strerror(errno));
	int one = 1;
	check(setsockopt(ab, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) == 0, "SO_PASSCRED");

	/* half-closed pair and a socket whose peer is gone */
	check(socketpair(AF_UNIX, SOCK_STREAM, 0, hs) == 0, "socketpair hs");
	xsend(hs[0], "bye", 3, "hs0");
	check(shutdown(hs[0], SHUT_WR) == 0, "shutdown");
	int kp[2];
	check(socketpair(AF_UNIX, SOCK_STREAM, 0, kp) == 0, "socketpair kp");
	xsend(kp[1], "last words", 10, "kp1");
	close(kp[1]);
	dead = kp[0];
	free(big);
}

static void verify(void)
{
	unsigned char *big = malloc(ST_TO0), *want = malloc(ST_TO0);
	check(big && want, "malloc");

	/* types and flags first: nothing has been read yet */
	check(sotype(st[0]) == SOCK_STREAM && sotype(dg[0]) == SOCK_DGRAM && sotype(sp[0]) == SOCK_SEQPACKET
	      && sotype(lst) == SOCK_STREAM && sotype(ab) == SOCK_DGRAM, "socket types changed");
	check(is_nonblock(st[1]) && is_nonblock(dg[0]) && !is_nonblock(st[0]) && !is_nonblock(dg[1])
	      && !is_nonblock(lst), "O_NONBLOCK flags changed");
	check(getopt_int(st[0], SO_RCVBUF) == rcvbuf_set, "SO_RCVBUF %d, want %d", getopt_int(st[0], SO_RCVBUF),
	      rcvbuf_set);
	check(getopt_int(ab, SO_PASSCRED) == 1, "SO_PASSCRED lost");
	check(getopt_int(q, SO_PASSCRED) == 0, "SO_PASSCRED set on q");
	check(getopt_int(sp[1], SO_PEEK_OFF) == 0, "SO_PEEK_OFF of sp[1] is %d", getopt_int(sp[1], SO_PEEK_OFF));
	check(getopt_int(sp[0], SO_PEEK_OFF) == -1, "SO_PEEK_OFF of sp[0] is %d", getopt_int(sp[0], SO_PEEK_OFF));
	check(getopt_int(lst, SO_ACCEPTCONN) == 1, "the listener is not listening");

	/* the blocked thread is still blocked */
	msleep(50);
	check(!__atomic_load_n(&waiter_done, __ATOMIC_ACQUIRE), "the recv thread woke up by itself (%zd, %s)",
	      waiter_n, strerror(waiter_errno));

	/* stream pair */
	read_stream(st[0], big, ST_TO0, "st[0]");
	fill(want, ST_TO0, 0);
	check(memcmp(big, want, ST_TO0) == 0, "st[0] data differs");
	expect_empty(st[0], "st[0]");
	read_stream(st[1], big, ST_TO1, "st[1]");
	fill(want, ST_TO1, 1);
	check(memcmp(big, want, ST_TO1) == 0, "st[1] data differs");
	expect_empty(st[1], "st[1]");
	xsend(st[0], "ping", 4, "st0 after");
	read_stream(st[1], big, 4, "st[1] after");
	check(memcmp(big, "ping", 4) == 0, "st ping");

	/* dgram pair */
	for (int i = 0; i < NDG; i++) {
		ssize_t r = recv(dg[0], big, ST_TO0, MSG_DONTWAIT);
		check(r == dg_sizes[i], "dg[0] message %d: %zd bytes, want %d (%s)", i, r, dg_sizes[i],
		      r < 0 ? strerror(errno) : "");
		fill(want, dg_sizes[i], 10 + i);
		check(memcmp(big, want, r) == 0, "dg[0] message %d differs", i);
	}
	expect_empty(dg[0], "dg[0]");
	ssize_t r = recv(dg[1], big, 100, MSG_DONTWAIT);
	check(r == 5 && memcmp(big, "first", 5) == 0, "dg[1] message 0 (%zd)", r);
	r = recv(dg[1], big, 100, MSG_DONTWAIT);
	check(r == 7 && memcmp(big, "second!", 7) == 0, "dg[1] message 1 (%zd)", r);
	expect_empty(dg[1], "dg[1]");
	xsend(dg[1], "later", 5, "dg1 after");
	r = recv(dg[0], big, 100, MSG_DONTWAIT);
	check(r == 5, "dg after (%zd)", r);

	/* seqpacket: queued records, then wake the thread */
	r = recv(sp[1], big, 100, MSG_DONTWAIT);
	check(r == 10 && memcmp(big, "record one", 10) == 0, "sp[1] record 0 (%zd)", r);
	r = recv(sp[1], big, 100, MSG_DONTWAIT);
	check(r == 11 && memcmp(big, "record two!", 11) == 0, "sp[1] record 1 (%zd)", r);
	expect_empty(sp[1], "sp[1]");
	xsend(sp[1], "wake up", 7, "sp1");
	double t0 = now_mono();
	while (!__atomic_load_n(&waiter_done, __ATOMIC_ACQUIRE)) {
		check(now_mono() - t0 < 5, "the thread blocked in recv did not wake (in syscall %ld)",
		      blocked_in(waiter_tid));
		msleep(2);
	}
	check(waiter_n == 7 && memcmp(waiter_buf, "wake up", 7) == 0, "the woken thread got %zd bytes (%s)",
	      waiter_n, waiter_n < 0 ? strerror(waiter_errno) : "");

	/* the listener and its connections */
	struct sockaddr_un a;
	socklen_t al = sizeof(a);
	check(getsockname(lst, (void *)&a, &al) == 0 && strcmp(a.sun_path, lpath) == 0,
	      "listener name is %s, want %s", a.sun_path, lpath);
	struct stat sst;
	check(stat(lpath, &sst) == 0 && S_ISSOCK(sst.st_mode), "%s is not a socket file", lpath);
	check((sst.st_mode & 0777) == 0600, "%s has mode %o", lpath, sst.st_mode & 0777);
	read_stream(acc, big, 15, "acc");
	check(memcmp(big, "from the client", 15) == 0, "acc data");
	expect_empty(acc, "acc");
	read_stream(cli, big, 21, "cli");
	check(memcmp(big, "from the server again", 21) == 0, "cli data");
	expect_empty(cli, "cli");
	al = sizeof(a);
	check(getpeername(cli, (void *)&a, &al) == 0 && strcmp(a.sun_path, lpath) == 0, "cli peer name");
	al = sizeof(a);
	check(getpeername(pend, (void *)&a, &al) == 0 && strcmp(a.sun_path, lpath) == 0,
	      "pending client's peer name");
	struct pollfd pf = { .fd = lst, .events = POLLIN };
	check(poll(&pf, 1, 2000) == 1, "no pending connection on the listener");
	int acc2 = accept(lst, NULL, NULL);
	check(acc2 >= 0, "accept: %s", strerror(errno));
	xsend(pend, "hello pending", 13, "pend");
	read_stream(acc2, big, 13, "acc2");
	check(memcmp(big, "hello pending", 13) == 0, "acc2 data");
	xsend(acc2, "ok", 2, "acc2");
	read_stream(pend, big, 2, "pend");
	pf.revents = 0;
	check(poll(&pf, 1, 0) == 0, "a second pending connection appeared");
	/* the listener still takes new connections at its path */
	int c3 = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un la = { .sun_family = AF_UNIX };
	strcpy(la.sun_path, lpath);
	check(connect(c3, (void *)&la, sizeof(la)) == 0, "new connect to %s: %s", lpath, strerror(errno));
	int acc3 = accept(lst, NULL, NULL);
	check(acc3 >= 0, "accept 3");

	/* abstract dgram */
	char abuf[100];
	struct sockaddr_un from;
	const char *abw[] = { "q1", "q-two", "from u" };
	for (int i = 0; i < 3; i++) {
		r = recv(ab, abuf, sizeof(abuf), MSG_DONTWAIT);
		check(r == (ssize_t)strlen(abw[i]) && memcmp(abuf, abw[i], r) == 0, "ab message %d (%zd)", i, r);
	}
	expect_empty(ab, "ab");
	al = sizeof(a);
	check(getsockname(ab, (void *)&a, &al) == 0 && al == ab_len && memcmp(&a, &ab_addr, al) == 0,
	      "abstract name changed");
	al = sizeof(a);
	check(getpeername(q, (void *)&a, &al) == 0 && al == ab_len && memcmp(&a, &ab_addr, al) == 0,
	      "q is no longer connected to the abstract name");
	xsend(q, "q3", 2, "q after");
	check(sendto(u, "u2", 2, 0, (void *)&ab_addr, ab_len) == 2, "sendto ab after: %s", strerror(errno));
	al = sizeof(from);
	r = recvfrom(ab, abuf, sizeof(abuf), MSG_DONTWAIT, (void *)&from, &al);
	check(r == 2 && memcmp(abuf, "q3", 2) == 0, "ab after q (%zd)", r);
	r = recv(ab, abuf, sizeof(abuf), MSG_DONTWAIT);
	check(r == 2 && memcmp(abuf, "u2", 2) == 0, "ab after u (%zd)", r);

	/* half-closed and dead */
	read_stream(hs[1], big, 3, "hs[1]");
	check(memcmp(big, "bye", 3) == 0, "hs data");
	expect_eof(hs[1], "hs[1]");
	check(send(hs[0], "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 && errno == EPIPE,
	      "hs[0] can still send after SHUT_WR");
	xsend(hs[1], "back", 4, "hs1");
	read_stream(hs[0], big, 4, "hs[0]");
	read_stream(dead, big, 10, "dead");
	check(memcmp(big, "last words", 10) == 0, "dead data");
	expect_eof(dead, "dead");
	free(big);
	free(want);
}

int main(int argc, char **argv)
{
	check(argc > 1, "usage: unix_sockets DIR");
	zdtm_init(1);
	signal(SIGPIPE, SIG_IGN);
	setup(argv[1]);
	pthread_t th;
	check(pthread_create(&th, NULL, waiter, NULL) == 0, "pthread_create");
	while (!waiter_tid)
		msleep(1);
	double t0 = now_mono();
	while (blocked_in(waiter_tid) != SYS_recvfrom) {
		check(now_mono() - t0 < 10, "the waiter never blocked in recv (in %ld)", blocked_in(waiter_tid));
		msleep(2);
	}
	ready();
	sigset_t wait_mask;
	sigprocmask(SIG_SETMASK, NULL, &wait_mask);
	sigdelset(&wait_mask, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&wait_mask);
	if (corrupt_requested()) {
		char c;
		(void)!recv(dg[0], &c, 1, MSG_DONTWAIT);	/* lose a queued message */
	}
	verify();
	pthread_join(th, NULL);
	pass();
}
