"""The machine an environment is built for: architecture, accelerator, Python and glibc."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from packaging import tags
from packaging.utils import parse_wheel_filename

Arch = Literal["x86_64", "aarch64"]
Accelerator = Literal["cpu", "cuda"]

#: glibc versions uv accepts in ``--python-platform`` (``manylinux_2_17`` .. ``manylinux_2_40``).
_UV_GLIBC_MIN = (2, 17)
_UV_GLIBC_MAX = (2, 40)
#: CUDA major used when a CUDA target does not name one: the current PyPI default.
DEFAULT_CUDA_MAJOR = 12

_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


@dataclass(frozen=True)
class Target:
    """The platform a worker VM runs: what the lock resolves for.

    Parameters
    ----------
    arch : {"x86_64", "aarch64"}
        CPU architecture of the VM.
    accelerator : {"cpu", "cuda"}
        Whether the VM has an NVIDIA GPU.
    cuda_major : int, optional
        CUDA major version for ``accelerator="cuda"`` (default 12); must be None for CPU.
    python_version : str
        ``"X.Y"`` of the VM's interpreter.
    glibc : str
        ``"X.Y"`` glibc of the VM image (Amazon Linux 2023 ships 2.34); wheels tagged
        ``manylinux_X_Y`` up to this version are acceptable.
    """

    arch: Arch = "x86_64"
    accelerator: Accelerator = "cpu"
    cuda_major: int | None = None
    python_version: str = "3.11"
    glibc: str = "2.34"

    def __post_init__(self) -> None:
        arch = _ARCH_ALIASES.get(str(self.arch).lower())
        if arch is None:
            raise ValueError(f"unsupported arch {self.arch!r}: use 'x86_64' or 'aarch64'")
        object.__setattr__(self, "arch", arch)
        if self.accelerator not in ("cpu", "cuda"):
            raise ValueError(f"unsupported accelerator {self.accelerator!r}: use 'cpu' or 'cuda'")
        if self.accelerator == "cuda" and self.cuda_major is None:
            object.__setattr__(self, "cuda_major", DEFAULT_CUDA_MAJOR)
        if self.accelerator == "cpu" and self.cuda_major is not None:
            raise ValueError("cuda_major is only meaningful with accelerator='cuda'")
        _parse_version_pair(self.python_version, "python_version")
        _parse_version_pair(self.glibc, "glibc")

    @property
    def manylinux_tag(self) -> str:
        """The manylinux platform tag for this glibc, clamped to what uv knows.

        Returns
        -------
        str
            For example ``"manylinux_2_34_aarch64"``.
        """
        major, minor = _parse_version_pair(self.glibc, "glibc")
        major, minor = max(_UV_GLIBC_MIN, min(_UV_GLIBC_MAX, (major, minor)))
        return f"manylinux_{major}_{minor}_{self.arch}"

    @property
    def python_platform(self) -> str:
        """The value for ``uv pip compile --python-platform``, e.g. ``x86_64-manylinux_2_28``."""
        major_minor = self.manylinux_tag.removeprefix("manylinux_").removesuffix(f"_{self.arch}")
        return f"{self.arch}-manylinux_{major_minor}"

    @property
    def python_tag(self) -> str:
        """The CPython wheel tag, e.g. ``cp311``."""
        return "cp" + self.python_version.replace(".", "")

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker values on the VM, to evaluate requirement markers for the target.

        Returns
        -------
        dict of str to str
            Keys as accepted by ``packaging.markers.Marker.evaluate``.
        """
        return {
            "implementation_name": "cpython",
            "implementation_version": self.python_version + ".0",
            "os_name": "posix",
            "platform_machine": self.arch,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": self.python_version + ".0",
            "python_version": self.python_version,
            "sys_platform": "linux",
        }

    def describe(self) -> str:
        """A short human description, e.g. ``aarch64 cuda12 py3.11 glibc2.34``."""
        acc = f"cuda{self.cuda_major}" if self.accelerator == "cuda" else "cpu"
        return f"{self.arch} {acc} py{self.python_version} glibc{self.glibc}"

    def as_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict (used in cache keys and manifests)."""
        return asdict(self)

    @classmethod
    def local(cls) -> Target:
        """The platform of this machine (where the client runs).

        Returns
        -------
        Target
            Architecture, running Python, glibc, and CUDA if an NVIDIA driver is loaded.
        """
        arch = _ARCH_ALIASES.get(platform.machine().lower(), "x86_64")
        libc, version = platform.libc_ver()
        glibc = version if libc == "glibc" and version else "2.34"
        cuda = _local_cuda_major()
        return cls(
            arch=arch,  # type: ignore[arg-type]
            accelerator="cuda" if cuda is not None else "cpu",
            cuda_major=cuda,
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
            glibc=".".join(glibc.split(".")[:2]),
        )

    def same_platform(self, other: Target) -> bool:
        """True when wheels built for ``other`` install here (arch, accelerator, Python)."""
        return (self.arch, self.accelerator, self.cuda_major, self.python_version) == (
            other.arch,
            other.accelerator,
            other.cuda_major,
            other.python_version,
        )


def _parse_version_pair(value: str, what: str) -> tuple[int, int]:
    parts = str(value).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"{what} must look like 'X.Y', got {value!r}") from None


def _local_cuda_major() -> int | None:
    # A loaded NVIDIA kernel driver is the cheap signal that this host has a usable GPU;
    # nvidia-smi would cost ~100 ms. The CUDA major defaults to PyPI's current one.
    if not os.path.exists("/proc/driver/nvidia/version"):
        return None
    version = os.environ.get("CUDA_VERSION", "")
    try:
        return int(version.split(".")[0])
    except ValueError:
        return DEFAULT_CUDA_MAJOR


def target_tags(target: Target) -> set[tags.Tag]:
    """Every wheel tag the target's interpreter accepts (as pip would compute it there)."""
    major, minor = (int(x) for x in target.glibc.split("."))
    arch = target.arch
    platforms = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, -1, -1)]
    legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
    platforms += [f"{name}_{arch}" for name, m in legacy.items() if minor >= m]
    platforms.append(f"linux_{arch}")
    version = tuple(int(x) for x in target.python_version.split("."))
    result = set(tags.cpython_tags(version, platforms=platforms))
    result |= set(tags.compatible_tags(version, target.python_tag, platforms=platforms))
    return result


def wheel_fits_target(wheel: str | os.PathLike[str], target: Target) -> bool:
    """True when the wheel (by its file name's tags) installs on the target."""
    _, _, _, wheel_tags = parse_wheel_filename(Path(wheel).name)
    return not wheel_tags.isdisjoint(target_tags(target))
