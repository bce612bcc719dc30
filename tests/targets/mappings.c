/* mappings.c DIR -- one VMA of each common kind, with data.
 *
 *   priv_anon   4 MB MAP_PRIVATE|MAP_ANONYMOUS rw, pattern in every other page
 *   shared_anon 1 MB MAP_SHARED|MAP_ANONYMOUS rw, pattern
 *   priv_file   DIR/priv.dat (2 MB) mapped MAP_PRIVATE rw at file offset 64 KB, some pages
 *               written (COW copies); the file itself stays unchanged
 *   shared_file DIR/shared.dat (1 MB) MAP_SHARED rw, written through the mapping
 *   none        64 KB filled with data, then mprotect PROT_NONE
 *   ro_anon     256 KB filled with data, then mprotect PROT_READ
 *   sparse      1 GB MAP_NORESERVE anon, only 4 pages touched
 * Main waits in ppoll() with SIGUSR1 unblocked only in its temporary mask.
 * After SIGUSR1: every region is mapped at the same address with the same protection and
 * kind (from /proc/self/maps), contents match (untouched pages read as zero / file data),
 * the shared file mapping is still backed by the file (writes both ways are visible), the
 * sparse region is still mostly unpopulated (Rss), and the PROT_NONE data is intact.
 */
#include "zdtm.h"
#include <ctype.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <sys/mman.h>

#define PG 4096ul
#define MB (1024ul * 1024)

static unsigned char pat(int region, size_t off) { return (unsigned char)(region * 31 + off * 13 + (off >> 12)); }

struct region {
	const char *name;
	unsigned char *addr;
	size_t len;
	const char *perms;	/* as in /proc/self/maps */
	const char *file;	/* path suffix, or NULL for anon (shared anon shows /dev/zero) */
	unsigned long offset;
} R[7];
enum { PRIV_ANON, SHARED_ANON, PRIV_FILE, SHARED_FILE, NONE, RO_ANON, SPARSE };

static char priv_path[4096], shared_path[4096];

/* Find the /proc/self/maps line covering [addr, addr+len) and check perms, file, offset. */
static void check_vma(struct region *r)
{
	FILE *f = fopen("/proc/self/maps", "r");
	check(f, "open maps");
	char line[4600];
	int found = 0;
	while (fgets(line, sizeof(line), f)) {
		unsigned long s, e, off;
		char perms[8], path[4200] = "";
		if (sscanf(line, "%lx-%lx %7s %lx %*s %*s %4199[^\n]", &s, &e, perms, &off, path) < 4)
			continue;
		if (s > (uintptr_t)r->addr || e < (uintptr_t)r->addr + r->len)
			continue;
		found = 1;
		check(!strcmp(perms, r->perms), "%s: perms %s, expected %s", r->name, perms, r->perms);
		char *p = path;
		while (*p == ' ')
			p++;
		if (r->file) {
			size_t lp = strlen(p), lf = strlen(r->file);
			check(lp >= lf && !strcmp(p + lp - lf, r->file), "%s: mapped file '%.200s'",
			      r->name, p);
			unsigned long at = off + ((uintptr_t)r->addr - s);	/* file offset of addr */
			check(at == r->offset, "%s: file offset %#lx, expected %#lx", r->name, at,
			      r->offset);
		} else {
			check(!*p || r == &R[SHARED_ANON], "%s: anon region maps '%.200s'", r->name, p);
		}
	}
	fclose(f);
	check(found, "%s: no VMA covers %p+%#zx", r->name, r->addr, r->len);
}

/* Rss (kB) of the VMA containing addr, from /proc/self/smaps. */
static unsigned long rss_kb(void *addr)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	check(f, "open smaps");
	char line[4600];
	int in = 0;
	unsigned long v = ~0ul, s, e;
	while (fgets(line, sizeof(line), f)) {
		if (isxdigit((unsigned char)line[0]) && !isupper((unsigned char)line[0]) &&
		    sscanf(line, "%lx-%lx ", &s, &e) == 2)	/* a VMA header line */
			in = (uintptr_t)addr >= s && (uintptr_t)addr < e;
		else if (in && sscanf(line, "Rss: %lu kB", &v) == 1)
			break;
	}
	fclose(f);
	return v;
}

static unsigned char *map(size_t len, int prot, int flags, int fd, off_t off)
{
	void *p = mmap(NULL, len, prot, flags, fd, off);
	check(p != MAP_FAILED, "mmap %zu: %s", len, strerror(errno));
	return p;
}

static int make_file(const char *path, size_t len, int region)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	check(fd >= 0, "open %.300s", path);
	unsigned char *b = malloc(len);
	for (size_t i = 0; i < len; i++)
		b[i] = pat(region, i);
	check(write(fd, b, len) == (ssize_t)len, "write %.300s", path);
	free(b);
	return fd;
}

/* Is page `pg` of the private file mapping one we dirtied? */
static int cow_page(size_t pg) { return pg % 5 == 1; }
static const size_t sparse_pages[] = { 0, 75000, 150001, 262143 };	/* in 4K pages of 1 GB */

int main(int argc, char **argv)
{
	zdtm_init(1);
	check(argc > 1, "usage: mappings DIR");
	snprintf(priv_path, sizeof(priv_path), "%s/priv.dat", argv[1]);
	snprintf(shared_path, sizeof(shared_path), "%s/shared.dat", argv[1]);

	R[PRIV_ANON] = (struct region){ "priv_anon", map(4 * MB, PROT_READ | PROT_WRITE,
		MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 4 * MB, "rw-p", NULL, 0 };
	for (size_t i = 0; i < 4 * MB; i++)
		if ((i / PG) % 2 == 0)
			R[PRIV_ANON].addr[i] = pat(PRIV_ANON, i);

	R[SHARED_ANON] = (struct region){ "shared_anon", map(MB, PROT_READ | PROT_WRITE,
		MAP_SHARED | MAP_ANONYMOUS, -1, 0), MB, "rw-s", NULL, 0 };
	for (size_t i = 0; i < MB; i++)
		R[SHARED_ANON].addr[i] = pat(SHARED_ANON, i);

	int pfd = make_file(priv_path, 2 * MB, PRIV_FILE);
	R[PRIV_FILE] = (struct region){ "priv_file", map(MB, PROT_READ | PROT_WRITE, MAP_PRIVATE,
		pfd, 64 * 1024), MB, "rw-p", "/priv.dat", 64 * 1024 };
	for (size_t pg = 0; pg < MB / PG; pg++)
		if (cow_page(pg))
			memset(R[PRIV_FILE].addr + pg * PG, 0xc0 + pg % 16, PG);
	close(pfd);

	int sfd = open(shared_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	check(sfd >= 0 && ftruncate(sfd, MB) == 0, "shared.dat");
	R[SHARED_FILE] = (struct region){ "shared_file", map(MB, PROT_READ | PROT_WRITE, MAP_SHARED,
		sfd, 0), MB, "rw-s", "/shared.dat", 0 };
	close(sfd);
	for (size_t i = 0; i < MB; i++)
		R[SHARED_FILE].addr[i] = pat(SHARED_FILE, i);

	R[NONE] = (struct region){ "none", map(64 * 1024, PROT_READ | PROT_WRITE,
		MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 64 * 1024, "---p", NULL, 0 };
	for (size_t i = 0; i < 64 * 1024; i++)
		R[NONE].addr[i] = pat(NONE, i);
	check(mprotect(R[NONE].addr, 64 * 1024, PROT_NONE) == 0, "mprotect none");

	R[RO_ANON] = (struct region){ "ro_anon", map(256 * 1024, PROT_READ | PROT_WRITE,
		MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 256 * 1024, "r--p", NULL, 0 };
	for (size_t i = 0; i < 256 * 1024; i++)
		R[RO_ANON].addr[i] = pat(RO_ANON, i);
	check(mprotect(R[RO_ANON].addr, 256 * 1024, PROT_READ) == 0, "mprotect ro");

	R[SPARSE] = (struct region){ "sparse", map(1024 * MB, PROT_READ | PROT_WRITE,
		MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0), 1024 * MB, "rw-p", NULL, 0 };
	for (size_t k = 0; k < 4; k++)
		memset(R[SPARSE].addr + sparse_pages[k] * PG, 0x40 + k, PG);

	for (int i = 0; i < 7; i++)
		check_vma(&R[i]);
	ready();

	sigset_t m;
	sigprocmask(SIG_SETMASK, NULL, &m);
	sigdelset(&m, SIGUSR1);
	while (!zdtm_got_usr1)
		ppoll(NULL, 0, NULL, &m);
	if (corrupt_requested())
		R[PRIV_ANON].addr[3 * MB + 17] ^= 0x10;

	for (int i = 0; i < 7; i++)
		check_vma(&R[i]);

	unsigned char *a = R[PRIV_ANON].addr;
	for (size_t i = 0; i < 4 * MB; i++)
		check(a[i] == ((i / PG) % 2 == 0 ? pat(PRIV_ANON, i) : 0),
		      "priv_anon differs at %#zx", i);
	a = R[SHARED_ANON].addr;
	for (size_t i = 0; i < MB; i++)
		check(a[i] == pat(SHARED_ANON, i), "shared_anon differs at %#zx", i);

	a = R[PRIV_FILE].addr;
	for (size_t i = 0; i < MB; i++) {
		size_t pg = i / PG;
		unsigned char want = cow_page(pg) ? 0xc0 + pg % 16 : pat(PRIV_FILE, 64 * 1024 + i);
		check(a[i] == want, "priv_file differs at %#zx (page %s)", i,
		      cow_page(pg) ? "written" : "clean");
	}
	int fd = open(priv_path, O_RDONLY);
	check(fd >= 0, "reopen priv.dat");
	static unsigned char fb[2 * MB];
	check(pread(fd, fb, 2 * MB, 0) == (ssize_t)(2 * MB), "read priv.dat");
	close(fd);
	for (size_t i = 0; i < 2 * MB; i++)
		check(fb[i] == pat(PRIV_FILE, i), "priv.dat on disk changed at %#zx", i);

	a = R[SHARED_FILE].addr;
	fd = open(shared_path, O_RDWR);
	check(fd >= 0 && pread(fd, fb, MB, 0) == (ssize_t)MB, "read shared.dat");
	for (size_t i = 0; i < MB; i++) {
		check(a[i] == pat(SHARED_FILE, i), "shared_file mapping differs at %#zx", i);
		check(fb[i] == a[i], "shared.dat on disk differs from the mapping at %#zx", i);
	}
	a[5000] = 0x5a;				/* mapping -> file */
	check(pread(fd, fb, 1, 5000) == 1 && fb[0] == 0x5a, "shared mapping not backed by the file");
	check(pwrite(fd, "\xa5", 1, 7000) == 1, "pwrite");	/* file -> mapping */
	check(a[7000] == 0xa5, "file write not visible in the shared mapping");
	close(fd);

	check(mprotect(R[NONE].addr, 64 * 1024, PROT_READ) == 0, "mprotect none->r");
	for (size_t i = 0; i < 64 * 1024; i++)
		check(R[NONE].addr[i] == pat(NONE, i), "PROT_NONE region data differs at %#zx", i);
	for (size_t i = 0; i < 256 * 1024; i++)
		check(R[RO_ANON].addr[i] == pat(RO_ANON, i), "ro_anon differs at %#zx", i);

	unsigned long rss = rss_kb(R[SPARSE].addr);
	check(rss < 64 * 1024, "sparse 1 GB region has Rss %lu kB", rss);
	a = R[SPARSE].addr;
	for (size_t k = 0; k < 4; k++)
		for (size_t i = 0; i < PG; i++)
			check(a[sparse_pages[k] * PG + i] == 0x40 + k, "sparse page %zu differs", k);
	for (size_t pg = 0; pg < 1024 * MB / PG; pg += 997) {
		int touched = 0;
		for (size_t k = 0; k < 4; k++)
			touched |= pg == sparse_pages[k];
		check(touched || a[pg * PG] == 0, "sparse untouched page %zu not zero", pg);
	}
	zdtm_msg("mappings: sparse region Rss %lu kB", rss);
	pass();
	return 0;
}
