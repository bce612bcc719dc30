/* deleted_file.c DIR -- regular-file and character-device fds, at fixed fd numbers.
 *
 *   fd 10: DIR/deleted.dat, O_RDWR, 100000 bytes of pattern, offset 12345, then unlinked
 *   fd 11: /dev/null   O_RDONLY
 *   fd 12: /dev/zero   O_RDONLY | O_NONBLOCK
 *   fd 13: /dev/urandom O_RDONLY
 *   fd 14: DIR/append.log O_WRONLY | O_APPEND | O_CLOEXEC (still linked), "abc" written
 * Nothing else is open except 0, 1, 2.  Main waits in sigsuspend.
 * After SIGUSR1: the set of open fds is exactly that; each fd's file, access mode and status
 * flags, FD_CLOEXEC, offset and content are as before; the deleted file is still deleted
 * (nlink 0, path absent) yet readable and writable; the devices behave as such.
 */
#include "zdtm.h"
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#define DSIZE 100000
#define DOFF 12345

static unsigned char pattern(size_t i) { return (unsigned char)(i * 7 + (i >> 9) + 3); }

static void check_open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	check(d, "opendir /proc/self/fd");
	int self = dirfd(d);
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		int fd = atoi(e->d_name);
		check(fd == self || fd <= 2 || (fd >= 10 && fd <= 14), "unexpected open fd %d", fd);
	}
	closedir(d);
	for (int fd = 10; fd <= 14; fd++)
		check(fcntl(fd, F_GETFD) >= 0, "fd %d is not open", fd);
}

static void check_flags(int fd, int want_fl, int want_cloexec)
{
	int fl = fcntl(fd, F_GETFL);
	int mask = O_ACCMODE | O_APPEND | O_NONBLOCK | O_SYNC | O_DIRECT | O_NOATIME;
	check((fl & mask) == want_fl, "fd %d: F_GETFL %#o, expected %#o", fd, fl & mask, want_fl);
	int fdfl = fcntl(fd, F_GETFD);
	check(!!(fdfl & FD_CLOEXEC) == want_cloexec, "fd %d: FD_CLOEXEC %d", fd, fdfl);
}

static void check_chr(int fd, int maj, int min)
{
	struct stat st;
	check(fstat(fd, &st) == 0 && S_ISCHR(st.st_mode), "fd %d not a char device", fd);
	check(major(st.st_rdev) == (unsigned)maj && minor(st.st_rdev) == (unsigned)min,
	      "fd %d: device %u:%u, expected %d:%d", fd, major(st.st_rdev), minor(st.st_rdev),
	      maj, min);
}

static void move_fd(int fd, int to)
{
	check(fd >= 0, "open: %s", strerror(errno));
	check(dup3(fd, to, 0) == to, "dup3");
	close(fd);
}

int main(int argc, char **argv)
{
	zdtm_init(1);
	close_range(3, ~0u, 0);	/* whatever the launcher leaked */
	check(argc > 1, "usage: deleted_file DIR");
	char dpath[4096], apath[4096];
	snprintf(dpath, sizeof(dpath), "%s/deleted.dat", argv[1]);
	snprintf(apath, sizeof(apath), "%s/append.log", argv[1]);

	static unsigned char buf[DSIZE], got[DSIZE];
	for (size_t i = 0; i < DSIZE; i++)
		buf[i] = pattern(i);
	move_fd(open(dpath, O_RDWR | O_CREAT | O_TRUNC, 0600), 10);
	check(write(10, buf, DSIZE) == DSIZE, "write");
	check(lseek(10, DOFF, SEEK_SET) == DOFF, "lseek");
	check(unlink(dpath) == 0, "unlink");
	move_fd(open("/dev/null", O_RDONLY), 11);
	move_fd(open("/dev/zero", O_RDONLY | O_NONBLOCK), 12);
	move_fd(open("/dev/urandom", O_RDONLY), 13);
	int afd = open(apath, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
	check(afd >= 0, "open append");
	check(dup3(afd, 14, O_CLOEXEC) == 14, "dup3");
	close(afd);
	check(write(14, "abc", 3) == 3, "write append");
	lseek(14, 0, SEEK_SET);	/* irrelevant with O_APPEND, but the offset is state too */
	check_open_fds();
	ready();

	sigset_t m;
	sigprocmask(SIG_SETMASK, NULL, &m);
	sigdelset(&m, SIGUSR1);
	while (!zdtm_got_usr1)
		sigsuspend(&m);
	if (corrupt_requested())
		lseek(10, 0, SEEK_SET);

	check_open_fds();
	/* fd 10: the deleted file */
	struct stat st;
	check(fstat(10, &st) == 0 && S_ISREG(st.st_mode), "fd 10 not a regular file");
	check(st.st_nlink == 0, "deleted file has nlink %lu", (unsigned long)st.st_nlink);
	check(st.st_size == DSIZE, "deleted file size %lld", (long long)st.st_size);
	check(access(dpath, F_OK) != 0, "deleted file came back at its path");
	char link[4200];
	ssize_t n = readlink("/proc/self/fd/10", link, sizeof(link) - 1);
	check(n > 0, "readlink");
	link[n] = 0;
	check(strstr(link, "(deleted)"), "fd 10 link is %.300s", link);
	check_flags(10, O_RDWR, 0);
	off_t off = lseek(10, 0, SEEK_CUR);
	check(off == DOFF, "fd 10 offset %lld, expected %d", (long long)off, DOFF);
	check(pread(10, got, DSIZE, 0) == DSIZE && memcmp(got, buf, DSIZE) == 0,
	      "deleted file content differs");
	check(read(10, got, 100) == 100 && memcmp(got, buf + DOFF, 100) == 0, "read at offset");
	check(write(10, "XYZ", 3) == 3, "write to deleted file");
	check(pread(10, got, 3, DOFF + 100) == 3 && memcmp(got, "XYZ", 3) == 0, "write-back");

	/* devices */
	check_flags(11, O_RDONLY, 0);
	check_chr(11, 1, 3);
	check(read(11, got, 10) == 0, "/dev/null read not EOF");
	check_flags(12, O_RDONLY | O_NONBLOCK, 0);
	check_chr(12, 1, 5);
	memset(got, 0xff, 4096);
	check(read(12, got, 4096) == 4096, "/dev/zero read");
	for (int i = 0; i < 4096; i++)
		check(got[i] == 0, "/dev/zero gave a non-zero byte");
	check_flags(13, O_RDONLY, 0);
	check_chr(13, 1, 9);
	memset(got, 0, 64);
	check(read(13, got, 64) == 64, "/dev/urandom read");
	int nonzero = 0;
	for (int i = 0; i < 64; i++)
		nonzero += got[i] != 0;
	check(nonzero > 32, "/dev/urandom gave %d non-zero bytes of 64", nonzero);
	check(write(11, "x", 1) < 0 && errno == EBADF, "O_RDONLY /dev/null accepted a write");

	/* fd 14: appends go to the end of the (still linked) file */
	check_flags(14, O_WRONLY | O_APPEND, 1);
	check(fstat(14, &st) == 0 && st.st_nlink == 1, "append.log lost its link");
	struct stat st_path;
	check(stat(apath, &st_path) == 0 && st_path.st_ino == st.st_ino, "fd 14 is not append.log");
	off_t size0 = st.st_size;
	check(size0 >= 3, "append.log shrank to %lld", (long long)size0);
	check(write(14, "def", 3) == 3, "append write");
	check(fstat(14, &st) == 0 && st.st_size == size0 + 3, "append did not grow the file");
	check(lseek(14, 0, SEEK_CUR) == size0 + 3, "offset after append");
	int rfd = open(apath, O_RDONLY);
	check(rfd >= 0 && pread(rfd, got, 3, 0) == 3 && memcmp(got, "abc", 3) == 0, "append head");
	check(pread(rfd, got, 3, size0) == 3 && memcmp(got, "def", 3) == 0, "append tail");
	close(rfd);
	pass();
	return 0;
}
