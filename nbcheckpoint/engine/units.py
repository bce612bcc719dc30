"""How sizes read for the user, everywhere (CLI, `show`, the kernel's lines, the shim's log)."""
from __future__ import annotations


def format_size(n) -> str:
    """Bytes in binary units: '512 B', '1.5 MiB' (None counts as 0)."""
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
