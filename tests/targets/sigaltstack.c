/* sigaltstack.c -- per-thread alternate signal stacks, frozen while running on one.
 *
 * Thread T installs a sigaltstack (its own mmap'ed region) and raises SIGUSR2, whose
 * SA_ONSTACK handler then sits (nanosleep loop) ON THE ALTERNATE STACK until SIGUSR1; main
 * has no alternate stack.  After SIGUSR1: inside the handler, sigaltstack() reports
 * SS_ONSTACK with the same ss_sp/ss_size and a local's address is within it; the handler
 * returns through the rt_sigreturn frame saved on the alt stack; afterwards T's
 * sigaltstack() is the same (flags 0) and a fresh SIGUSR2 again runs on it; main's
 * sigaltstack is still disabled and its SIGUSR2 runs on its normal stack.
 */
#include "zdtm.h"
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>

#define ALT_SIZE (256 * 1024)	/* xstate makes signal frames big (AVX-512/AMX): be generous */

static char *alt_sp;
static volatile pid_t t_tid;
static volatile int parked, go, corrupt_now;
static volatile int handler_runs;
static volatile uintptr_t last_local;	/* address of a local in the last handler run */
static volatile int last_onstack_flag;
static char err[512];

static void set_err(const char *m)
{
	if (!err[0])
		snprintf(err, sizeof(err), "%s", m);
}

static int on_alt(uintptr_t a) { return a >= (uintptr_t)alt_sp && a < (uintptr_t)alt_sp + ALT_SIZE; }

static void usr2_handler(int sig)
{
	(void)sig;
	volatile uint64_t magic = 0x5157a1c0ffee0001ull;
	stack_t ss;
	sigaltstack(NULL, &ss);
	last_local = (uintptr_t)&magic;
	last_onstack_flag = !!(ss.ss_flags & SS_ONSTACK);
	handler_runs++;
	if (zdtm_gettid() != t_tid || handler_runs != 1)
		return;
	/* first run in T: park here, on the alternate stack, until SIGUSR1 */
	parked = 1;
	while (!go)
		msleep(10);
	sigaltstack(NULL, &ss);
	if (!(ss.ss_flags & SS_ONSTACK))
		set_err("handler after restore: SS_ONSTACK not reported");
	if (ss.ss_sp != alt_sp || ss.ss_size != ALT_SIZE)
		set_err("handler after restore: sigaltstack sp/size changed");
	if (!on_alt((uintptr_t)&magic))
		set_err("handler after restore: not on the alternate stack");
	if (magic != 0x5157a1c0ffee0001ull)
		set_err("handler after restore: local variable on the alt stack corrupted");
}

static void *thread_t(void *arg)
{
	(void)arg;
	t_tid = zdtm_gettid();
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &s, NULL);	/* SIGUSR1 goes to main */

	stack_t ss = { .ss_sp = alt_sp, .ss_size = ALT_SIZE, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL)) {
		set_err("sigaltstack set failed");
		return NULL;
	}
	pthread_kill(pthread_self(), SIGUSR2);	/* parks in the handler */
	/* back on the normal stack */
	if (corrupt_now) {
		ss.ss_size = ALT_SIZE - 4096;
		sigaltstack(&ss, NULL);
	}
	stack_t cur;
	sigaltstack(NULL, &cur);
	if (cur.ss_sp != alt_sp || cur.ss_size != ALT_SIZE || cur.ss_flags != 0) {
		set_err("thread T: sigaltstack changed after the handler returned");
		return NULL;
	}
	int before = handler_runs;
	pthread_kill(pthread_self(), SIGUSR2);
	if (handler_runs != before + 1)
		set_err("thread T: second SIGUSR2 not handled");
	else if (!on_alt(last_local) || !last_onstack_flag)
		set_err("thread T: second SIGUSR2 handler not on the alternate stack");
	return NULL;
}

int main(void)
{
	zdtm_init(0);
	alt_sp = mmap(NULL, ALT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	check(alt_sp != MAP_FAILED, "mmap");
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = usr2_handler;
	sa.sa_flags = SA_ONSTACK;
	sigaction(SIGUSR2, &sa, NULL);

	pthread_t th;
	check(pthread_create(&th, NULL, thread_t, NULL) == 0, "pthread_create");
	while (!parked && !err[0])
		msleep(1);
	check(!err[0], "%s", err);
	check(on_alt(last_local) && last_onstack_flag, "T's handler not on the alt stack");
	ready();

	wait_usr1_polling();
	if (corrupt_requested())
		corrupt_now = 1;
	go = 1;
	pthread_join(th, NULL);
	check(!err[0], "%s", err);
	check(handler_runs == 2, "handler ran %d times in T", handler_runs);

	stack_t cur;
	sigaltstack(NULL, &cur);
	check(cur.ss_flags == SS_DISABLE, "main has an alternate stack (flags %#x, sp %p, size %#zx;"
	      " T's is %p)", cur.ss_flags, cur.ss_sp, cur.ss_size, (void *)alt_sp);
	raise(SIGUSR2);
	check(handler_runs == 3, "main's SIGUSR2 not handled");
	check(!on_alt(last_local) && !last_onstack_flag, "main's handler ran on T's alt stack");
	pass();
	return 0;
}
