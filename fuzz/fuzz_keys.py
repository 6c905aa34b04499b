# Invariant tested: S4-1, S4-6
"""
Fuzz the pure row-key and ref-signing core (`trio_taskgraph._core._keys`) from raw bytes.

Each input is split in two. The first half is read as a program that builds a nested value
(None, bools, ints, floats, str, bytes, lists, dicts, sets); the harness checks that
reordering every dict at every depth keeps the canonical encoding (S4-1) and that the
encoding separates values a type-aware model calls different. The second half is used as
forged ref text and as edits (position, byte) applied to a ref the signer issued; every such
ref must be refused with `ForeignRefError` and nothing else (S4-6), unless it is exactly the
issued text.

    python fuzz/fuzz_keys.py --seconds 60

Uses atheris when it is importable, otherwise random bytes and mutations of the corpus in
``fuzz/corpus/keys/``.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _harness  # noqa: E402

from trio_taskgraph._core._keys import RefSigner, canonical_encode  # noqa: E402
from trio_taskgraph._core._refs import CacheRef  # noqa: E402
from trio_taskgraph._errors import ForeignRefError  # noqa: E402

SIGNER = RefSigner(repository_id="0123456789abcdef" * 2, secret=b"fuzz-secret-" * 3)
ISSUED = SIGNER.issue("default", "f" * 32)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        piece = self.data[self.pos : self.pos + n]
        self.pos += n
        return piece

    def byte(self) -> int:
        piece = self.take(1)
        return piece[0] if piece else 0


def _build(reader: _Reader, depth: int) -> object:
    op = reader.byte() % (10 if depth < 4 else 7)
    if op == 0:
        return None
    if op == 1:
        return bool(reader.byte() & 1)
    if op == 2:
        return int.from_bytes(reader.take(3), "big", signed=True)
    if op == 3:
        raw = reader.take(8).ljust(8, b"\0")
        value = struct.unpack(">d", raw)[0]
        return value
    if op == 4:
        return reader.take(reader.byte() % 6).decode("latin-1")
    if op == 5:
        return reader.take(reader.byte() % 6)
    if op == 6:
        return reader.byte() % 3  # small ints collide with bools and str digits on purpose
    count = reader.byte() % 4
    if op == 7:
        return [_build(reader, depth + 1) for _ in range(count)]
    if op == 8:
        out: dict[object, object] = {}
        for _ in range(count):
            key = _build(reader, 9)  # scalars only: keys must be hashable
            out[key] = _build(reader, depth + 1)
        return out
    return frozenset(x for x in (_build(reader, 9) for _ in range(count)))


def _reordered(value: object) -> object:
    if isinstance(value, dict):
        return {k: _reordered(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


def _model(value: object) -> object:
    """A type-aware identity: equal models iff the values are the same input."""
    if isinstance(value, dict):
        return ("d", tuple(sorted((repr(_model(k)), repr(_model(v))) for k, v in value.items())))
    if isinstance(value, list):
        return ("l", tuple(_model(v) for v in value))
    if isinstance(value, frozenset):
        return ("s", tuple(sorted(repr(_model(v)) for v in value)))
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    return (type(value).__name__, repr(value))


def _forged(text: object) -> CacheRef:
    ref = object.__new__(CacheRef)
    object.__setattr__(ref, "ref", text)
    return ref


def _must_refuse(ref: CacheRef) -> None:
    try:
        SIGNER.parse(ref, namespace="default")
    except ForeignRefError:
        return
    if ref.ref == ISSUED:
        return
    raise AssertionError(f"S4-6: accepted a ref it did not issue: {ref.ref!r}")


def TestOneInput(data: bytes) -> None:
    half = len(data) // 2
    first = _Reader(data[:half])
    a = _build(first, 0)
    b = _build(first, 0)
    enc_a = canonical_encode(a)
    assert canonical_encode(_reordered(a)) == enc_a, "S4-1: dict order changed the key"
    same = _model(a) == _model(b)
    assert (canonical_encode(b) == enc_a) == same, f"S4-1: {a!r} vs {b!r}"

    tail = data[half:]
    _must_refuse(_forged(tail.decode("latin-1")))
    _must_refuse(_forged(ISSUED + tail.decode("latin-1")))
    edited = list(ISSUED)
    for i in range(0, len(tail) - 1, 2):
        edited[tail[i] % len(edited)] = chr(tail[i + 1])
    _must_refuse(_forged("".join(edited)))
    assert SIGNER.parse(CacheRef(ISSUED), namespace="default") == "f" * 32


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz for about ``seconds`` (corpus first); return the number of inputs run."""
    return _harness.run_inputs(TestOneInput, name="keys", seconds=seconds, seed=seed, max_len=300)


if __name__ == "__main__":
    sys.exit(_harness.main(name="keys", description=__doc__, check=TestOneInput, run=run))
