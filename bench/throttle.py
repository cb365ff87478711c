"""A TCP proxy that limits every connection to a fixed rate, each way.

Real object stores serve one connection at roughly 50-100 MB/s, whatever the
bandwidth behind it; on loopback one connection moves ~1 GiB/s and the limit is
the CPU. To measure what parallel transfers are for, the transfer benchmark
puts this proxy between the client and the local S3 server, so a single stream
is connection-bound as it would be against S3, and N streams get up to N times
that.

Pacing is per chunk and never banks idle time: after sending `n` bytes, the next
chunk of that connection may leave no sooner than `n / rate` seconds later (a
kept-alive connection that was idle does not get a burst).

    python -m bench.throttle --target 127.0.0.1:8333 --rate-mib-s 48
    # prints the listening port on its first line of stdout, then serves until killed

Runs as its own process so its pacing does not compete for the GIL with the
client under measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["throttled_proxy"]

_CHUNK = 256 * 1024
_MiB = 1024 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float) -> None:
    loop = asyncio.get_running_loop()
    next_send = loop.time()
    try:
        while data := await reader.read(_CHUNK):
            now = loop.time()
            if next_send > now:
                await asyncio.sleep(next_send - now)
            writer.write(data)
            await writer.drain()
            next_send = max(next_send, now) + len(data) / rate
    except (ConnectionError, OSError):
        pass  # either side hung up mid-stream: the other side sees it when we close
    finally:
        writer.close()


async def _serve(target_host: str, target_port: int, rate: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w, rate), _pipe(server_r, client_w, rate))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def throttled_proxy(endpoint: str, rate_mib_s: float) -> Iterator[str]:
    """Start the proxy in front of `endpoint` (http://host:port); yield its endpoint."""
    host, port = endpoint.removeprefix("http://").rstrip("/").rsplit(":", 1)
    args = ["--target", f"{host}:{port}", "--rate-mib-s", str(rate_mib_s)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.throttle", *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"throttling proxy did not start (printed {line!r})")
        yield f"http://127.0.0.1:{line}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throttle", description=__doc__)
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--rate-mib-s", type=float, required=True, help="per connection, each way")
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(host, int(port), args.rate_mib_s * _MiB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
