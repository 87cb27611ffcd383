"""Cold boot: from ``RawVMCluster(n_workers=N)`` to N workers connected, bare image vs warm.

    python benchmarks/coldboot.py [--sizes 1 4] [--images bare warm]

Figures, one line each: seconds from the cluster's creation to N workers connected, and the
bytes the VMs downloaded from the package index (in total and per VM), for each image and N.
The bare image is what a fresh Amazon Linux 2023 VM has (no uv, no pip, nothing cached); the
warm one shares this machine's Python, uv and uv cache. The environment is this process's
(``environment="local"``), as for a user.

Bytes are counted by an HTTPS proxy on loopback that every VM's downloads go through (the
local cloud hands its VMs this machine's proxy variables): what left the package index for
the VMs, TLS included. Needs the package index (PyPI) to be reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dask_rawvm import RawVMCluster


class CountingProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 that counts the bytes coming back to its clients."""

    def __init__(self) -> None:
        self.received = 0  # bytes from the upstream servers to the VMs
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            method, target, _ = request.split("\r\n", 1)[0].split(" ", 2)
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(
                self._pipe(reader, up_writer, count=False),
                self._pipe(up_reader, writer, count=True),
            )
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: bool
    ) -> None:
        try:
            while data := await source.read(1 << 16):
                if count:
                    self.received += len(data)
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


@contextmanager
def proxied(proxy: CountingProxy) -> Iterator[None]:
    """This process's proxy variables (which the local cloud hands its VMs) set to ``proxy``."""
    names = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
    saved = {name: os.environ.get(name) for name in (*names, "no_proxy", "NO_PROXY")}
    for name in names:
        os.environ[name] = f"http://127.0.0.1:{proxy.port}"
    # The local cloud, its S3 and the VMs' Dask connections stay direct.
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost,127.0.0.0/8"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cold_start(image: str, n: int, proxy: CountingProxy) -> tuple[float, int]:
    """Seconds to n workers connected, and bytes the VMs took from the index meanwhile."""
    before = proxy.received
    start = time.perf_counter()
    with RawVMCluster(n_workers=n, local_image=image, progress=False) as cluster:
        cluster.get_client().wait_for_workers(n, timeout=1800)
        elapsed = time.perf_counter() - start
    return elapsed, proxy.received - before


def line(label: str, value: str, note: str = "") -> None:
    print(f"{label:<52} {value:>14}  {note}".rstrip(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--images", nargs="+", default=["bare", "warm"])
    args = parser.parse_args()
    with CountingProxy() as proxy, proxied(proxy):
        # One untimed start first: the lock (resolved once here) and the client's caches are
        # warm for every figure, so they compare the VMs' boots, not the client's first run.
        cold_start("warm", 1, proxy)
        for n in args.sizes:
            results = {image: cold_start(image, n, proxy) for image in args.images}
            for image, (seconds, received) in results.items():
                line(f"N={n} {image}: to {n} workers connected", f"{seconds:.1f} s")
                per_vm = received / (n + 1) / 2**20  # n workers and the scheduler VM
                line(
                    f"N={n} {image}: index bytes to the VMs",
                    f"{received / 2**20:.1f} MiB",
                    f"{per_vm:.1f} MiB per VM ({n} workers + the scheduler VM)",
                )
            if {"bare", "warm"} <= results.keys():
                ratio = results["bare"][0] / results["warm"][0]
                line(f"N={n}: bare / warm time", f"{ratio:.2f} x")


if __name__ == "__main__":
    main()
