/* unix_peer.c -- a unix socket whose peer is outside the process (tests/test_unix_sockets.py).
 *
 * Usage: unix_peer connect ADDR FD    connect a stream socket to ADDR (a path, or @name for an
 *                                     abstract name) and keep it at FD
 *        unix_peer fd FD              use the socket inherited at FD (one end of a socketpair
 *                                     whose other end the test holds)
 * Kept out of the tests/targets directory on purpose: it needs a peer the test runs.
 *
 * Before READY and after SIGUSR1 it talks to the peer: writes "ping N\n" and expects
 * "pong N\n" back (within 10 s).  After SIGUSR1 it also checks that FD is still a unix
 * stream socket and still O_NONBLOCK as set before READY.  The peer after a restore is a
 * new one (a new connection, or the socket the restorer handed in with --inherit-fd): the
 * exchange proves the fd is connected to it.
 */
#include "../zdtm.h"
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static int fd;

static void talk(int n)
{
	char msg[32], want[32], buf[32];
	int len = snprintf(msg, sizeof(msg), "ping %d\n", n);
	int wlen = snprintf(want, sizeof(want), "pong %d\n", n);
	check(send(fd, msg, len, MSG_NOSIGNAL) == len, "send ping %d: %s", n, strerror(errno));
	int got = 0;
	double t0 = now_mono();
	while (got < wlen) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int r = poll(&p, 1, 200);
		check(now_mono() - t0 < 10, "no pong %d within 10 s (got %d bytes)", n, got);
		if (r <= 0)
			continue;
		ssize_t k = recv(fd, buf + got, wlen - got, MSG_DONTWAIT);
		if (k < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		check(k > 0, "recv pong %d: %zd (%s)", n, k, k < 0 ? strerror(errno) : "EOF");
		got += k;
	}
	check(memcmp(buf, want, wlen) == 0, "got %.*s, want %s", wlen, buf, want);
}

int main(int argc, char **argv)
{
	check(argc >= 3, "usage: unix_peer connect ADDR FD | fd FD");
	zdtm_init(1);
	if (!strcmp(argv[1], "connect")) {
		check(argc == 4, "usage");
		struct sockaddr_un a = { .sun_family = AF_UNIX };
		socklen_t al;
		if (argv[2][0] == '@') {
			strncpy(a.sun_path + 1, argv[2] + 1, sizeof(a.sun_path) - 2);
			al = offsetof(struct sockaddr_un, sun_path) + strlen(argv[2]);
		} else {
			strncpy(a.sun_path, argv[2], sizeof(a.sun_path) - 1);
			al = sizeof(a);
		}
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		check(s >= 0 && connect(s, (void *)&a, al) == 0, "connect %s: %s", argv[2], strerror(errno));
		fd = atoi(argv[3]);
		check(dup2(s, fd) == fd, "dup2");
		close(s);
	} else {
		fd = atoi(argv[2]);
	}
	check(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0, "O_NONBLOCK");
	talk(1);
	ready();

	sigset_t none;
	sigemptyset(&none);
	while (!zdtm_got_usr1)
		sigsuspend(&none);
	int t = -1;
	socklen_t tl = sizeof(t);
	check(getsockopt(fd, SOL_SOCKET, SO_TYPE, &t, &tl) == 0 && t == SOCK_STREAM, "fd %d is not a stream socket",
	      fd);
	check(fcntl(fd, F_GETFL) & O_NONBLOCK, "fd %d lost O_NONBLOCK", fd);
	talk(2);
	pass();
}
