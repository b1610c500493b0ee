#!/usr/bin/env python3
"""A TCP proxy whose link can be cut: what scripts/cluster-bench.sh puts between one densepush node and Redis.

Usage: scripts/cut-proxy.py LISTEN_PORT UPSTREAM_PORT [--cut-secs S]

Forwards 127.0.0.1:LISTEN_PORT to 127.0.0.1:UPSTREAM_PORT. On SIGUSR1 it cuts the link for S seconds (default
2): every proxied connection is closed at once and new ones are closed as soon as they are accepted, like a
network partition between that node and Redis that Redis and the other nodes do not see; then it forwards
again. Prints one line per cut ("cut", "restored") with a monotonic timestamp. SIGTERM stops it.
"""

import argparse
import asyncio
import signal
import time


class Proxy:
    def __init__(self, upstream: int, cut_secs: float):
        self.upstream = upstream
        self.cut_secs = cut_secs
        self.cut_until = 0.0
        self.open: set[asyncio.StreamWriter] = set()

    def is_cut(self) -> bool:
        return time.monotonic() < self.cut_until

    def cut(self) -> None:
        self.cut_until = time.monotonic() + self.cut_secs
        print(f"cut {time.monotonic():.3f} for {self.cut_secs}s", flush=True)
        for writer in list(self.open):
            writer.transport.abort()
        self.open.clear()
        asyncio.get_running_loop().call_later(self.cut_secs, self.restored)

    def restored(self) -> None:
        print(f"restored {time.monotonic():.3f}", flush=True)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut():
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.open.update((writer, up_writer))
        await asyncio.gather(self.pump(reader, up_writer), self.pump(up_reader, writer))

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open.discard(writer)
            writer.transport.abort()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listen", type=int)
    parser.add_argument("upstream", type=int)
    parser.add_argument("--cut-secs", type=float, default=2.0)
    args = parser.parse_args()
    proxy = Proxy(args.upstream, args.cut_secs)
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", args.listen)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    print(f"proxy 127.0.0.1:{args.listen} -> 127.0.0.1:{args.upstream}", flush=True)
    async with server:
        await stop


if __name__ == "__main__":
    asyncio.run(main())
