/* inotify.c DIR -- inotify watches keep their watch descriptors (wd) across restore.
 *
 *   in   inotify_init1(0): DIR (IN_CREATE | IN_DELETE) wd 1; DIR/gone (IN_ALL_EVENTS) wd 2,
 *        then removed (a gap); DIR/file (IN_MODIFY | IN_ATTRIB) wd 3; DIR/sub
 *        (IN_CREATE | IN_ONESHOT | IN_EXCL_UNLINK) wd 4; its queue drained before READY
 *   in2  inotify_init1(IN_NONBLOCK | IN_CLOEXEC), no watches
 * After SIGUSR1: the watch lines of our own fdinfo are as before; creating DIR/new-TIME gives
 * IN_CREATE on wd 1 (and nothing for the removed wd 2), writing DIR/file gives
 * IN_MODIFY on wd 3, creating DIR/sub/new-TIME gives IN_CREATE on wd 4; a new watch gets wd 5.
 */
#include "zdtm.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>

static char dir[512];
static int in, in2;

static void path(char *out, const char *name) { snprintf(out, 600, "%s/%s", dir, name); }

static int cmp_str(const void *a, const void *b) { return strcmp(*(char **)a, *(char **)b); }

/* The "inotify wd:" lines of our fdinfo, sorted and joined. */
static void watch_lines(int fd, char *out, size_t len)
{
	char p[64], buf[8192], *lines[32];
	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", fd);
	int f = open(p, O_RDONLY);
	check(f >= 0, "open %s", p);
	ssize_t n = read(f, buf, sizeof(buf) - 1);
	close(f);
	check(n > 0, "read %s", p);
	buf[n] = 0;
	int k = 0;
	for (char *l = strstr(buf, "inotify wd:"); l && k < 32; ) {
		size_t e = strcspn(l, "\n");
		int last = l[e] == 0;
		l[e] = 0;
		lines[k++] = l;
		l = last ? NULL : strstr(l + e + 1, "inotify wd:");
	}
	check(k == 3, "%d watches in fdinfo, want 3", k);
	qsort(lines, k, sizeof(lines[0]), cmp_str);
	out[0] = 0;
	for (int i = 0; i < k; i++) {
		check(strlen(out) + strlen(lines[i]) + 2 < len, "fdinfo too long");
		strcat(out, lines[i]);
		strcat(out, "|");
	}
}

/* Read one event within 2 s. */
static struct inotify_event *next_event(char *buf, size_t len)
{
	struct pollfd pfd = { in, POLLIN, 0 };
	int r;
	do r = poll(&pfd, 1, 2000); while (r < 0 && errno == EINTR);
	check(r == 1, "no inotify event within 2 s");
	/* one event at a time: ask for exactly the header, grow on EINVAL */
	for (size_t want = sizeof(struct inotify_event); want <= len; want += 16) {
		ssize_t n = read(in, buf, want);
		if (n > 0)
			return (struct inotify_event *)buf;
		check(errno == EINVAL || errno == EINTR, "read inotify: %s", strerror(errno));
	}
	fail("inotify event larger than %zu", len);
}

static void expect(int wd, unsigned mask, const char *name)
{
	char buf[4096] __attribute__((aligned(8)));
	struct inotify_event *e = next_event(buf, sizeof(buf));
	check(e->wd == wd && (e->mask & mask) == mask && (!name || (e->len && !strcmp(e->name, name))),
	      "event wd %d mask %#x name '%.100s', want wd %d mask %#x name '%.100s'", e->wd, e->mask,
	      e->len ? e->name : "", wd, mask, name ? name : "");
}

int main(int argc, char **argv)
{
	check(argc == 2, "usage: inotify DIR");
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	zdtm_init(1);
	char p[600];
	path(p, "gone");
	check(mkdir(p, 0755) == 0 || errno == EEXIST, "mkdir gone");
	path(p, "sub");
	check(mkdir(p, 0755) == 0 || errno == EEXIST, "mkdir sub");
	path(p, "file");
	int f = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	check(f >= 0, "create file");
	close(f);

	in = inotify_init1(0);
	in2 = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	check(in >= 0 && in2 >= 0, "inotify_init1");
	int w1 = inotify_add_watch(in, dir, IN_CREATE | IN_DELETE);
	path(p, "gone");
	int w2 = inotify_add_watch(in, p, IN_ALL_EVENTS);
	path(p, "file");
	int w3 = inotify_add_watch(in, p, IN_MODIFY | IN_ATTRIB);
	path(p, "sub");
	int w4 = inotify_add_watch(in, p, IN_CREATE | IN_ONESHOT | IN_EXCL_UNLINK);
	check(w1 == 1 && w2 == 2 && w3 == 3 && w4 == 4, "wds %d %d %d %d", w1, w2, w3, w4);
	check(inotify_rm_watch(in, w2) == 0, "rm_watch");
	expect(w2, IN_IGNORED, NULL);

	char before[4096], after[4096];
	watch_lines(in, before, sizeof(before));
	ready();

	sigset_t wait_mask;
	sigprocmask(SIG_SETMASK, NULL, &wait_mask);
	sigdelset(&wait_mask, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&wait_mask);

	if (corrupt_requested())
		inotify_rm_watch(in, w3);

	watch_lines(in, after, sizeof(after));
	check(strcmp(before, after) == 0, "watches now %.300s, were %.300s", after, before);
	check(!(fcntl(in, F_GETFL) & O_NONBLOCK) && !(fcntl(in, F_GETFD) & FD_CLOEXEC), "in flags");
	check((fcntl(in2, F_GETFL) & O_NONBLOCK) && (fcntl(in2, F_GETFD) & FD_CLOEXEC), "in2 flags");
	struct pollfd pfd = { in, POLLIN, 0 };
	check(poll(&pfd, 1, 0) == 0, "events queued before anything happened");

	/* fresh names: a leave-running original may have run this before its image is restored */
	char name[64], sub_name[80];
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(name, sizeof(name), "new-%ld.%09ld", (long)ts.tv_sec, ts.tv_nsec);
	snprintf(sub_name, sizeof(sub_name), "sub/%s", name);
	path(p, name);
	f = open(p, O_WRONLY | O_CREAT | O_EXCL, 0644);
	check(f >= 0, "create %s", name);
	close(f);
	expect(w1, IN_CREATE, name);
	path(p, "file");
	f = open(p, O_WRONLY | O_APPEND);
	check(f >= 0 && write(f, "x", 1) == 1, "write file");
	close(f);
	expect(w3, IN_MODIFY, NULL);
	path(p, sub_name);
	f = open(p, O_WRONLY | O_CREAT | O_EXCL, 0644);
	check(f >= 0, "create %s", sub_name);
	close(f);
	expect(w4, IN_CREATE, name);
	expect(w4, IN_IGNORED, NULL);		/* IN_ONESHOT: the watch goes away after one event */

	path(p, "gone");
	int w5 = inotify_add_watch(in, p, IN_ATTRIB);
	check(w5 == 5, "a new watch got wd %d, want 5", w5);
	pass();
	return 0;
}
