"""
The driver every ``fuzz/fuzz_<name>.py`` harness shares.

A harness supplies one ``check(data: bytes) -> None`` that raises on a finding, a seed corpus
in ``fuzz/corpus/<name>/`` and optionally its own mutator. This module runs it:

- `run_inputs`: in-process, for a time budget: the corpus first, then mutations of it mixed
  with fresh random bytes. Deterministic for a given seed and input count. This is what the
  smoke tests (``tests/test_fuzz_smoke.py``) and the fallback without atheris use.
- `main`: the command line (``--seconds``, default ``$FUZZ_SECONDS`` or 60; ``--seed``).
  With atheris importable it runs libFuzzer with coverage feedback from trio_taskgraph's own
  functions (and the harness's), keeping its own deadline so it can print the input count
  (libFuzzer leaves through C ``exit()``, past Python's ``atexit``). The seed corpus is passed
  as a file list and crash artifacts go to the temp folder, so a run never writes into the
  working tree. Every run prints ``inputs run: N``, which ``fuzz/run_all.py`` collects.

A finding is any exception from ``check``; the offending input is attached to it as a note in
hex, ready to be added to the corpus as a regression seed.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

__all__ = ["CORPUS_ROOT", "Check", "Mutator", "load_corpus", "main", "mutate", "run_inputs"]

CORPUS_ROOT = Path(__file__).resolve().parent / "corpus"

Check = Callable[[bytes], None]


class Run(Protocol):
    """A harness's ``run(seconds, *, seed=0) -> inputs run``."""

    def __call__(self, seconds: float, *, seed: int = 0) -> int: ...


#: ``(rng, corpus) -> input``: make one input, usually by mutating a corpus entry.
Mutator = Callable[[random.Random, Sequence[bytes]], bytes]


def load_corpus(name: str) -> list[bytes]:
    """Return the seed inputs in ``fuzz/corpus/<name>/``, sorted by file name."""
    folder = CORPUS_ROOT / name
    if not folder.is_dir():
        return []
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


def mutate(
    rng: random.Random,
    corpus: Sequence[bytes],
    *,
    max_len: int = 256,
    fresh: float = 0.5,
    magic: Sequence[bytes] = (),
) -> bytes:
    """
    The default mutator: fresh random bytes with probability ``fresh`` (always, with an
    empty corpus), otherwise a corpus entry with a few byte flips, inserts, deletes, splices
    and, when given, ``magic`` tokens (length headers, reserved bytes) inserted at random.
    """
    if not corpus or rng.random() < fresh:
        return rng.randbytes(rng.randint(0, max_len))
    buf = bytearray(rng.choice(corpus))
    ops = 5 if magic else 4
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(ops)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1:
            buf.insert(rng.randint(0, len(buf)), rng.randrange(256))
        elif op == 2 and buf:
            del buf[rng.randrange(len(buf)) :][: rng.randint(1, 8)]
        elif op == 3:
            other = rng.choice(corpus)
            buf[rng.randint(0, len(buf)) :] = other[rng.randint(0, len(other)) :]
        elif op == 4:
            pos = rng.randint(0, len(buf))
            buf[pos:pos] = rng.choice(magic)
    return bytes(buf)


def _checked(check: Check, name: str, data: bytes) -> None:
    try:
        check(data)
    except BaseException as exc:
        exc.add_note(f"fuzz_{name} input (hex): {data.hex()}")
        raise


def run_inputs(
    check: Check,
    *,
    name: str,
    seconds: float,
    seed: int = 0,
    mutator: Mutator | None = None,
    max_len: int = 256,
) -> int:
    """
    Run ``check`` on the corpus of ``name``, then on generated inputs until ``seconds`` pass.

    Returns:
        The number of inputs run (at least the corpus size).

    Raises:
        BaseException: whatever ``check`` raised (a finding), with the input as a note.
    """
    rng = random.Random(seed)
    corpus = load_corpus(name)
    make: Mutator = mutator or (lambda r, c: mutate(r, c, max_len=max_len))
    count = 0
    for data in corpus:
        _checked(check, name, data)
        count += 1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _checked(check, name, make(rng, corpus))
        count += 1
    return count


def _instrument_our_code(harness_module: str) -> None:
    # Coverage feedback from our package and the harness only: atheris.instrument_all()
    # instruments every loaded function, which takes ~30 s of the budget.
    import atheris

    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            module = getattr(obj, "__module__", None) or ""
            if module.startswith("trio_taskgraph") or module == harness_module:
                try:
                    atheris.instrument_func(obj)
                except Exception as exc:  # an uninstrumentable function only loses feedback
                    print(f"not instrumented: {obj.__qualname__}: {exc}", file=sys.stderr)


def _run_atheris(
    check: Check, name: str, seconds: float, rest: list[str], cleanup: Callable[[], None]
) -> None:
    import atheris

    _instrument_our_code("__main__")
    count = 0
    deadline = 0.0

    def one(data: bytes) -> None:
        nonlocal count, deadline
        try:
            _checked(check, name, data)
        except BaseException:
            cleanup()  # libFuzzer exits the process after a finding, past atexit
            raise
        count += 1
        if not deadline:
            deadline = time.monotonic() + seconds  # libFuzzer is up: start the clock
        elif time.monotonic() >= deadline:
            print(f"inputs run: {count}", flush=True)
            cleanup()
            os._exit(0)

    argv = [sys.argv[0], f"-max_total_time={int(seconds) + 30}", *rest]  # a backstop only
    if not any(a.startswith("-artifact_prefix=") for a in rest):
        argv.append(f"-artifact_prefix={tempfile.gettempdir()}/fuzz_{name}-")
    seeds = [str(p) for p in sorted((CORPUS_ROOT / name).glob("*")) if p.is_file()]
    if seeds:
        argv.append(f"-seed_inputs={','.join(seeds)}")
    atheris.Setup(argv, one)
    atheris.Fuzz()


def main(
    *,
    name: str,
    description: str,
    check: Check,
    run: Run,
    cleanup: Callable[[], None] = lambda: None,
    argv: Sequence[str] | None = None,
) -> int:
    """
    The command line of harness ``name``: atheris when importable, else ``run(seconds,
    seed=seed)``. Prints ``inputs run: N``; returns the exit code (a finding raises).
    ``cleanup`` releases what ``check`` set up (a server process) on the atheris path, which
    leaves through ``os._exit``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "60"))
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-atheris",
        action="store_true",
        help="use the in-process fallback even if atheris is installed",
    )
    args, rest = parser.parse_known_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        use_atheris = False
    else:
        use_atheris = not args.no_atheris
    if use_atheris:
        _run_atheris(check, name, args.seconds, rest, cleanup)  # exits the process
    print(f"inputs run: {run(args.seconds, seed=args.seed)}")
    return 0
