/* tcp.c -- TCP and UDP sockets, IPv4 and IPv6, in one process (files/inet.py).
 *
 *   lst      TCP listener on 127.0.0.1, ephemeral port, SO_REUSEADDR, backlog 7
 *   cli/srv  a connection through lst: srv's SO_RCVBUF is cut to 8 KiB once accepted (its
 *            window was already open wider); cli (O_NONBLOCK, TCP_NODELAY, SO_SNDBUF 64 KiB)
 *            wrote until EAGAIN:
 *            part of it waits unread in srv's receive queue, the rest is still in cli's send
 *            queue, sent but dropped by srv (unacked: retransmitted) or never sent;
 *            srv (SO_KEEPALIVE) wrote 5000 bytes cli has not read
 *   hc/hs    another connection through lst: hc wrote 3000 bytes and shutdown(SHUT_WR)
 *            (FIN_WAIT2); hs has not read them (CLOSE_WAIT)
 *   pend     connected to lst2 (127.0.0.1), never accepted: it waits in lst2's accept queue
 *   lst6     TCP listener on [::1], ephemeral port; a thread is blocked in accept(lst6)
 *   u1       UDP bound to 127.0.0.1; 3 datagrams from u2 wait in its queue
 *   u2       UDP bound to 127.0.0.1, connect()ed to u1; 1 datagram from u1 waits in its queue
 *   u6       UDP bound to [::1], unconnected, with a datagram it sent to itself
 * After SIGUSR1 everything is checked: the same ports, every queue byte for byte (the
 * stream cli->srv is one pattern, whatever part of it was where), options and flags, EOF after
 * hs's data, both directions of every connection, pend is accepted by lst2 with its port, the
 * accept thread wakes on a new IPv6 connection, UDP datagrams with their senders.
 */
#include "zdtm.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>

#define SRV_TO_CLI 5000
#define HALF 3000
#define MAXSTREAM (64 << 20)

static int lst, lst2, lst6, cli, srv, hc, hs, pend, u1, u2, u6;
static int port_lst, port_lst2, port_lst6, port_cli, port_srv, port_hc, port_pend, port_u1, port_u2, port_u6;
static size_t cli_sent;
static int rcvbuf_srv;

static volatile int acc_done, acc_fd = -1, acc_errno;
static volatile pid_t acc_tid;

static unsigned char pat(int stream, size_t i) { return (unsigned char)((i * 131) ^ (i >> 9) ^ (stream * 29)); }

static void fill(unsigned char *b, size_t off, size_t n, int stream)
{
	for (size_t i = 0; i < n; i++)
		b[i] = pat(stream, off + i);
}

static int port_of(int fd)
{
	struct sockaddr_storage a;
	socklen_t l = sizeof(a);
	check(getsockname(fd, (void *)&a, &l) == 0, "getsockname(%d): %s", fd, strerror(errno));
	return ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port : ((struct sockaddr_in *)&a)->sin_port);
}

static int peer_port(int fd)
{
	struct sockaddr_storage a;
	socklen_t l = sizeof(a);
	check(getpeername(fd, (void *)&a, &l) == 0, "getpeername(%d): %s", fd, strerror(errno));
	return ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port : ((struct sockaddr_in *)&a)->sin_port);
}

static struct sockaddr_in lo4(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static struct sockaddr_in6 lo6(int port)
{
	struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_LOOPBACK_INIT };
	return a;
}

static int listener4(void)
{
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	check(s >= 0, "socket");
	check(setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0, "SO_REUSEADDR");
	struct sockaddr_in a = lo4(0);
	check(bind(s, (void *)&a, sizeof(a)) == 0, "bind: %s", strerror(errno));
	check(listen(s, 7) == 0, "listen");
	return s;
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

/* Read exactly n bytes (fd may be non-blocking), within 10 s. */
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

static void *acceptor(void *arg)
{
	(void)arg;
	acc_tid = zdtm_gettid();
	int fd;
	do
		fd = accept(lst6, NULL, NULL);
	while (fd < 0 && errno == EINTR);
	acc_errno = errno;
	acc_fd = fd;
	__atomic_store_n(&acc_done, 1, __ATOMIC_RELEASE);
	return NULL;
}

static void udp_send(int from, int to_port, const char *msg)
{
	struct sockaddr_in a = lo4(to_port);
	check(sendto(from, msg, strlen(msg), 0, (void *)&a, sizeof(a)) == (ssize_t)strlen(msg), "sendto: %s",
	      strerror(errno));
}

static void udp_expect(int fd, const char *msg, int from_port, const char *what)
{
	char buf[256];
	struct sockaddr_storage a;
	socklen_t l = sizeof(a);
	struct pollfd p = { .fd = fd, .events = POLLIN };
	check(poll(&p, 1, 5000) == 1, "%s: no datagram", what);
	ssize_t k = recvfrom(fd, buf, sizeof(buf), MSG_DONTWAIT, (void *)&a, &l);
	check(k == (ssize_t)strlen(msg) && memcmp(buf, msg, k) == 0, "%s: got %zd bytes \"%.*s\", want \"%s\"", what, k,
	      (int)(k > 0 ? k : 0), buf, msg);
	int port = ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port : ((struct sockaddr_in *)&a)->sin_port);
	check(port == from_port, "%s: from port %d, want %d", what, port, from_port);
}

int main(void)
{
	zdtm_init(1);
	int one = 1;

	/* the main connection */
	lst = listener4();
	port_lst = port_of(lst);
	cli = connect4(port_lst);
	srv = accept(lst, NULL, NULL);
	check(srv >= 0, "accept: %s", strerror(errno));
	int small = 8192, sndbuf = 65536;
	check(setsockopt(srv, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) == 0, "SO_RCVBUF");
	check(setsockopt(cli, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)) == 0, "SO_SNDBUF");
	check(setsockopt(cli, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0, "TCP_NODELAY");
	check(setsockopt(srv, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) == 0, "SO_KEEPALIVE");
	check(fcntl(cli, F_SETFL, fcntl(cli, F_GETFL) | O_NONBLOCK) == 0, "O_NONBLOCK");
	rcvbuf_srv = getint(srv, SOL_SOCKET, SO_RCVBUF);
	port_cli = port_of(cli);
	port_srv = port_of(srv);
	unsigned char *buf = malloc(1 << 16);
	check(buf != NULL, "malloc");
	for (;;) {
		fill(buf, cli_sent, 1 << 16, 1);
		ssize_t w = send(cli, buf, 1 << 16, MSG_NOSIGNAL);
		if (w < 0 && errno == EAGAIN) {
			msleep(20);      /* let the window close for good */
			w = send(cli, buf, 1 << 16, MSG_NOSIGNAL);
			if (w < 0 && errno == EAGAIN)
				break;
		}
		check(w > 0, "send cli: %s", strerror(errno));
		cli_sent += w;
		check(cli_sent < MAXSTREAM, "the window never closed");
	}
	fill(buf, 0, SRV_TO_CLI, 2);
	xsend(srv, buf, SRV_TO_CLI, "srv->cli");

	/* a half-closed connection */
	hc = connect4(port_lst);
	hs = accept(lst, NULL, NULL);
	check(hs >= 0, "accept hs");
	port_hc = port_of(hc);
	fill(buf, 0, HALF, 3);
	xsend(hc, buf, HALF, "hc->hs");
	check(shutdown(hc, SHUT_WR) == 0, "shutdown");

	/* a connection not accepted yet */
	lst2 = listener4();
	port_lst2 = port_of(lst2);
	pend = connect4(port_lst2);
	port_pend = port_of(pend);

	/* IPv6 listener with a thread blocked in accept() */
	lst6 = socket(AF_INET6, SOCK_STREAM, 0);
	check(lst6 >= 0, "socket6");
	check(setsockopt(lst6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) == 0, "IPV6_V6ONLY");
	struct sockaddr_in6 a6 = lo6(0);
	check(bind(lst6, (void *)&a6, sizeof(a6)) == 0, "bind6: %s", strerror(errno));
	check(listen(lst6, 3) == 0, "listen6");
	port_lst6 = port_of(lst6);
	pthread_t th;
	check(pthread_create(&th, NULL, acceptor, NULL) == 0, "pthread_create");

	/* UDP */
	u1 = socket(AF_INET, SOCK_DGRAM, 0);
	u2 = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in a4 = lo4(0);
	check(bind(u1, (void *)&a4, sizeof(a4)) == 0 && bind(u2, (void *)&a4, sizeof(a4)) == 0, "bind udp");
	port_u1 = port_of(u1);
	port_u2 = port_of(u2);
	a4 = lo4(port_u1);
	check(connect(u2, (void *)&a4, sizeof(a4)) == 0, "connect udp");
	check(send(u2, "first", 5, 0) == 5 && send(u2, "", 0, 0) == 0 && send(u2, "third one", 9, 0) == 9, "send u2");
	udp_send(u1, port_u2, "to u2");
	u6 = socket(AF_INET6, SOCK_DGRAM, 0);
	a6 = lo6(0);
	check(bind(u6, (void *)&a6, sizeof(a6)) == 0, "bind u6");
	port_u6 = port_of(u6);
	a6 = lo6(port_u6);
	check(sendto(u6, "self6", 5, 0, (void *)&a6, sizeof(a6)) == 5, "sendto u6");

	while (!acc_tid)
		msleep(1);
	msleep(50);
	ready();

	sigset_t none;
	sigemptyset(&none);
	while (!zdtm_got_usr1)
		sigsuspend(&none);

	if (corrupt_requested()) {
		unsigned char c;
		check(recv(srv, &c, 1, 0) == 1, "corrupt");     /* lose one byte of the stream */
	}

	/* same ports */
	check(port_of(lst) == port_lst && port_of(cli) == port_cli && port_of(srv) == port_srv, "ports changed");
	check(peer_port(cli) == port_srv && peer_port(srv) == port_cli, "peers changed");
	check(port_of(lst2) == port_lst2 && port_of(lst6) == port_lst6, "listener ports changed");
	check(port_of(u1) == port_u1 && port_of(u2) == port_u2 && port_of(u6) == port_u6, "udp ports changed");
	/* options and flags */
	check(fcntl(cli, F_GETFL) & O_NONBLOCK, "cli lost O_NONBLOCK");
	check(!(fcntl(srv, F_GETFL) & O_NONBLOCK), "srv became O_NONBLOCK");
	check(getint(cli, IPPROTO_TCP, TCP_NODELAY) == 1, "TCP_NODELAY lost");
	check(getint(srv, SOL_SOCKET, SO_KEEPALIVE) == 1, "SO_KEEPALIVE lost");
	check(getint(lst, SOL_SOCKET, SO_REUSEADDR) == 1, "SO_REUSEADDR lost");
	check(getint(srv, SOL_SOCKET, SO_RCVBUF) == rcvbuf_srv, "srv SO_RCVBUF %d, was %d",
	      getint(srv, SOL_SOCKET, SO_RCVBUF), rcvbuf_srv);
	check(getint(lst6, IPPROTO_IPV6, IPV6_V6ONLY) == 1, "IPV6_V6ONLY lost");
	check(!acc_done, "the accept thread woke up early (fd %d, %s)", acc_fd, strerror(acc_errno));
	int big = 1 << 20;      /* no more drops: the retransmissions need not back off */
	check(setsockopt(srv, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big)) == 0, "SO_RCVBUF");

	/* the stream cli -> srv, byte for byte, then srv -> cli */
	unsigned char *got = malloc(cli_sent), *want = malloc(cli_sent);
	check(got && want, "malloc");
	fill(want, 0, cli_sent, 1);
	read_exact(srv, got, cli_sent, "cli->srv");
	for (size_t i = 0; i < cli_sent; i++)
		check(got[i] == want[i], "cli->srv: byte %zu of %zu differs", i, cli_sent);
	read_exact(cli, got, SRV_TO_CLI, "srv->cli");
	fill(want, 0, SRV_TO_CLI, 2);
	check(memcmp(got, want, SRV_TO_CLI) == 0, "srv->cli data differs");
	struct pollfd p = { .fd = cli, .events = POLLIN };
	check(poll(&p, 1, 0) == 0, "more data for cli than srv sent");
	ping(cli, srv, "cli<->srv");

	/* half-closed: the data, then EOF; the other direction still works */
	read_exact(hs, got, HALF, "hc->hs");
	fill(want, 0, HALF, 3);
	check(memcmp(got, want, HALF) == 0, "hc->hs data differs");
	check(recv(hs, got, 1, MSG_DONTWAIT) == 0, "hs: no EOF after the data (%s)", strerror(errno));
	xsend(hs, "late", 4, "hs->hc");
	read_exact(hc, got, 4, "hs->hc");
	check(memcmp(got, "late", 4) == 0, "hs->hc data");

	/* the pending connection is accepted now */
	int ap = accept(lst2, NULL, NULL);
	check(ap >= 0, "accept lst2: %s", strerror(errno));
	check(peer_port(ap) == port_pend && port_of(pend) == port_pend, "pending connection came back from port %d, "
	      "was %d", peer_port(ap), port_pend);
	ping(pend, ap, "pend<->accepted");

	/* the accept thread wakes on a new IPv6 connection */
	int c6 = socket(AF_INET6, SOCK_STREAM, 0);
	a6 = lo6(port_lst6);
	check(c6 >= 0 && connect(c6, (void *)&a6, sizeof(a6)) == 0, "connect6: %s", strerror(errno));
	double t0 = now_mono();
	while (!__atomic_load_n(&acc_done, __ATOMIC_ACQUIRE))
		check(now_mono() - t0 < 10, "the accept thread did not wake up");
	check(acc_fd >= 0, "accept6: %s", strerror(acc_errno));
	check(peer_port(acc_fd) == port_of(c6), "accept6 got another connection");
	ping(c6, acc_fd, "c6<->accepted6");
	pthread_join(th, NULL);

	/* UDP: the queues with their senders, then both ways */
	udp_expect(u1, "first", port_u2, "u1 #1");
	udp_expect(u1, "", port_u2, "u1 #2");
	udp_expect(u1, "third one", port_u2, "u1 #3");
	udp_expect(u2, "to u2", port_u1, "u2 #1");
	udp_expect(u6, "self6", port_u6, "u6 #1");
	check(send(u2, "again", 5, 0) == 5, "send u2");
	udp_expect(u1, "again", port_u2, "u1 again");
	udp_send(u1, port_u2, "back");
	udp_expect(u2, "back", port_u1, "u2 back");
	pass();
}
