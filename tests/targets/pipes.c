/* pipes.c -- pipes and FIFOs with queued data, non-default sizes and flags.  argv[1]: a dir.
 *
 *   big:     1 MiB pipe, ~200 KB queued, written as odd-sized writes, a vmsplice'd piece (a
 *            non-mergeable partial page) and more writes; 1500 bytes already read from the
 *            front (the head page starts at an offset); its read end dup'd (shared description)
 *   empty:   default-size empty pipe; write end also dup2'd to fd 100
 *   blk:     a thread blocked in read() on an empty pipe
 *   nb:      16 KiB pipe, write end O_NONBLOCK, 5000 bytes queued
 *   wgone:   write end closed, data queued: the reader must see it, then EOF
 *   rgone:   read end closed: writes fail with EPIPE (SIGPIPE ignored)
 *   fifo:    DIR/fifo opened O_RDONLY and O_WRONLY, 128 KiB, 10000 bytes queued
 *   fifo2:   DIR/fifo2 opened once O_RDWR, 300 bytes queued
 * After SIGUSR1: all data is there exactly once, sizes and flags are kept, dup'd fds still
 * share their description, the ends are still connected, the blocked reader wakes when main
 * writes, and the FIFOs are the ones at their paths.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>

#define BIG_SZ (1 << 20)
#define BIG_LEN (100000 + 3000 + 98500)
#define BIG_SKIP 1500
#define NB_SZ 16384
#define NB_LEN 5000
#define FIFO_SZ (128 << 10)
#define FIFO_LEN 10000
#define FIFO2_LEN 300

static unsigned char big_src[BIG_LEN] __attribute__((aligned(4096)));
static int big[2], big_dup, empty[2], blk[2], nb[2], wgone[2], rgone[2];
static int fifo_r, fifo_w, fifo_rw;
static char fifo_path[4096], fifo2_path[4096];
static volatile pid_t reader_tid;
static volatile int reader_got = -1;
static char reader_buf[64];

static unsigned char pat(size_t i, unsigned seed)
{
	return (unsigned char)(((i + seed) * 2654435761u) >> 13);
}

static void fill(unsigned char *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = pat(i, seed);
}

static void write_all(int fd, const void *buf, size_t n, size_t chunk)
{
	const char *p = buf;
	while (n) {
		size_t c = n < chunk ? n : chunk;
		ssize_t w = write(fd, p, c);
		check(w > 0, "write: %s", strerror(errno));
		p += w;
		n -= w;
	}
}

static void read_all(int fd, void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t r = read(fd, p, n);
		check(r > 0, "read: %zd %s", r, r < 0 ? strerror(errno) : "EOF");
		p += r;
		n -= r;
	}
}

static int queued(int fd)
{
	int n = -1;
	check(ioctl(fd, FIONREAD, &n) == 0, "FIONREAD: %s", strerror(errno));
	return n;
}

static int pipe_size(int fd) { return fcntl(fd, F_GETPIPE_SZ); }
static int nonblock(int fd) { return !!(fcntl(fd, F_GETFL) & O_NONBLOCK); }

static void *reader(void *arg)
{
	(void)arg;
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	reader_tid = zdtm_gettid();
	ssize_t r;
	do
		r = read(blk[0], reader_buf, sizeof(reader_buf) - 1);
	while (r < 0 && errno == EINTR);
	reader_got = (int)r;
	return NULL;
}

static long blocked_in(pid_t tid)
{
	char path[64], buf[256];
	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", tid);
	int fd = open(path, O_RDONLY);
	if (fd < 0) return -2;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0) return -2;
	buf[n] = 0;
	return strtol(buf, NULL, 10);
}

static void connected(int w, int r, const char *what)
{
	char buf[16] = {0};
	check(write(w, "ping", 4) == 4, "%s: write: %s", what, strerror(errno));
	read_all(r, buf, 4);
	check(memcmp(buf, "ping", 4) == 0, "%s: read back %.4s", what, buf);
}

static void setup(const char *dir)
{
	/* big */
	check(pipe(big) == 0, "pipe");
	check(fcntl(big[1], F_SETPIPE_SZ, BIG_SZ) == BIG_SZ, "F_SETPIPE_SZ: %s", strerror(errno));
	fill(big_src, BIG_LEN, 1);
	write_all(big[1], big_src, 100000, 777);
	struct iovec iov = { big_src + 100000, 3000 };
	check(vmsplice(big[1], &iov, 1, 0) == 3000, "vmsplice: %s", strerror(errno));
	write_all(big[1], big_src + 103000, BIG_LEN - 103000, 4099);
	unsigned char head[BIG_SKIP];
	read_all(big[0], head, BIG_SKIP);
	check(memcmp(head, big_src, BIG_SKIP) == 0, "big: head");
	big_dup = dup(big[0]);
	check(big_dup >= 0, "dup");

	/* empty, with a dup2'd write end */
	check(pipe(empty) == 0, "pipe");
	check(dup2(empty[1], 100) == 100, "dup2");

	/* a thread blocked reading an empty pipe */
	check(pipe(blk) == 0, "pipe");
	pthread_t t;
	check(pthread_create(&t, NULL, reader, NULL) == 0, "pthread_create");
	pthread_detach(t);

	/* O_NONBLOCK write end */
	check(pipe(nb) == 0, "pipe");
	check(fcntl(nb[1], F_SETFL, O_NONBLOCK) == 0, "F_SETFL");
	check(fcntl(nb[1], F_SETPIPE_SZ, NB_SZ) == NB_SZ, "F_SETPIPE_SZ");
	unsigned char nbdata[NB_LEN];
	fill(nbdata, NB_LEN, 2);
	check(write(nb[1], nbdata, NB_LEN) == NB_LEN, "nb write");

	/* writer gone / reader gone */
	check(pipe(wgone) == 0, "pipe");
	check(write(wgone[1], "last words", 10) == 10, "write");
	close(wgone[1]);
	check(pipe(rgone) == 0, "pipe");
	close(rgone[0]);
	signal(SIGPIPE, SIG_IGN);

	/* FIFOs */
	snprintf(fifo_path, sizeof(fifo_path), "%s/fifo", dir);
	snprintf(fifo2_path, sizeof(fifo2_path), "%s/fifo2", dir);
	unlink(fifo_path);
	unlink(fifo2_path);
	check(mkfifo(fifo_path, 0600) == 0, "mkfifo: %s", strerror(errno));
	check(mkfifo(fifo2_path, 0600) == 0, "mkfifo: %s", strerror(errno));
	fifo_r = open(fifo_path, O_RDONLY | O_NONBLOCK);
	check(fifo_r >= 0, "open fifo: %s", strerror(errno));
	fifo_w = open(fifo_path, O_WRONLY);
	check(fifo_w >= 0, "open fifo: %s", strerror(errno));
	check(fcntl(fifo_r, F_SETFL, 0) == 0, "F_SETFL");
	check(fcntl(fifo_w, F_SETPIPE_SZ, FIFO_SZ) == FIFO_SZ, "F_SETPIPE_SZ");
	unsigned char fdata[FIFO_LEN];
	fill(fdata, FIFO_LEN, 3);
	write_all(fifo_w, fdata, FIFO_LEN, 1000);
	fifo_rw = open(fifo2_path, O_RDWR);
	check(fifo_rw >= 0, "open fifo2: %s", strerror(errno));
	unsigned char f2[FIFO2_LEN];
	fill(f2, FIFO2_LEN, 4);
	write_all(fifo_rw, f2, FIFO2_LEN, 100);

	double t0 = now_mono();
	while (!reader_tid || blocked_in(reader_tid) != SYS_read) {
		check(now_mono() - t0 < 10, "reader never blocked in read");
		msleep(5);
	}
}

static void verify(void)
{
	/* big: size, count, content (exactly once, in order), shared description, connected */
	check(pipe_size(big[1]) == BIG_SZ, "big: size %d", pipe_size(big[1]));
	check(pipe_size(big[0]) == BIG_SZ, "big: size %d", pipe_size(big[0]));
	int n = queued(big[0]);
	check(n == BIG_LEN - BIG_SKIP, "big: %d bytes queued, expected %d", n, BIG_LEN - BIG_SKIP);
	static unsigned char got[BIG_LEN];
	read_all(big_dup, got, n);
	for (int i = 0; i < n; i++)
		check(got[i] == big_src[BIG_SKIP + i], "big: byte %d differs", i);
	check(!nonblock(big[0]) && !nonblock(big_dup), "big: read end O_NONBLOCK");
	check(fcntl(big_dup, F_SETFL, O_NONBLOCK) == 0, "F_SETFL");
	check(nonblock(big[0]), "big: dup'd read end no longer shares its description");
	char c;
	check(read(big[0], &c, 1) == -1 && errno == EAGAIN, "big: not empty or not nonblocking");
	check(fcntl(big_dup, F_SETFL, 0) == 0, "F_SETFL");
	connected(big[1], big[0], "big");

	/* empty */
	check(queued(empty[0]) == 0, "empty: %d bytes queued", queued(empty[0]));
	check(pipe_size(empty[0]) == 65536, "empty: size %d", pipe_size(empty[0]));
	connected(100, empty[0], "empty (via fd 100)");
	connected(empty[1], empty[0], "empty");
	close(empty[1]);
	connected(100, empty[0], "empty after closing one write fd");
	close(100);
	check(read(empty[0], &c, 1) == 0, "empty: no EOF after closing both write fds");

	/* the blocked reader is still blocked, and wakes when main writes */
	msleep(50);
	check(reader_got == -1, "reader returned %d before anything was written", reader_got);
	check(write(blk[1], "wake up", 7) == 7, "blk write");
	double t0 = now_mono();
	while (reader_got == -1) {
		check(now_mono() - t0 < 3, "blocked reader did not wake");
		msleep(1);
	}
	check(reader_got == 7 && memcmp(reader_buf, "wake up", 7) == 0, "reader got %d bytes", reader_got);

	/* nonblocking write end: flags, size, data, and it really does not block */
	check(nonblock(nb[1]) && !nonblock(nb[0]), "nb: flags %d %d", nonblock(nb[0]), nonblock(nb[1]));
	check(pipe_size(nb[1]) == NB_SZ, "nb: size %d", pipe_size(nb[1]));
	check(queued(nb[0]) == NB_LEN, "nb: %d queued", queued(nb[0]));
	int extra = 0;
	char page[4096];
	memset(page, 'z', sizeof(page));
	for (;;) {
		ssize_t w = write(nb[1], page, sizeof(page));
		if (w < 0) {
			check(errno == EAGAIN, "nb: write: %s", strerror(errno));
			break;
		}
		extra += w;
		check(extra < 1 << 20, "nb: never full");
	}
	check(NB_LEN + extra <= NB_SZ && NB_LEN + extra > NB_SZ - 4096, "nb: held %d bytes", NB_LEN + extra);
	unsigned char nbgot[NB_LEN];
	read_all(nb[0], nbgot, NB_LEN);
	for (int i = 0; i < NB_LEN; i++)
		check(nbgot[i] == pat(i, 2), "nb: byte %d differs", i);

	/* writer gone: data, then EOF; reader gone: EPIPE */
	char lw[16] = {0};
	read_all(wgone[0], lw, 10);
	check(memcmp(lw, "last words", 10) == 0, "wgone: got %.10s", lw);
	check(read(wgone[0], lw, 1) == 0, "wgone: no EOF");
	check(write(rgone[1], "x", 1) == -1 && errno == EPIPE, "rgone: write did not fail with EPIPE");

	/* FIFOs */
	struct stat a, b;
	check(stat(fifo_path, &a) == 0 && fstat(fifo_r, &b) == 0, "stat fifo");
	check(a.st_ino == b.st_ino && a.st_dev == b.st_dev, "fifo: fd is not the FIFO at %.200s", fifo_path);
	check(pipe_size(fifo_r) == FIFO_SZ, "fifo: size %d", pipe_size(fifo_r));
	check(!nonblock(fifo_r) && !nonblock(fifo_w), "fifo: O_NONBLOCK");
	check((fcntl(fifo_r, F_GETFL) & O_ACCMODE) == O_RDONLY, "fifo: read end mode");
	check((fcntl(fifo_w, F_GETFL) & O_ACCMODE) == O_WRONLY, "fifo: write end mode");
	check(queued(fifo_r) == FIFO_LEN, "fifo: %d queued", queued(fifo_r));
	unsigned char fgot[FIFO_LEN];
	read_all(fifo_r, fgot, FIFO_LEN);
	for (int i = 0; i < FIFO_LEN; i++)
		check(fgot[i] == pat(i, 3), "fifo: byte %d differs", i);
	connected(fifo_w, fifo_r, "fifo");
	check((fcntl(fifo_rw, F_GETFL) & O_ACCMODE) == O_RDWR, "fifo2: mode");
	check(queued(fifo_rw) == FIFO2_LEN, "fifo2: %d queued", queued(fifo_rw));
	unsigned char f2[FIFO2_LEN];
	read_all(fifo_rw, f2, FIFO2_LEN);
	for (int i = 0; i < FIFO2_LEN; i++)
		check(f2[i] == pat(i, 4), "fifo2: byte %d differs", i);
	connected(fifo_rw, fifo_rw, "fifo2");
}

int main(int argc, char **argv)
{
	check(argc > 1, "usage: pipes DIR");
	zdtm_init(0);
	setup(argv[1]);
	ready();
	wait_usr1_polling();
	if (corrupt_requested()) {
		char c;
		check(read(big[0], &c, 1) == 1, "corrupt");
	}
	verify();
	pass();
	return 0;
}
