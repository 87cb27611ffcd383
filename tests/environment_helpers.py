"""Shared helpers for the environment tests: a local package index built from tiny wheels."""

from __future__ import annotations

import functools
import http.server
import io
import os
import socket
import tarfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dask_rawvm.environment import write_wheel

X86 = "cp311-cp311-manylinux_2_28_x86_64"
ARM = "cp311-cp311-manylinux_2_28_aarch64"


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No pip/uv configuration of this machine; caches under tmp_path. Returns the cache root."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("UV_NO_CONFIG", "1")
    for name in list(os.environ):
        if name.startswith(
            (
                "PIP_INDEX",
                "PIP_EXTRA",
                "PIP_FIND",
                "UV_INDEX",
                "UV_EXTRA",
                "UV_DEFAULT_INDEX",
                "UV_FIND_LINKS",
                "UV_NO_INDEX",
            )
        ):
            monkeypatch.delenv(name)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DASK_RAWVM_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def pure(index: Path, name: str, version: str = "1.0", requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel whose package defines ``VERSION``."""
    module = name.replace("-", "_")
    files = {f"{module}/__init__.py": f"VERSION = {version!r}\n".encode()}
    return write_wheel(index, name, version, files, requires=requires)


def platform_wheel(index: Path, name: str, tag: str, version: str = "1.0") -> Path:
    """A (fake) compiled wheel: the tag is what the resolver and the checks look at."""
    module = name.replace("-", "_")
    files = {f"{module}/__init__.py": f"TAG = {tag!r}\n".encode()}
    return write_wheel(index, name, version, files, tag=tag)


def make_index(root: Path) -> Path:
    """The local index used by the lock tests (``--no-index --find-links``).

    - ``app 1.0``: pure, needs ``fastlib`` and, on x86_64 only, ``x86dep``
    - ``fastlib 1.0``: x86_64 and aarch64 wheels; ``x86only 1.0``, ``x86dep 1.0``: x86_64 only
    - ``helper 1.0`` and ``2.0``: pure; ``puresrc 1.0``: source only, pure Python
    - ``compiledsrc 1.0``: source only, builds a platform wheel
    - ``onnxruntime-gpu 1.0``, ``onnxruntime 1.0``: pure stand-ins for the CUDA/CPU builds
    """
    index = root / "index"
    index.mkdir(parents=True)
    pure(index, "app", requires=("fastlib==1.0", "x86dep==1.0; platform_machine=='x86_64'"))
    platform_wheel(index, "fastlib", X86)
    platform_wheel(index, "fastlib", ARM)
    platform_wheel(index, "x86only", X86)
    platform_wheel(index, "x86dep", X86)
    pure(index, "helper", "1.0")
    pure(index, "helper", "2.0")
    pure(index, "onnxruntime")
    pure(index, "onnxruntime-gpu")
    sdist(index, "puresrc", "1.0", compiled=False)
    sdist(index, "compiledsrc", "1.0", compiled=True)
    return index


_BACKEND = '''
"""In-tree PEP 517 backend for tests: no build dependencies, so no index is needed."""
import base64, hashlib, os, zipfile

NAME, VERSION, TAG = {name!r}, {version!r}, {tag!r}


def _b64(data):
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(directory):
    info = f"{{NAME}}-{{VERSION}}.dist-info"
    files = {{}}
    for root, _, names in os.walk(NAME):
        for n in sorted(names):
            if not n.endswith(".pyc"):
                path = os.path.join(root, n)
                files[path.replace(os.sep, "/")] = open(path, "rb").read()
    meta = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"
    files[f"{{info}}/METADATA"] = meta.encode()
    purelib = "true" if TAG.endswith("none-any") else "false"
    wheel = f"Wheel-Version: 1.0\\nRoot-Is-Purelib: {{purelib}}\\nTag: {{TAG}}\\n"
    files[f"{{info}}/WHEEL"] = wheel.encode()
    record = [f"{{p}},sha256={{_b64(d)}},{{len(d)}}" for p, d in files.items()]
    files[f"{{info}}/RECORD"] = ("\\n".join(record + [f"{{info}}/RECORD,,"]) + "\\n").encode()
    name = f"{{NAME}}-{{VERSION}}-{{TAG}}.whl"
    with zipfile.ZipFile(os.path.join(directory, name), "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory)


def build_sdist(sdist_directory, config_settings=None):
    raise NotImplementedError
'''


def project(
    root: Path,
    name: str,
    version: str = "1.0",
    tag: str = "py3-none-any",
    dependencies: tuple[str, ...] = (),
) -> Path:
    """A local project directory with an in-tree backend producing a wheel tagged ``tag``."""
    directory = root / name
    (directory / name).mkdir(parents=True)
    (directory / name / "__init__.py").write_text(f"VERSION = {version!r}\n")
    if not tag.endswith("none-any"):
        (directory / name / "_native.so").write_bytes(b"\x7fELF fake")
    deps = ", ".join(repr(d).replace("'", '"') for d in dependencies)
    (directory / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = []
            build-backend = "backend"
            backend-path = ["."]

            [project]
            name = "{name}"
            version = "{version}"
            dependencies = [{deps}]
            """
        )
    )
    (directory / "backend.py").write_text(_BACKEND.format(name=name, version=version, tag=tag))
    return directory


def sdist(index: Path, name: str, version: str, compiled: bool) -> Path:
    """A source distribution built by the in-tree backend (pure or 'compiled')."""
    tag = "cp311-cp311-linux_x86_64" if compiled else "py3-none-any"
    staging = index.parent / f"sdist-{name}"
    directory = project(staging, name, version, tag)
    (directory / "PKG-INFO").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    out = index / f"{name}-{version}.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=f"{name}-{version}")
    out.write_bytes(buffer.getvalue())
    return out


def local_index_lines(index: Path) -> list[str]:
    """Requirement-list lines that resolve against ``index`` only."""
    return ["--no-index", f"--find-links {index}"]


def pypi_reachable() -> bool:
    """True when pypi.org answers a TCP connect within 3 s."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


network = pytest.mark.network
needs_pypi = pytest.mark.skipif(not pypi_reachable(), reason="pypi.org is not reachable")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served on loopback as a find-links page: an index a VM could reach."""
    root = tmp_path / "remote"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
