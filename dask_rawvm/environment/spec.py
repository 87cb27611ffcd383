"""The environment as data: packages, local code, index settings; independent of any target."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from dask_rawvm.errors import RawVMError

Source = Literal["index", "vcs", "url", "conda"]
LocalKind = Literal["project", "modules", "wheel", "agent"]

#: dask-rawvm's own distribution. Its VM-side code ships as a wheel of its own files with no
#: dependencies: what the VMs need of it (dask, distributed, bokeh) is in the environment, and
#: its client side (the local cloud's moto tree, the CLI) is not shipped.
AGENT = "dask-rawvm"


class EnvironmentSpecError(RawVMError, ValueError):
    """The ``environment=`` argument or a lock file it names cannot be read."""


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagePin:
    """One package of the source environment, fetched from an index or a URL on the VM.

    Parameters
    ----------
    name : str
        Canonical (PEP 503) PyPI name.
    specifier : str
        Version specifier, ``"==1.2.3"`` for pins, ``""`` for "any version".
    source : {"index", "vcs", "url", "conda"}
        Where it came from: a package index, a VCS commit, an archive URL, or a conda package
        that has a PyPI counterpart under ``name``.
    root : bool
        The user asked for it, or nothing else installed needs it (False: only there as another
        package's dependency). From an installed environment every pin is installed on the VMs
        (see :attr:`EnvironmentSpec.complete`); a dependency that cannot exist on the target
        is then left to the resolver (same version if the target needs it). From a lock file,
        dependencies are constraints: same version if needed, dropped if not.
    extras, marker, url
        The rest of the PEP 508 requirement.
    conda_name : str, optional
        The conda package name when ``source == "conda"`` (or installed by conda).
    python : bool
        False for a conda package that holds no Python code (a C library, a binary).
    """

    name: str
    specifier: str = ""
    source: Source = "index"
    root: bool = True
    extras: tuple[str, ...] = ()
    marker: str | None = None
    url: str | None = None
    conda_name: str | None = None
    python: bool = True

    @property
    def version(self) -> str | None:
        """The exact version for a ``==`` pin, else None."""
        match = re.fullmatch(r"===?\s*([^,;\s]+)", self.specifier.strip())
        return match.group(1) if match else None

    def requirement(self, *, with_marker: bool = True) -> str:
        """The PEP 508 requirement string, e.g. ``jax[cuda12]==0.4.30``."""
        extras = f"[{','.join(sorted(self.extras))}]" if self.extras else ""
        text = (
            f"{self.name}{extras} @ {self.url}"
            if self.url
            else (f"{self.name}{extras}{self.specifier}")
        )
        if with_marker and self.marker:
            text += f" ; {self.marker}"
        return text


@dataclass(frozen=True)
class LocalCode:
    """Code that exists only on this machine and is shipped to the VM as a wheel.

    Parameters
    ----------
    name : str
        Distribution name (canonical); generated (``rawvm-local-<dir>``) for loose modules.
    path : str
        Project directory (``kind="project"``), directory holding the modules
        (``kind="modules"``), or wheel file (``kind="wheel"``).
    kind : {"project", "modules", "wheel", "agent"}
        How the wheel is made: built from a project, generated from loose modules, as is, or
        (``"agent"``) dask-rawvm's own package files, without dependencies.
    modules : tuple of str
        For ``kind="modules"`` and ``"agent"``: the top-level ``.py`` files and packages shipped.
    version : str, optional
        Installed version (the wheel's version for ``"agent"``), for display.
    editable : bool
        Installed in editable mode here.
    """

    name: str
    path: str
    kind: LocalKind = "project"
    modules: tuple[str, ...] = ()
    version: str | None = None
    editable: bool = False


@dataclass(frozen=True)
class IndexConfig:
    """Package indexes the user's tools are configured with.

    Parameters
    ----------
    index_url : str, optional
        The default index (None: PyPI).
    extra_index_urls, find_links : tuple of str
        Additional indexes and find-links locations.
    no_index : bool
        Only ``find_links`` are used.
    sources : tuple of str
        Where each setting came from (file paths and variable names), for the report.
    best_match : bool
        Pick each version from whichever index has it, as pip does (set when the indexes come
        from pip's configuration: the environment was installed that way). uv's default only
        looks at the first index holding a package, a defence against dependency confusion.
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    sources: tuple[str, ...] = ()
    best_match: bool = False

    def uv_args(self) -> list[str]:
        """Command-line options for ``uv pip compile|sync|install``."""
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        elif self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls if not self.no_index else ():
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        if self.best_match and self.extra_index_urls and not self.no_index:
            args += ["--index-strategy", "unsafe-best-match"]
        return args

    def remote(self) -> IndexConfig:
        """What a VM can use of this configuration: the ``http(s)`` indexes and find-links.

        ``file://`` indexes and find-links paths name this machine's disk, which no VM can
        read: packages only they hold travel in the bundle instead (see
        :func:`~dask_rawvm.environment.lock.lock_environment`). A local default index means
        the VMs get no default index (``no_index``) rather than PyPI, which the user did not
        choose.
        """
        default_local = bool(self.index_url) and is_local_location(self.index_url or "")
        return IndexConfig(
            index_url=None if default_local else self.index_url,
            extra_index_urls=tuple(u for u in self.extra_index_urls if not is_local_location(u)),
            find_links=tuple(u for u in self.find_links if not is_local_location(u)),
            no_index=self.no_index or default_local,
            sources=self.sources,
            best_match=self.best_match,
        )

    def local_locations(self) -> list[str]:
        """The indexes and find-links of this configuration that are paths on this machine."""
        urls = [self.index_url or "", *self.extra_index_urls, *self.find_links]
        return [u for u in urls if u and is_local_location(u)]

    def install_environment(self) -> dict[str, str]:
        """The uv environment variables a VM's install step runs with, credentials included.

        They reach the install step only (never user-data, never a file on the VM): the
        caller ships them as a secret and exports them for that one command.
        """
        variables: dict[str, str] = {}
        if self.no_index:
            variables["RAWVM_NO_INDEX"] = "1"  # uv has no variable for --no-index
        elif self.index_url:
            variables["UV_INDEX_URL"] = self.index_url
        if self.extra_index_urls and not self.no_index:
            variables["UV_EXTRA_INDEX_URL"] = " ".join(self.extra_index_urls)
        if self.find_links:
            variables["UV_FIND_LINKS"] = ",".join(self.find_links)
        if self.best_match and self.extra_index_urls and not self.no_index:
            variables["UV_INDEX_STRATEGY"] = "unsafe-best-match"
        return variables

    def redacted(self) -> dict[str, object]:
        """The configuration with passwords and tokens masked, safe to print or log."""
        return {
            "index_url": redact_url(self.index_url) if self.index_url else None,
            "extra_index_urls": [redact_url(u) for u in self.extra_index_urls],
            "find_links": [redact_url(u) for u in self.find_links],
            "no_index": self.no_index,
            "best_match": self.best_match,
            "sources": list(self.sources),
        }

    def cache_key(self) -> dict[str, object]:
        """What changes the resolution (the credentials too: they pick what is visible)."""
        return {
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
            "find_links": list(self.find_links),
            "no_index": self.no_index,
            "best_match": self.best_match,
        }

    def merged(self, other: IndexConfig) -> IndexConfig:
        """This configuration with ``other``'s default index (if any) and extra locations."""
        return IndexConfig(
            index_url=other.index_url or self.index_url,
            extra_index_urls=unique(self.extra_index_urls + other.extra_index_urls),
            find_links=unique(self.find_links + other.find_links),
            no_index=self.no_index or other.no_index,
            sources=unique(self.sources + other.sources),
            best_match=self.best_match or other.best_match,
        )


@dataclass(frozen=True)
class EnvironmentSpec:
    """The user's environment, independent of any target platform.

    Parameters
    ----------
    origin : str
        ``"local"``, ``"requirements"`` or the path of the lock file read.
    packages : tuple of PackagePin
        Packages to fetch from indexes or URLs, sorted by name.
    local_code : tuple of LocalCode
        Code to ship as wheels.
    index : IndexConfig
        Package indexes to resolve against.
    python_version : str, optional
        ``"X.Y"`` the environment was made with, when known.
    ignore : tuple of str
        Canonical names the user excluded (``environment_ignore``).
    notes : tuple of str
        What the inventory left out and why.
    conda_channels : tuple of str
        Channels of a conda environment or lock (not used for resolution: see translate).
    complete : bool
        Every package is to be installed on the VMs, dependencies included (the fidelity rule
        for an installed environment); False for lock files and lists, whose dependencies are
        constraints.
    client_side : tuple of PackagePin
        Distributions installed here only because dask-rawvm's client side needs them (the
        local cloud, the CLI): not shipped, and not expected on the VMs.
    """

    origin: str
    packages: tuple[PackagePin, ...] = ()
    local_code: tuple[LocalCode, ...] = ()
    index: IndexConfig = field(default_factory=IndexConfig)
    python_version: str | None = None
    ignore: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    conda_channels: tuple[str, ...] = ()
    complete: bool = False
    client_side: tuple[PackagePin, ...] = ()

    def names(self) -> set[str]:
        """Canonical names of every package and local distribution."""
        return {p.name for p in self.packages} | {c.name for c in self.local_code}




def is_local_location(url: str) -> bool:
    """True for a ``file:`` URL or a filesystem path: a location on this machine's disk."""
    return "://" not in url or url.startswith("file:")


def redact_url(url: str) -> str:
    """Mask the password (or token) of a URL, for display.

    Parameters
    ----------
    url : str
        For example ``https://user:secret@host/simple``.

    Returns
    -------
    str
        ``https://user:****@host/simple``; a lone token user (``https://TOKEN@host``) is masked
        too, since tokens are often passed that way.
    """
    parts = urlsplit(url)
    if not parts.netloc or "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, _password = userinfo.partition(":")
    masked = f"{user}:****" if sep else "****"
    return parts._replace(netloc=f"{masked}@{host}").geturl()


def unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


