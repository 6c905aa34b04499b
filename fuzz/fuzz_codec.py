# Invariant tested: S5-1, S5-3, S5-4, S5-5, S5-16, S5-18
"""
Fuzz the wire codec: `unpackb` and `FrameDecoder` on arbitrary bytes.

For every input:

- `unpackb` returns a value or raises `WireFormatError`, nothing else (S5-3); a value it
  returns re-encodes, and re-decodes to an identical encoding (S5-1);
- the same bytes as one frame body give the same verdict through a `FrameDecoder` (S5-4);
- the input as a stream of frames, fed in chunks whose sizes come from the input, yields
  frames or `WireFormatError`, nothing else; after an error every call raises
  `WireFormatError` again (S5-5);
- a decoder that detaches binary payloads (S5-18) yields the same frames, and fails on the
  same input, as one that does not.

Run ``python fuzz/fuzz_codec.py [--seconds N]`` (atheris when installed, else a seeded
mutation loop over ``fuzz/corpus/codec/``). ``run(seconds)`` is what the test calls.
"""

from __future__ import annotations

import random
import struct
import sys
from typing import TYPE_CHECKING

import _harness

from trio_taskgraph import WireFormatError
from trio_taskgraph.wire import CLOSED, NEED_DATA, FrameDecoder, packb, unpackb

if TYPE_CHECKING:
    from collections.abc import Sequence


class Finding(AssertionError):
    """The codec broke an invariant on this input."""


def _decode_verdict(data: bytes) -> tuple[bool, object]:
    try:
        return True, unpackb(data)
    except WireFormatError:
        return False, None
    except Exception as exc:
        raise Finding(f"unpackb raised {type(exc).__name__}: {exc!r} on {data.hex()}") from exc


def _frame_verdict(body: bytes) -> bool:
    decoder = FrameDecoder()
    try:
        decoder.receive_data(struct.pack(">I", len(body)) + body)
        frame = decoder.next_frame()
    except WireFormatError:
        return False
    except Exception as exc:
        raise Finding(f"FrameDecoder raised {type(exc).__name__}: {exc!r} on {body.hex()}") from exc
    if frame is NEED_DATA or frame is CLOSED:
        raise Finding(f"a complete frame was not returned for {body.hex()}")
    return True


def _stream(data: bytes, detach: int | None = None) -> tuple[list[object], bool]:
    """The frames the input yields as a stream, and whether the decoder failed."""
    decoder = FrameDecoder(
        max_frame_bytes=1 << 16, max_depth=64, max_container_len=4096, detach_bin_bytes=detach
    )
    sizes = random.Random(data[:8]).choices(range(1, 17), k=len(data) + 1)
    frames: list[object] = []
    pos = 0
    try:
        for size in sizes:
            if pos >= len(data):
                break
            piece = data[pos : pos + size]
            if size % 2:
                decoder.receive_data(piece)
            else:  # the socket path (S5-16): straight into the lent buffer
                with decoder.receive_buffer(size) as room:
                    piece = piece[: len(room)]  # shorter around a detached payload
                    room[: len(piece)] = piece
                decoder.commit_received(len(piece))
            pos += len(piece)
            while (frame := decoder.next_frame()) is not NEED_DATA:
                if frame is CLOSED:
                    raise Finding("CLOSED before EOF")
                frames.append(_plain(frame))
        if len(data) % 2:
            decoder.receive_data(b"")
        else:
            decoder.commit_received(0)
        while (frame := decoder.next_frame()) is not CLOSED:
            frames.append(_plain(frame))
    except WireFormatError:
        if not decoder.broken:
            raise Finding(f"decoder raised but is not broken on {data.hex()}") from None
        for call in (decoder.next_frame, lambda: decoder.receive_data(b"x")):
            try:
                call()
            except WireFormatError:
                continue
            raise Finding(f"a broken decoder accepted a call on {data.hex()}") from None
        return frames, True
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"FrameDecoder raised {type(exc).__name__}: {exc!r} on {data.hex()}") from exc
    return frames, False


def _plain(frame: object) -> object:
    """A detached payload (a bytearray map value, S5-18) as the bytes it stands for."""
    if isinstance(frame, dict):
        return {k: bytes(v) if type(v) is bytearray else v for k, v in frame.items()}
    return frame


def _streams_agree(data: bytes) -> None:
    """
    A detaching decoder agrees with the ordinary one: the same verdict and the same frames
    (compared by repr: NaN is not equal to itself). On a failure, frames buffered before the
    bad bytes are dropped with them (S5-5), and which ones were buffered depends on how the
    reads split the stream, so then one list of frames need only start the other.
    """
    frames, failed = _stream(data)
    ordinary = [repr(f) for f in frames]
    for detach in (2, 9):
        frames, detached_failed = _stream(data, detach)
        got = [repr(f) for f in frames]
        shorter = min(len(got), len(ordinary))
        agree = detached_failed == failed and (
            got == ordinary if not failed else got[:shorter] == ordinary[:shorter]
        )
        if not agree:
            raise Finding(f"detaching (S5-18) changed the frames or verdict on {data.hex()}")


def check_one(data: bytes) -> None:
    """Run every check on one input; raise `Finding` on a broken invariant."""
    ok, value = _decode_verdict(data)
    if ok:
        try:
            encoded = packb(value)
            again = packb(unpackb(encoded))
        except Exception as exc:
            raise Finding(f"a decoded value failed to round-trip: {exc!r} on {data.hex()}") from exc
        if again != encoded:
            raise Finding(f"re-encoding is not stable on {data.hex()}")
    if data and _frame_verdict(data) != ok:
        raise Finding(f"unpackb and FrameDecoder disagree on {data.hex()}")
    _streams_agree(data)


#: Headers that stress the limits: huge declared lengths, reserved and timestamp bytes.
MAGIC = (
    b"\xdd\xff\xff\xff\xff",
    b"\xc9\x00\x00\x00\x05\xff",
    b"\xd6\xff",
    b"\xc1",
    b"\xff\xff\xff\xff",
)


def _mutate(rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    return _harness.mutate(rng, corpus or [b"\x90", b"\x80"], fresh=1 / 6, max_len=32, magic=MAGIC)


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz for about ``seconds`` (corpus first); return the number of inputs run."""
    return _harness.run_inputs(check_one, name="codec", seconds=seconds, seed=seed, mutator=_mutate)


if __name__ == "__main__":
    sys.exit(_harness.main(name="codec", description=__doc__, check=check_one, run=run))
