"""The only place with ctypes and raw system calls (ptrace, /proc, x86_64)."""
