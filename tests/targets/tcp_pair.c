/* tcp_pair.c -- loopback TCP connections with both ends in the process, queues not full: what an
 * ordinary user's restore rebuilds without TCP_REPAIR (files/inet_plain.py), and root's with it.
 *
 *   lst      TCP listener on 127.0.0.1, ephemeral port, SO_REUSEADDR (as servers and libzmq set), backlog 5
 *   cli/srv  a connection through lst: cli (O_NONBLOCK, TCP_NODELAY) sent 20000 bytes, srv
 *            (SO_KEEPALIVE) sent 5000 bytes; nobody read anything
 *   hc/hs    another connection through lst: hc sent 3000 bytes and shutdown(SHUT_WR); hs has
 *            not read them (CLOSE_WAIT)
 *   pend     connected to lst, never accepted: it waits in lst's accept queue
 *   lst6     TCP listener on [::1] (IPV6_V6ONLY, SO_REUSEADDR); c6/s6 a connection through it: c6 sent 1000
 *            bytes, unread
 * After SIGUSR1: the listeners' ports; every connection's ends see each other and the server
 * ends are on their listener's port (a client end may come back on a new port: see
 * inet_plain.py); each queue byte for byte, then nothing more; EOF after hs's data; both
 * directions of every connection; pend accepted by lst; options and flags.
 */
#include "zdtm.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define CLI_TO_SRV 20000
#define SRV_TO_CLI 5000
#define HALF 3000
#define V6 1000

static int lst, lst6, cli, srv, hc, hs, pend, c6, s6;
static int port_lst, port_lst6;

static unsigned char pat(int stream, size_t i) { return (unsigned char)((i * 131) ^ (i >> 9) ^ (stream * 29)); }

static void fill(unsigned char *b, size_t n, int stream)
{
	for (size_t i = 0; i < n; i++)
		b[i] = pat(stream, i);
}

static void name_of(int fd, int peer, struct sockaddr_storage *a)
{
	socklen_t l = sizeof(*a);
	memset(a, 0, sizeof(*a));
	int r = peer ? getpeername(fd, (void *)a, &l) : getsockname(fd, (void *)a, &l);
	check(r == 0, "get%sname(%d): %s", peer ? "peer" : "sock", fd, strerror(errno));
}

static int port_of(int fd)
{
	struct sockaddr_storage a;
	name_of(fd, 0, &a);
	return ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port : ((struct sockaddr_in *)&a)->sin_port);
}

/* a's peer is b and b's peer is a */
static void joined(int a, int b, const char *what)
{
	struct sockaddr_storage an, ap, bn, bp;
	name_of(a, 0, &an);
	name_of(a, 1, &ap);
	name_of(b, 0, &bn);
	name_of(b, 1, &bp);
	check(memcmp(&ap, &bn, sizeof(an)) == 0 && memcmp(&bp, &an, sizeof(an)) == 0, "%s: the ends do not see each other "
	      "(ports %d->%d and %d->%d)", what, port_of(a), ntohs(((struct sockaddr_in *)&ap)->sin_port), port_of(b),
	      ntohs(((struct sockaddr_in *)&bp)->sin_port));
}

static struct sockaddr_in lo4(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static int connect4(int port)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = lo4(port);
	check(s >= 0 && connect(s, (void *)&a, sizeof(a)) == 0, "connect to %d: %s", port, strerror(errno));
	return s;
}

static void xsend(int fd, const void *b, size_t n, const char *what)
{
	ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
	check(w == (ssize_t)n, "send %s: %zd of %zu (%s)", what, w, n, strerror(errno));
}

static void read_exact(int fd, unsigned char *b, size_t n, const char *what)
{
	size_t got = 0;
	double t0 = now_mono();
	while (got < n) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		check(now_mono() - t0 < 10, "%s: only %zu of %zu bytes within 10 s", what, got, n);
		if (poll(&p, 1, 100) <= 0)
			continue;
		ssize_t k = recv(fd, b + got, n - got, MSG_DONTWAIT);
		if (k < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		check(k > 0, "%s: recv after %zu of %zu bytes: %zd (%s)", what, got, n, k, k < 0 ? strerror(errno) : "EOF");
		got += k;
	}
}

/* exactly the stream's n bytes, then nothing more for now */
static void expect_stream(int fd, size_t n, int stream, const char *what)
{
	unsigned char *got = malloc(n), *want = malloc(n);
	check(got && want, "malloc");
	fill(want, n, stream);
	read_exact(fd, got, n, what);
	for (size_t i = 0; i < n; i++)
		check(got[i] == want[i], "%s: byte %zu of %zu differs", what, i, n);
	struct pollfd p = { .fd = fd, .events = POLLIN };
	check(poll(&p, 1, 50) == 0, "%s: more data than was sent", what);
	free(got);
	free(want);
}

static void ping(int a, int b, const char *what)
{
	unsigned char buf[16];
	xsend(a, "ping", 4, what);
	read_exact(b, buf, 4, what);
	check(memcmp(buf, "ping", 4) == 0, "%s: got %.4s", what, buf);
	xsend(b, "pong", 4, what);
	read_exact(a, buf, 4, what);
	check(memcmp(buf, "pong", 4) == 0, "%s: got %.4s", what, buf);
}

static int getint(int fd, int level, int opt)
{
	int v = -1;
	socklen_t l = sizeof(v);
	check(getsockopt(fd, level, opt, &v, &l) == 0, "getsockopt(%d, %d): %s", level, opt, strerror(errno));
	return v;
}

int main(void)
{
	zdtm_init(1);
	int one = 1;
	unsigned char buf[CLI_TO_SRV];

	lst = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a4 = lo4(0);
	check(setsockopt(lst, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0, "SO_REUSEADDR");
	check(lst >= 0 && bind(lst, (void *)&a4, sizeof(a4)) == 0 && listen(lst, 5) == 0, "listen: %s", strerror(errno));
	port_lst = port_of(lst);

	cli = connect4(port_lst);
	srv = accept(lst, NULL, NULL);
	check(srv >= 0, "accept: %s", strerror(errno));
	check(setsockopt(cli, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0, "TCP_NODELAY");
	check(setsockopt(srv, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) == 0, "SO_KEEPALIVE");
	check(fcntl(cli, F_SETFL, fcntl(cli, F_GETFL) | O_NONBLOCK) == 0, "O_NONBLOCK");
	fill(buf, CLI_TO_SRV, 1);
	xsend(cli, buf, CLI_TO_SRV, "cli->srv");
	fill(buf, SRV_TO_CLI, 2);
	xsend(srv, buf, SRV_TO_CLI, "srv->cli");

	hc = connect4(port_lst);
	hs = accept(lst, NULL, NULL);
	check(hs >= 0, "accept hs");
	fill(buf, HALF, 3);
	xsend(hc, buf, HALF, "hc->hs");
	check(shutdown(hc, SHUT_WR) == 0, "shutdown");

	pend = connect4(port_lst);

	lst6 = socket(AF_INET6, SOCK_STREAM, 0);
	check(lst6 >= 0, "socket6");
	check(setsockopt(lst6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) == 0, "IPV6_V6ONLY");
	check(setsockopt(lst6, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0, "SO_REUSEADDR");
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
	check(bind(lst6, (void *)&a6, sizeof(a6)) == 0 && listen(lst6, 3) == 0, "listen6: %s", strerror(errno));
	port_lst6 = port_of(lst6);
	c6 = socket(AF_INET6, SOCK_STREAM, 0);
	a6.sin6_port = htons(port_lst6);
	check(c6 >= 0 && connect(c6, (void *)&a6, sizeof(a6)) == 0, "connect6: %s", strerror(errno));
	s6 = accept(lst6, NULL, NULL);
	check(s6 >= 0, "accept6");
	fill(buf, V6, 4);
	xsend(c6, buf, V6, "c6->s6");

	msleep(50);     /* everything acknowledged */
	ready();
	sigset_t none;
	sigemptyset(&none);
	while (!zdtm_got_usr1)
		sigsuspend(&none);

	if (corrupt_requested()) {
		unsigned char c;
		check(recv(srv, &c, 1, 0) == 1, "corrupt");
	}

	check(port_of(lst) == port_lst && port_of(lst6) == port_lst6, "listener ports changed");
	check(port_of(srv) == port_lst && port_of(hs) == port_lst && port_of(s6) == port_lst6,
	      "a server end is not on its listener's port");
	joined(cli, srv, "cli/srv");
	joined(hc, hs, "hc/hs");
	joined(c6, s6, "c6/s6");
	check(fcntl(cli, F_GETFL) & O_NONBLOCK, "cli lost O_NONBLOCK");
	check(!(fcntl(srv, F_GETFL) & O_NONBLOCK), "srv became O_NONBLOCK");
	check(getint(cli, IPPROTO_TCP, TCP_NODELAY) == 1, "TCP_NODELAY lost");
	check(getint(srv, SOL_SOCKET, SO_KEEPALIVE) == 1, "SO_KEEPALIVE lost");
	check(getint(lst, SOL_SOCKET, SO_REUSEADDR) == 1 && getint(lst6, SOL_SOCKET, SO_REUSEADDR) == 1,
	      "SO_REUSEADDR lost on a listener");
	check(getint(srv, SOL_SOCKET, SO_REUSEADDR) == 1, "srv lost the SO_REUSEADDR it inherited from lst");
	check(getint(cli, SOL_SOCKET, SO_REUSEADDR) == 0 && getint(c6, SOL_SOCKET, SO_REUSEADDR) == 0,
	      "SO_REUSEADDR appeared on a client");
	check(getint(lst6, IPPROTO_IPV6, IPV6_V6ONLY) == 1, "IPV6_V6ONLY lost");

	expect_stream(srv, CLI_TO_SRV, 1, "cli->srv");
	expect_stream(cli, SRV_TO_CLI, 2, "srv->cli");
	ping(cli, srv, "cli<->srv");

	read_exact(hs, buf, HALF, "hc->hs");
	unsigned char want[HALF];
	fill(want, HALF, 3);
	check(memcmp(buf, want, HALF) == 0, "hc->hs data differs");
	check(recv(hs, buf, 1, MSG_DONTWAIT) == 0, "hs: no EOF after the data (%s)", strerror(errno));
	xsend(hs, "late", 4, "hs->hc");
	read_exact(hc, buf, 4, "hs->hc");
	check(memcmp(buf, "late", 4) == 0, "hs->hc data");

	expect_stream(s6, V6, 4, "c6->s6");
	ping(c6, s6, "c6<->s6");

	int ap = accept(lst, NULL, NULL);
	check(ap >= 0, "accept pend: %s", strerror(errno));
	joined(pend, ap, "pend/accepted");
	ping(pend, ap, "pend<->accepted");
	pass();
}
