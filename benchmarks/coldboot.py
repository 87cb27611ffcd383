"""Cold boot: from ``RawVMCluster(n_workers=N)`` to N workers connected, on a cold cloud.

    python benchmarks/coldboot.py [--sizes 1 4 8] [--images bare]

Figures, one line each: seconds from the cluster's creation to N workers connected, this
machine's busy CPU seconds meanwhile (every VM here shares its cores), and the bytes the VMs
downloaded from the package index (in total and per VM), for each image and N;
then the ratios of the largest N to the smallest (targets: time within 1.5x, index bytes
within 1.1x), and a second cluster of the same environment on the cloud of the largest N
(target: nothing from the index). Each N gets a fresh local cloud, so a fresh account whose
artifact store is empty: one VM builds the environment, the others wait for its artifact.
The bare image is what a fresh Amazon Linux 2023 VM has (no uv, no pip, nothing cached); the
warm one shares this machine's Python, uv and uv cache. The environment is this process's
(``environment="local"``), as for a user.

Bytes are counted by an HTTPS proxy on loopback that every VM's downloads go through (the
local cloud hands its VMs this machine's proxy variables): what left the package index for
the VMs, TLS included. The proxy is a process of its own, so that the cluster's work in this
one never stalls a download (a proxy thread here let uv's reads time out at N = 4). Needs
the package index (PyPI) to be reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.sharedctypes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dask_rawvm import RawVMCluster
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud

#: Bytes read from a socket at once: a wheel streams in a few hundred reads, not thousands.
CHUNK = 1 << 18


async def _pipe(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, counter: Any | None
) -> None:
    """Copy until end of stream, then half-close: the other direction keeps flowing."""
    try:
        while data := await source.read(CHUNK):
            if counter is not None:
                with counter.get_lock():
                    counter.value += len(data)
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        sink.close()


async def _tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Any) -> None:
    up_writer = None
    try:
        request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, target, _ = request.split("\r\n", 1)[0].split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 60)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, up_writer, None), _pipe(up_reader, writer, counter))
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
        pass
    finally:
        writer.close()
        if up_writer is not None:
            up_writer.close()


def _serve_proxy(counter: Any, port: Any, ready: Any) -> None:
    """The proxy process: serve CONNECT tunnels on 127.0.0.1 until killed."""

    async def serve() -> None:
        server = await asyncio.start_server(
            lambda r, w: _tunnel(r, w, counter), "127.0.0.1", 0, backlog=1024
        )
        port.value = server.sockets[0].getsockname()[1]
        ready.set()
        await server.serve_forever()

    asyncio.run(serve())


class CountingProxy:
    """An HTTP CONNECT proxy on 127.0.0.1, in a process of its own, that counts the bytes
    coming back to its clients."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._counter = context.Value("q", 0)
        self._port = context.Value("i", 0)
        self._ready = context.Event()
        self._process = context.Process(
            target=_serve_proxy, args=(self._counter, self._port, self._ready), daemon=True
        )

    @property
    def received(self) -> int:
        """Bytes from the upstream servers to the VMs so far."""
        return int(self._counter.value)

    @property
    def port(self) -> int:
        return int(self._port.value)

    def __enter__(self) -> CountingProxy:
        self._process.start()
        if not self._ready.wait(30):
            raise RuntimeError("the counting proxy did not start within 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.kill()
        self._process.join(10)


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


def busy_cpu_seconds() -> float:
    """CPU seconds this machine's cores have spent busy since boot (``/proc/stat``: user,
    nice, system, irq, softirq, steal; not idle, not iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cold_start(
    image: str, n: int, proxy: CountingProxy, again: bool = False
) -> tuple[float, int, float, float, int]:
    """Seconds to n workers connected on a fresh cloud, the machine's busy CPU seconds and
    the bytes the VMs took from the index meanwhile; with ``again``, seconds and bytes for
    a second cluster of one worker on that cloud (zeros otherwise)."""
    with LocalCloud(image=image) as cloud:  # type: ignore[arg-type]
        on_cloud = {"endpoint_url": cloud.endpoint_url, "region": cloud.region}
        figures = []
        for workers in (n, 1) if again else (n,):
            before, busy = proxy.received, busy_cpu_seconds()
            start = time.perf_counter()
            with RawVMCluster(n_workers=workers, progress=False, **on_cloud) as cluster:
                cluster.get_client().wait_for_workers(workers, timeout=1800)
                seconds, busy = time.perf_counter() - start, busy_cpu_seconds() - busy
                figures.append((seconds, busy, proxy.received - before))
    (seconds, busy, received), *rest = figures
    again_seconds, _, again_received = rest[0] if rest else (0.0, 0.0, 0)
    return seconds, int(received), busy, again_seconds, int(again_received)


def line(label: str, value: str, note: str = "") -> None:
    print(f"{label:<52} {value:>14}  {note}".rstrip(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--images", nargs="+", default=["bare"])
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with CountingProxy() as proxy, proxied(proxy):
        # One untimed start first: the lock (resolved once here) and the client's caches are
        # warm for every figure, so they compare the VMs' boots, not the client's first run.
        cold_start("warm", 1, proxy)
        results: dict[tuple[str, int], tuple[float, int, float, float, int]] = {}
        cores = os.cpu_count() or 1
        for n in args.sizes:
            for image in args.images:
                result = cold_start(image, n, proxy, again=n == max(args.sizes))
                results[image, n] = result
                seconds, received, busy = result[:3]
                line(f"N={n} {image}: to {n} workers connected", f"{seconds:.1f} s")
                # Every VM here shares this machine's cores (on a cloud each has its own):
                # near 100 %, the time to N is this machine's CPU, not the boot path's waits.
                line(
                    f"N={n} {image}: this machine's CPU busy meanwhile",
                    f"{busy:.0f} s",
                    f"{busy / (seconds * cores):.0%} of {cores} cores",
                )
                per_vm = received / (n + 1) / 2**20  # n workers and the scheduler VM
                line(
                    f"N={n} {image}: index bytes to the VMs",
                    f"{received / 2**20:.1f} MiB",
                    f"{per_vm:.1f} MiB per VM ({n} workers + the scheduler VM)",
                )
        small, large = min(args.sizes), max(args.sizes)
        for image in args.images:
            a, b = results[image, small], results[image, large]
            if large != small:
                line(
                    f"N={large} / N={small} {image}: time to connected",
                    f"{b[0] / a[0]:.2f} x",
                    "target <= 1.5",
                )
                line(
                    f"N={large} / N={small} {image}: index bytes",
                    f"{b[1] / max(a[1], 1):.2f} x",
                    "target <= 1.1",
                )
            line(f"second cluster {image} (1 worker): to connected", f"{b[3]:.1f} s")
            line(
                f"second cluster {image} (1 worker): index bytes",
                f"{b[4] / 2**20:.2f} MiB",
                "target: 0",
            )
        if {"bare", "warm"} <= set(args.images):
            for n in args.sizes:
                ratio = results["bare", n][0] / results["warm", n][0]
                line(f"N={n}: bare / warm time", f"{ratio:.2f} x")


if __name__ == "__main__":
    main()
