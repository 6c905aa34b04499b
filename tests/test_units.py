"""
Byte sizes on the command line (``--size 8MiB``) and in tables.
"""

from __future__ import annotations

import pytest

from trio_taskgraph._units import format_bytes, format_rate, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("0", 0),
        ("64KiB", 64 * 1024),
        ("8MiB", 8 * 1024**2),
        ("8M", 8 * 1024**2),
        ("8m", 8 * 1024**2),
        ("512 MiB", 512 * 1024**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("2G", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("10kB", 10_000),
        ("3MB", 3_000_000),
        ("1GB", 10**9),
        ("7B", 7),
        (".5K", 512),
    ],
)
def test_parse_size_accepts_the_documented_forms(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1", "8 MiBs", "1e9", "0.3B", "1..2K", "8 Mi B"])
def test_parse_size_refuses_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|whole number"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (8 * 1024**2, "8 MiB"),
        (512 * 1024**2, "512 MiB"),
        (1000 * 1024**2, "1000 MiB"),
        (3 * 1024**3 // 2, "1.5 GiB"),
        (5 * 1024**5, "5120 TiB"),
    ],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


def test_format_rate() -> None:
    assert format_rate(512 * 1024**2, 2.0) == "256 MiB/s"
    assert format_rate(1, 0.0) == "-"
