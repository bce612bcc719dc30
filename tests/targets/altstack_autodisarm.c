/* altstack_autodisarm.c -- an alternate signal stack with SS_AUTODISARM (bit 31 of ss_flags).
 *
 * State checked: after SIGUSR1, sigaltstack() reports the same stack (sp, size) and
 * SS_AUTODISARM still set; a SIGUSR2 handler running on that stack (SA_ONSTACK) sees the
 * stack disarmed inside (SS_DISABLE) and its address on the alternate stack.
 * (The engine once read ss_flags as a signed int, so a dump failed on bit 31.)
 */
#include "zdtm.h"

#ifndef SS_AUTODISARM
#define SS_AUTODISARM (1U << 31)
#endif
#define ALT_SIZE (64 * 1024)

static char *alt;
static volatile int in_flags = -1, on_alt;

static void usr2(int sig)
{
	stack_t cur;
	char here;
	(void)sig;
	sigaltstack(NULL, &cur);
	in_flags = cur.ss_flags;
	on_alt = &here >= alt && &here < alt + ALT_SIZE;
}

int main(void)
{
	zdtm_init(0);
	alt = malloc(ALT_SIZE);
	check(alt, "malloc");
	stack_t ss = { .ss_sp = alt, .ss_size = ALT_SIZE, .ss_flags = (int)SS_AUTODISARM };
	check(sigaltstack(&ss, NULL) == 0, "sigaltstack: %s", strerror(errno));
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = usr2;
	sa.sa_flags = SA_ONSTACK;
	check(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction");
	ready();
	wait_usr1_polling();
	if (corrupt_requested()) {
		stack_t off = { .ss_flags = SS_DISABLE };
		sigaltstack(&off, NULL);
	}
	stack_t now;
	check(sigaltstack(NULL, &now) == 0, "sigaltstack query");
	check(now.ss_sp == alt && now.ss_size == ALT_SIZE, "stack %p+%zu, want %p+%d", now.ss_sp, now.ss_size,
	      alt, ALT_SIZE);
	check((unsigned)now.ss_flags & SS_AUTODISARM, "flags %#x: SS_AUTODISARM lost", (unsigned)now.ss_flags);
	raise(SIGUSR2);
	check(on_alt, "the SA_ONSTACK handler did not run on the alternate stack");
	check(in_flags & SS_DISABLE, "inside the handler the stack was not disarmed (flags %#x)", in_flags);
	pass();
}
