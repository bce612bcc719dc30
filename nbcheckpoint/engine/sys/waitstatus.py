"""Decoding a wait(2) status: the one copy of <sys/wait.h>'s macros and ptrace's event bits.

A status is stopped (low byte 0x7f: the stop signal in bits 8-15, a PTRACE_EVENT_* in bits
16-31), or ended: killed by the signal in bits 0-6, else exited with the code in bits 8-15.
"""
from __future__ import annotations


def stopped(status: int) -> bool:
    """A stop (signal-delivery, group or ptrace event stop), not a death."""
    return (status & 0xFF) == 0x7F


def stop_signal(status: int) -> int:
    """The signal of a stop (SIGTRAP | 0x80 for a PTRACE_O_TRACESYSGOOD syscall stop)."""
    return (status >> 8) & 0xFF


def stop_event(status: int) -> int:
    """The PTRACE_EVENT_* number of a ptrace stop status (0 if none)."""
    return (status >> 16) & 0xFFFF


def term_signal(status: int) -> int:
    """The signal that killed the process, 0 if it exited."""
    return status & 0x7F


def exit_status(status: int) -> int:
    """The code it passed to exit (of a process that exited)."""
    return (status >> 8) & 0xFF


def exit_code(status: int) -> int:
    """As a shell reports it: the exit code, or 128 + the signal that killed it."""
    sig = term_signal(status)
    return 128 + sig if sig else exit_status(status)
