/* prctl_flags.c -- per-process prctl flags: PR_SET_CHILD_SUBREAPER (not inherited by fork)
 * and PR_SET_THP_DISABLE (a property of the mm, inherited by fork).
 *
 *   main (child subreaper, THP disabled) --- C (THP disabled except where advised,
 *                                               or fully if the kernel has no flags)
 *                                               `--- G (THP enabled again)
 * C and G write their PR_GET_THP_DISABLE and getppid() into a shared page.  After SIGUSR1
 * main checks every value, then kills C: the orphan G must be reparented to main (the
 * subreaper), not to init, and main reaps it.  ZDTM_CORRUPT: main drops the subreaper flag. */
#include "zdtm.h"
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#ifndef PR_THP_DISABLE_EXCEPT_ADVISED
#define PR_THP_DISABLE_EXCEPT_ADVISED (1 << 1)
#endif

struct slot { volatile pid_t pid, ppid; volatile int thp, want; volatile long beat; };
static struct slot *sh;
static pid_t me;

/* Report until orphaned to someone other than `parent` or main (then main is gone). */
static void child_loop(int i, pid_t parent)
{
	sh[i].pid = getpid();
	for (;;) {
		pid_t pp = getppid();
		sh[i].ppid = pp;
		sh[i].thp = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
		sh[i].beat++;
		if (pp != parent && pp != me)
			_exit(0);
		usleep(2000);
	}
}

static int get_subreaper(void)
{
	int v = -1;
	check(prctl(PR_GET_CHILD_SUBREAPER, &v, 0, 0, 0) == 0, "PR_GET_CHILD_SUBREAPER");
	return v;
}

int main(void)
{
	zdtm_init(0);
	me = getpid();
	sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	check(sh != MAP_FAILED, "mmap");
	check(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, "PR_SET_CHILD_SUBREAPER");
	check(prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0, "PR_SET_THP_DISABLE");
	pid_t c = fork();
	check(c >= 0, "fork");
	if (c == 0) {
		if (prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED, 0, 0) != 0)
			prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);	/* Linux < 6.18 */
		sh[0].want = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
		pid_t parent = getpid();
		if (fork() == 0) {
			prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0);
			sh[1].want = 0;
			child_loop(1, parent);
		}
		child_loop(0, me);
	}
	while (!sh[0].beat || !sh[1].beat)
		usleep(1000);
	ready();
	wait_usr1_polling();

	if (corrupt_requested())
		prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
	check(get_subreaper() == 1, "main: PR_GET_CHILD_SUBREAPER %d", get_subreaper());
	int thp = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
	check(thp == 1, "main: PR_GET_THP_DISABLE %d, expected 1", thp);
	long b0 = sh[0].beat, b1 = sh[1].beat;
	double t0 = now_mono();
	while ((sh[0].beat <= b0 + 1 || sh[1].beat <= b1 + 1) && now_mono() - t0 < 5)
		usleep(1000);
	check(sh[0].beat > b0 + 1 && sh[1].beat > b1 + 1, "C and G run (%ld %ld)", sh[0].beat, sh[1].beat);
	check(sh[0].ppid == me && sh[1].ppid == c, "parents: C's %d, G's %d", sh[0].ppid, sh[1].ppid);
	for (int i = 0; i < 2; i++)
		check(sh[i].thp == sh[i].want, "%s: PR_GET_THP_DISABLE %d, expected %d",
		      i ? "G" : "C", sh[i].thp, sh[i].want);

	/* the orphan goes to the nearest subreaper: main */
	kill(c, SIGKILL);
	check(waitpid(c, NULL, 0) == c, "reap C");
	t0 = now_mono();
	while (sh[1].ppid == c && now_mono() - t0 < 5)
		usleep(1000);
	check(sh[1].ppid == me, "orphan G reparented to %d, not to the subreaper %d", sh[1].ppid, me);
	kill(sh[1].pid, SIGKILL);
	check(waitpid(sh[1].pid, NULL, 0) == sh[1].pid, "main reaps the orphan G");
	pass();
}
