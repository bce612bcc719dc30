/* tcp_peer.c -- a TCP connection to a server outside the process (tests/test_inet_sockets.py).
 *
 * Usage: tcp_peer ADDR PORT FD MODE
 *   connects to ADDR:PORT (IPv4 or IPv6), keeps the socket at FD (O_NONBLOCK, registered in an
 *   epoll for EPOLLIN|EPOLLRDHUP, as libzmq does), pings the server ("ping N\n" -> "pong N\n"),
 *   prints "PORT <local port>", READY, and after SIGUSR1, by MODE:
 *     live      the same connection (same local port) still talks to the server
 *     queued    the same, and "queued\n", which the server sent before the dump and nobody
 *               read, comes first
 *     closed    the connection is found closed at once: the epoll reports EPOLLHUP or
 *               EPOLLERR without waiting, poll() too, the first recv() returns 0 or ECONNRESET
 *               and sending fails
 * Kept out of the tests/targets directory on purpose: it needs a server the test runs.
 */
#include "../zdtm.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>

static int fd, ep;

static void read_exact(char *buf, int n, const char *what)
{
	int got = 0;
	double t0 = now_mono();
	while (got < n) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int r = poll(&p, 1, 200);
		check(now_mono() - t0 < 10, "no %s within 10 s (got %d bytes)", what, got);
		if (r <= 0)
			continue;
		ssize_t k = recv(fd, buf + got, n - got, MSG_DONTWAIT);
		if (k < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		check(k > 0, "recv %s: %zd (%s)", what, k, k < 0 ? strerror(errno) : "EOF");
		got += k;
	}
}

static void talk(int n)
{
	char msg[32], want[32], buf[32];
	int len = snprintf(msg, sizeof(msg), "ping %d\n", n);
	int wlen = snprintf(want, sizeof(want), "pong %d\n", n);
	check(send(fd, msg, len, MSG_NOSIGNAL) == len, "send ping %d: %s", n, strerror(errno));
	read_exact(buf, wlen, "pong");
	check(memcmp(buf, want, wlen) == 0, "got %.*s, want %s", wlen, buf, want);
}

static int local_port(void)
{
	struct sockaddr_storage a;
	socklen_t l = sizeof(a);
	check(getsockname(fd, (void *)&a, &l) == 0, "getsockname: %s", strerror(errno));
	return ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port : ((struct sockaddr_in *)&a)->sin_port);
}

int main(int argc, char **argv)
{
	check(argc == 5, "usage: tcp_peer ADDR PORT FD live|queued|closed");
	zdtm_init(1);
	const char *mode = argv[4];
	struct sockaddr_storage sa;
	socklen_t sl;
	memset(&sa, 0, sizeof(sa));
	if (strchr(argv[1], ':')) {
		struct sockaddr_in6 *a = (void *)&sa;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons(atoi(argv[2]));
		check(inet_pton(AF_INET6, argv[1], &a->sin6_addr) == 1, "bad address %s", argv[1]);
		sl = sizeof(*a);
	} else {
		struct sockaddr_in *a = (void *)&sa;
		a->sin_family = AF_INET;
		a->sin_port = htons(atoi(argv[2]));
		check(inet_pton(AF_INET, argv[1], &a->sin_addr) == 1, "bad address %s", argv[1]);
		sl = sizeof(*a);
	}
	int s = socket(sa.ss_family, SOCK_STREAM, 0);
	check(s >= 0 && connect(s, (void *)&sa, sl) == 0, "connect %s:%s: %s", argv[1], argv[2], strerror(errno));
	fd = atoi(argv[3]);
	check(dup2(s, fd) == fd, "dup2");
	close(s);
	check(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0, "O_NONBLOCK");
	ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = fd };
	check(ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll: %s", strerror(errno));
	talk(1);
	struct epoll_event out;
	while (epoll_wait(ep, &out, 1, 0) > 0)     /* drain level-triggered readiness */
		;
	int port = local_port();
	zdtm_msg("PORT %d", port);
	ready();

	sigset_t none;
	sigemptyset(&none);
	while (!zdtm_got_usr1)
		sigsuspend(&none);

	if (!strcmp(mode, "closed")) {
		int n = epoll_wait(ep, &out, 1, 0);
		check(n == 1 && (out.events & (EPOLLHUP | EPOLLERR)), "epoll does not report the closed connection at "
		      "once (%d events, 0x%x)", n, n == 1 ? out.events : 0);
		struct pollfd p = { .fd = fd, .events = POLLIN };
		check(poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR)), "poll: 0x%x", p.revents);
		char c;
		ssize_t k = recv(fd, &c, 1, MSG_DONTWAIT);
		check(k == 0 || (k < 0 && errno == ECONNRESET), "recv on the closed connection: %zd (%s)", k,
		      k < 0 ? strerror(errno) : "data");
		k = recv(fd, &c, 1, MSG_DONTWAIT);
		check(k == 0, "second recv on the closed connection: %zd (%s)", k, k < 0 ? strerror(errno) : "data");
		check(send(fd, "x", 1, MSG_NOSIGNAL) < 0, "send on the closed connection succeeded");
		pass();
	}
	check(local_port() == port, "local port %d, was %d", local_port(), port);
	check(fcntl(fd, F_GETFL) & O_NONBLOCK, "fd %d lost O_NONBLOCK", fd);
	if (!strcmp(mode, "queued")) {
		char buf[8];
		read_exact(buf, 7, "queued data");
		check(memcmp(buf, "queued\n", 7) == 0, "got %.7s, want the queued data", buf);
	}
	talk(2);
	talk(3);
	pass();
}
