/* unsupported_fd.c -- holds one fd of a kind the engine cannot checkpoint, at a fixed number.
 *
 * Usage: unsupported_fd KIND FD
 *   KIND: perf_event, io_uring (the fd only: its rings are unmapped until the check),
 *         io_uring_mapped (the fd and its three shared ring mappings), pipe, socket, eventfd
 * Kept out of tests/targets/ (whose C files are all dump/restore targets) on purpose: it
 * exists to make a dump fail (tests/test_failures.py).
 *
 * State checked after SIGUSR1: the fd is still at FD, still of its kind and still works
 * (pipe/socket: the bytes queued before READY are still there and in order; eventfd: the
 * count is intact; perf_event: the counter still reads and has advanced; io_uring: a NOP
 * submitted now completes); a register/memory counter kept growing and matches its mirror.
 */
#include "../zdtm.h"
#include <fcntl.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <linux/perf_event.h>
#include <linux/io_uring.h>

static const char MSG[] = "queued-before-the-dump";
static int other = -1;	/* the other end of a pipe or socketpair */

static void place(int fd, int want)
{
	if (fd == want) return;
	check(dup2(fd, want) == want, "dup2(%d, %d): %s", fd, want, strerror(errno));
	close(fd);
}

/* io_uring: the bare syscall interface, enough for one NOP. */
struct ring {
	void *sq, *cq;
	size_t sq_sz, cq_sz, sqes_sz;
	unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqes;
};
static struct ring ring;

static void ring_map(int fd, struct io_uring_params *p)
{
	ring.sq_sz = p->sq_off.array + p->sq_entries * sizeof(unsigned);
	ring.cq_sz = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
	ring.sqes_sz = p->sq_entries * sizeof(struct io_uring_sqe);
	char *sq = mmap(NULL, ring.sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
	char *cq = mmap(NULL, ring.cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
	ring.sqes = mmap(NULL, ring.sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
	check(sq != MAP_FAILED && cq != MAP_FAILED && ring.sqes != MAP_FAILED, "io_uring mmap: %s", strerror(errno));
	ring.sq = sq;
	ring.cq = cq;
	ring.sq_tail = (unsigned *)(sq + p->sq_off.tail);
	ring.sq_mask = (unsigned *)(sq + p->sq_off.ring_mask);
	ring.sq_array = (unsigned *)(sq + p->sq_off.array);
	ring.cq_head = (unsigned *)(cq + p->cq_off.head);
	ring.cq_tail = (unsigned *)(cq + p->cq_off.tail);
	ring.cq_mask = (unsigned *)(cq + p->cq_off.ring_mask);
	ring.cqes = (struct io_uring_cqe *)(cq + p->cq_off.cqes);
}

static void ring_unmap(void)
{
	check(!munmap(ring.sq, ring.sq_sz) && !munmap(ring.cq, ring.cq_sz) && !munmap(ring.sqes, ring.sqes_sz),
	      "munmap io_uring: %s", strerror(errno));
}

static struct io_uring_params ring_params;

static int ring_setup(void)
{
	memset(&ring_params, 0, sizeof(ring_params));
	int fd = syscall(__NR_io_uring_setup, 4, &ring_params);
	check(fd >= 0, "io_uring_setup: %s", strerror(errno));
	ring_map(fd, &ring_params);
	return fd;
}

static void ring_nop(int fd, uint64_t tag)
{
	unsigned tail = *ring.sq_tail, idx = tail & *ring.sq_mask;
	memset(&ring.sqes[idx], 0, sizeof(ring.sqes[idx]));
	ring.sqes[idx].opcode = IORING_OP_NOP;
	ring.sqes[idx].user_data = tag;
	ring.sq_array[idx] = idx;
	__atomic_store_n(ring.sq_tail, tail + 1, __ATOMIC_RELEASE);
	int r = syscall(__NR_io_uring_enter, fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
	check(r == 1, "io_uring_enter: %d %s", r, strerror(errno));
	unsigned head = *ring.cq_head;
	check(head != __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE), "io_uring: no completion");
	struct io_uring_cqe *c = &ring.cqes[head & *ring.cq_mask];
	check(c->user_data == tag && c->res == 0, "io_uring: cqe %llu res %d", (unsigned long long)c->user_data, c->res);
	__atomic_store_n(ring.cq_head, head + 1, __ATOMIC_RELEASE);
}

static uint64_t perf_read(int fd)
{
	uint64_t v = 0;
	check(read(fd, &v, sizeof(v)) == sizeof(v), "read perf_event: %s", strerror(errno));
	return v;
}

int main(int argc, char **argv)
{
	check(argc == 3, "usage: unsupported_fd KIND FD");
	const char *kind = argv[1];
	int want = atoi(argv[2]);
	zdtm_init(0);
	uint64_t perf0 = 0;

	if (!strcmp(kind, "pipe")) {
		int p[2];
		check(pipe(p) == 0, "pipe: %s", strerror(errno));
		other = p[1];
		place(p[0], want);
		place(other, want + 1);	/* after FD, so FD is the first unsupported fd */
		other = want + 1;
		check(write(other, MSG, sizeof(MSG)) == sizeof(MSG), "write pipe");
	} else if (!strcmp(kind, "socket")) {
		int s[2];
		check(socketpair(AF_UNIX, SOCK_STREAM, 0, s) == 0, "socketpair: %s", strerror(errno));
		other = s[1];
		place(s[0], want);
		place(other, want + 1);
		other = want + 1;
		check(write(other, MSG, sizeof(MSG)) == sizeof(MSG), "write socket");
	} else if (!strcmp(kind, "eventfd")) {
		place(eventfd(41, 0), want);
	} else if (!strcmp(kind, "perf_event")) {
		struct perf_event_attr a;
		memset(&a, 0, sizeof(a));
		a.size = sizeof(a);
		a.type = PERF_TYPE_SOFTWARE;
		a.config = PERF_COUNT_SW_TASK_CLOCK;
		a.exclude_kernel = a.exclude_hv = 1;	/* what an ordinary user may open (perf_event_paranoid 2) */
		int fd = syscall(__NR_perf_event_open, &a, 0, -1, -1, 0);
		check(fd >= 0, "perf_event_open: %s", strerror(errno));
		place(fd, want);
		perf0 = perf_read(want);
	} else if (!strcmp(kind, "io_uring") || !strcmp(kind, "io_uring_mapped")) {
		place(ring_setup(), want);
		ring_nop(want, 1);
		if (!strcmp(kind, "io_uring"))
			ring_unmap();
	} else {
		fail("unknown kind %s", kind);
	}

	volatile uint64_t mirror = 0;
	uint64_t n = 0;
	ready();
	while (!zdtm_got_usr1) {
		for (int i = 0; i < 100000; i++)
			mirror = ++n;
		msleep(1);
	}
	check(n == mirror && n > 0, "counter %llu, mirror %llu", (unsigned long long)n, (unsigned long long)mirror);

	if (corrupt_requested())
		close(want);
	struct stat st;
	check(fstat(want, &st) == 0, "fd %d is gone: %s", want, strerror(errno));

	if (!strcmp(kind, "pipe") || !strcmp(kind, "socket")) {
		char buf[sizeof(MSG)];
		check(read(want, buf, sizeof(buf)) == sizeof(buf), "read %s: %s", kind, strerror(errno));
		check(!memcmp(buf, MSG, sizeof(MSG)), "%s data changed", kind);
	} else if (!strcmp(kind, "eventfd")) {
		uint64_t v = 0;
		check(read(want, &v, sizeof(v)) == sizeof(v) && v == 41, "eventfd count %llu", (unsigned long long)v);
	} else if (!strcmp(kind, "perf_event")) {
		uint64_t v = perf_read(want);
		check(v > perf0, "perf counter did not advance (%llu -> %llu)", (unsigned long long)perf0, (unsigned long long)v);
	} else {
		if (!strcmp(kind, "io_uring"))
			ring_map(want, &ring_params);
		ring_nop(want, 2);
	}
	pass();
}
