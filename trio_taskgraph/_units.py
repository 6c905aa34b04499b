"""
Byte sizes for people: ``parse_size("8MiB")`` for the command line, ``format_bytes`` for
tables. Pure functions, shared by the CLI, the demo and the benchmarks table.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["format_bytes", "format_rate", "parse_size"]

_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """
    Parse a byte size: ``"512MiB"``, ``"8M"``, ``"64KiB"``, ``"1.5GiB"``, ``"4096"``.

    ``K``/``M``/``G``/``T`` and ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024; ``kB``,
    ``MB``, ``GB``, ``TB`` are powers of 1000 (case does not matter).

    Raises:
        ValueError: the text is not a size (the message shows the accepted forms).
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a size: {text!r} (use e.g. 4096, 64KiB, 8MiB, 1.5GiB; K/M/G are powers of 1024)"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; powers of 1024, three significant digits at most."""
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.3g} {unit}" if size < 1000 else f"{size:.0f} {unit}"


def format_rate(size: float, seconds: float) -> str:
    """Bytes over seconds as ``"412 MiB/s"`` (``"-"`` when no time passed)."""
    if seconds <= 0:
        return "-"
    return f"{format_bytes(size / seconds)}/s"
