/* tree.c -- a process tree: children and a grandchild with the same PIDs and parents, a
 * process group of their own, a zombie with its exit status, a job-control stopped child,
 * pdeathsig, and shared anonymous memory still shared between the processes.
 *
 *   main (session leader) --+-- A  (pgid A, pdeathsig SIGTERM) --- A1 (pgid A)
 *                           +-- Z  (exited 7, not reaped: a zombie)
 *                           +-- S  (stopped by SIGSTOP)
 * Every live child writes its getppid()/getpgrp() and a heartbeat into the shared page. */
#include "zdtm.h"
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

struct slot { volatile pid_t pid, ppid, pgid; volatile long beat; volatile int pdeath; };
static struct slot *sh;

static void child_loop(int i)
{
	sh[i].pid = getpid();
	for (;;) {
		sh[i].ppid = getppid();
		sh[i].pgid = getpgrp();
		prctl(PR_GET_PDEATHSIG, &sh[i].pdeath);
		sh[i].beat++;
		usleep(2000);
	}
}

int main(void)
{
	zdtm_init(0);
	sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	check(sh != MAP_FAILED, "mmap");
	pid_t me = getpid();
	pid_t a = fork();
	if (a == 0) {
		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		pid_t a1 = fork();
		if (a1 == 0)
			child_loop(1);
		child_loop(0);
	}
	pid_t z = fork();
	if (z == 0)
		_exit(7);
	pid_t s = fork();
	if (s == 0)
		child_loop(2);
	while (!sh[0].beat || !sh[1].beat || !sh[2].beat)
		usleep(1000);
	kill(s, SIGSTOP);
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	check(waitid(P_PID, s, &si, WSTOPPED) == 0, "waitid stopped");
	while (1) {       /* z is a zombie once its state says so */
		char path[64], st[256]; snprintf(path, sizeof path, "/proc/%d/stat", z);
		FILE *f = fopen(path, "r"); check(f, "open stat");
		check(fgets(st, sizeof st, f), "read stat"); fclose(f);
		if (strstr(st, ") Z ")) break;
		usleep(1000);
	}
	ready();
	wait_usr1_polling();

	long b0 = sh[0].beat, b1 = sh[1].beat, b2 = sh[2].beat;
	usleep(100000);
	check(sh[0].beat > b0 && sh[1].beat > b1, "A and A1 run and still share memory with main (%ld %ld)", sh[0].beat, sh[1].beat);
	check(sh[2].beat == b2, "S is still stopped");
	check(sh[0].ppid == me, "A's parent is main (%d != %d)", sh[0].ppid, me);
	check(sh[1].ppid == a, "A1's parent is A (%d != %d)", sh[1].ppid, a);
	check(sh[0].pgid == a && sh[1].pgid == a, "A and A1 in group A (%d %d)", sh[0].pgid, sh[1].pgid);
	check(sh[0].pdeath == SIGTERM, "A's pdeathsig (%d)", sh[0].pdeath);
	check(getsid(0) == me && getsid(a) == me, "one session led by main");
	check(getpgid(s) == me, "S in main's group");
	/* the zombie: still there, with its status */
	int status = 0;
	check(waitpid(z, &status, WNOHANG) == z, "zombie %d reapable", z);
	check(WIFEXITED(status) && WEXITSTATUS(status) == 7, "zombie status %#x", status);
	if (corrupt_requested())
		kill(s, SIGCONT);
	usleep(20000);
	check(sh[2].beat == b2, "S stayed stopped");
	kill(s, SIGCONT);
	usleep(50000);
	check(sh[2].beat > b2, "S runs after SIGCONT");
	kill(sh[1].pid, SIGKILL); kill(a, SIGKILL); kill(s, SIGKILL);
	waitpid(a, NULL, 0); waitpid(s, NULL, 0);
	pass();
}
