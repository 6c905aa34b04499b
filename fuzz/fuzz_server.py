# Invariant tested: S5-6, S5-7, S5-8, S5-9, S5-10, S5-14
"""
Fuzz a live cache server: random and mutated byte streams on fresh connections, while a
healthy client on its own connection keeps working.

One server process (``python -m trio_taskgraph.cache_server``, small window and chunks) runs
for the whole campaign. For every input:

- the bytes go to the server on a new connection (most seeds start with a valid ``hello``,
  so mutations reach every request type), then our side is shut for writing;
- everything the server sends back must be well-formed frames holding server messages
  (S5-6, S5-7), and the connection must end (closed by the server) within a few seconds:
  an error reply and/or a closed connection, never a hang (S5-10);
- the server process must still be alive, and the healthy client's row write and read on
  its own long-lived connection must still round-trip exactly (S5-8, S5-10).

Run ``python fuzz/fuzz_server.py [--seconds N]`` (atheris when installed, else a seeded
mutation loop over ``fuzz/corpus/server/``). ``run(seconds)`` is what the test calls.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trio_taskgraph import WireFormatError
from trio_taskgraph._core._codec import CLOSED, NEED_DATA, FrameDecoder
from trio_taskgraph._core._keys import input_digest
from trio_taskgraph._core._messages import (
    PROTOCOL_VERSION,
    GetOutput,
    Hello,
    Ok,
    SaveOutput,
    Welcome,
    decode_server,
    encode_message,
)

CORPUS = Path(__file__).resolve().parent / "corpus" / "server"
#: Seconds the server has to close a connection after our EOF.
CLOSE_TIMEOUT = 5.0


class Finding(AssertionError):
    """The server broke an invariant on this input."""


class LiveServer:
    """The server process, and a healthy client connection to it."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="tg-", dir="/tmp")
        self.socket_path = os.path.join(self.folder, "s")
        self.errlog = os.path.join(self.folder, "stderr.log")
        with open(self.errlog, "wb") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trio_taskgraph.cache_server",
                    "--root",
                    os.path.join(self.folder, "root"),
                    "--socket",
                    self.socket_path,
                    "--window",
                    "16384",
                    "--chunk-bytes",
                    "4096",
                    "--max-in-flight",
                    "16",
                    "--grace",
                    "2",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.process.stdout is not None
        if not self.process.stdout.readline().startswith(b"READY"):
            self.close()
            raise RuntimeError("the cache server did not start")
        self.healthy = self._connect("healthy")
        self.decoder = FrameDecoder()
        self.round = 0

    def _connect(self, namespace: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CLOSE_TIMEOUT)
        sock.connect(self.socket_path)
        sock.sendall(encode_message(Hello(version=PROTOCOL_VERSION, namespace=namespace)))
        decoder = FrameDecoder()
        welcome = _read_message(sock, decoder)
        if not isinstance(welcome, Welcome):
            raise Finding(f"handshake answered with {welcome!r}")
        return sock

    def check_alive(self, data: bytes) -> None:
        if self.process.poll() is not None:
            raise Finding(
                f"the server exited ({self.process.returncode}) on {data.hex()}:\n"
                + Path(self.errlog).read_text(errors="replace")[-4000:]
            )

    def check_healthy(self, data: bytes) -> None:
        """The healthy client's write and read on its own connection still round-trip."""
        self.round += 1
        n = self.round
        inputs = {"round": n}
        output = {"n": n, "blob": b"\x00" * (n % 50)}
        digest = input_digest(inputs)
        # One at a time: requests on a connection run concurrently (S5-8), so a read sent
        # before the write's reply might not see the write.
        try:
            self.healthy.sendall(
                encode_message(
                    SaveOutput(id=2 * n, ns="healthy", task_type="t", digest=digest, output=output)
                )
            )
            saved = _read_message(self.healthy, self.decoder)
            self.healthy.sendall(
                encode_message(GetOutput(id=2 * n + 1, ns="healthy", task_type="t", digest=digest))
            )
            got = _read_message(self.healthy, self.decoder)
        except (OSError, Finding) as exc:
            raise Finding(f"the healthy client broke after {data.hex()}: {exc}") from exc
        if saved != Ok(id=2 * n, value=None) or got != Ok(id=2 * n + 1, value=output):
            raise Finding(f"the healthy client got {saved!r}, {got!r} after {data.hex()}")

    def close(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            self.healthy.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_message(sock: socket.socket, decoder: FrameDecoder) -> object:
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            decoder.receive_data(sock.recv(65536))
            continue
        if frame is CLOSED:
            raise Finding("the connection closed")
        return decode_server(frame)


def check_one(server: LiveServer, data: bytes) -> None:
    """Send ``data`` on a fresh connection; check the replies, the close, and the server."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CLOSE_TIMEOUT)
    try:
        sock.connect(server.socket_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        decoder = FrameDecoder()
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            if time.monotonic() > deadline:
                raise Finding(f"the server kept the connection open on {data.hex()}")
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise Finding(f"the server neither replied nor closed on {data.hex()}") from None
            try:
                decoder.receive_data(chunk)
                while (frame := decoder.next_frame()) is not NEED_DATA:
                    if frame is CLOSED:
                        break
                    decode_server(frame)  # every reply is a well-formed server message
            except WireFormatError as exc:
                raise Finding(f"the server sent a malformed reply on {data.hex()}: {exc}") from exc
            if not chunk:
                break
    finally:
        sock.close()
    server.check_alive(data)
    server.check_healthy(data)


def _seeds() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(CORPUS.glob("*")) if p.is_file()]
    return seeds or [encode_message(Hello(version=PROTOCOL_VERSION, namespace="f"))]


def _mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            data.insert(rng.randint(0, len(data)), rng.randrange(256))
        elif op == 2 and data:
            del data[rng.randrange(len(data)) :][: rng.randint(1, 8)]
        elif op == 3:
            other = rng.choice(seeds)
            cut = rng.randint(0, len(other))
            data[rng.randint(0, len(data)) :] = other[cut:]
        elif op == 4:
            magic = rng.choice(
                [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xc1", b"\xd6\xff", b"\xa2id\xff"]
            )
            pos = rng.randint(0, len(data))
            data[pos:pos] = magic
        elif op == 5:
            data = bytearray(rng.randbytes(rng.randint(0, 32)))
    return bytes(data)


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz a live server for ``seconds``; return how many inputs ran. Raises `Finding`."""
    rng = random.Random(seed)
    seeds = _seeds()
    server = LiveServer()
    count = 0
    try:
        for s in seeds:
            check_one(server, s)
            count += 1
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            check_one(server, _mutate(rng, seeds))
            count += 1
    finally:
        server.close()
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description="fuzz a live cache server")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)))
    parser.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args()
    try:
        import atheris
    except ImportError:
        count = run(args.seconds, seed=args.seed)
        print(f"inputs run: {count}")
        return 0
    server = LiveServer()
    atexit.register(server.close)
    counter = [0]

    def test_one_input(data: bytes) -> None:
        counter[0] += 1
        check_one(server, data)

    atexit.register(lambda: print(f"inputs run: {counter[0]}"))
    # Seed inputs by file list: a corpus directory argument would make libFuzzer write its
    # new inputs into the repository.
    seeds = ",".join(str(p) for p in sorted(CORPUS.glob("*")) if p.is_file())
    argv = [sys.argv[0], *rest, f"-max_total_time={max(1, int(args.seconds))}"]
    if seeds:
        argv.append(f"-seed_inputs={seeds}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0  # pragma: no cover - atheris exits the process


if __name__ == "__main__":
    sys.exit(main())
