"""Is the VMs' environment the one of this process? Distribution by distribution, after translation.

distributed compares a handful of packages and warns ("Mismatched versions found"); a task
that imports a package the workers lack fails only when it runs, with distributed's generic
"Scheduler and Client have different environments". Here every distribution of the client
is compared with what a VM has, against what translation said it should have there
(``torch 2.13.0+cpu`` here is ``torch 2.13.0`` on a CUDA VM; a package left out by
``environment_ignore`` should be missing). A difference in a package this process has
imported is an error naming each package, its two versions and the fix; other differences
are one warning.

:func:`installed_versions` runs on the VMs (``client.run``): it imports nothing beyond the
standard library.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata

from packaging.utils import canonicalize_name

from dask_rawvm.environment.translate import Expected

#: Installers a process may import without any task needing them on a VM (pip's and
#: setuptools' modules load with build and packaging tools): a difference is a warning.
INSTALLER_TOOLS = frozenset({"pip", "setuptools", "wheel", "uv"})


def installed_versions() -> dict[str, str]:
    """Canonical name -> version of every distribution importable in this process."""
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(canonicalize_name(name), dist.version)
    return versions


def imported_distributions(
    modules: Iterable[str] | None = None,
    providers: Mapping[str, list[str]] | None = None,
) -> set[str]:
    """Distributions whose top-level modules this process has imported.

    ``providers`` is :func:`importlib.metadata.packages_distributions` (read when not given:
    0.26 s of CPU in a data-science environment, measured).
    """
    top = {m.partition(".")[0] for m in (sys.modules if modules is None else modules)}
    if providers is None:
        providers = metadata.packages_distributions()
    return {canonicalize_name(d) for m in top for d in providers.get(m, ())}


@dataclass(frozen=True)
class Difference:
    """One distribution that is not on a VM as this process has it."""

    package: str
    here: str
    there: str  # the version on the VM, or "missing"
    where: str  # "the scheduler VM", "worker worker-0"
    imported: bool
    note: str = ""  # what translation said the VM should have, when not what is here

    def line(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.package}: {self.here} here, {self.there} on {self.where}{note}"


@dataclass
class FidelityReport:
    """What differs between this process and the VMs checked."""

    differences: list[Difference] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # by design: name -> why

    @property
    def errors(self) -> list[Difference]:
        """Differences in packages this process has imported."""
        return [d for d in self.differences if d.imported]

    @property
    def warnings(self) -> list[Difference]:
        return [d for d in self.differences if not d.imported]

    def error_message(self) -> str:
        lines = [
            "The VMs' environment differs from this one in packages this process has imported; "
            "tasks using them would fail or behave differently there:"
        ]
        lines += [f"  - {d.line()}" for d in self.errors]
        lines.append(
            "Fix: install the same versions on the VMs (drop them from environment_ignore, or "
            "add them to environment=), check `dask-rawvm env` for the decisions, or pass "
            "environment_check='warn' to start anyway."
        )
        return "\n".join(lines)

    def warning_message(self) -> str:
        shown = ", ".join(d.line() for d in self.warnings[:10])
        more = f" and {len(self.warnings) - 10} more" if len(self.warnings) > 10 else ""
        return (
            f"{len(self.warnings)} distribution(s) differ on the VMs (none imported here): "
            f"{shown}{more}"
        )


def compare(
    here: Mapping[str, str],
    there: Mapping[str, str],
    expected: Mapping[str, Expected],
    where: str,
    imported: Iterable[str] = (),
    exempt: Iterable[str] = (),
) -> FidelityReport:
    """Compare this process's distributions with a VM's.

    Parameters
    ----------
    here, there
        Canonical name -> version, here and on the VM (:func:`installed_versions`).
    expected
        Per distribution here, what the VM should have after translation
        (``Translation.expected_versions``); one missing from it is expected as it is here.
    where
        The VM, for messages ("worker worker-0").
    imported
        Distributions this process has imported (:func:`imported_distributions`).
    exempt
        Distributions not compared (dask-rawvm's client side, say).

    Returns
    -------
    FidelityReport
        A package left out by a translation rule (Windows-only, dask-rawvm's client side) is
        not a difference. One left out by ``environment_ignore`` is, when imported here: the
        user's code will look for it on the VMs.
    """
    imported = set(imported)
    skip = set(exempt)
    report = FidelityReport()
    for name, version in sorted(here.items()):
        if name in skip:
            continue
        wanted = expected.get(name) or Expected(name, version)
        if not wanted.present:
            report.left_out[name] = wanted.reason
            if wanted.ignored and name in imported and name not in there:
                report.differences.append(
                    Difference(name, version, "missing", where, True, wanted.reason)
                )
            continue
        actual = there.get(wanted.name)
        translated = (wanted.name, wanted.version) != (name, version)
        note = f"expected {wanted.name} {wanted.version or ''}".rstrip() if translated else ""
        relevant = name in imported and name not in INSTALLER_TOOLS
        if actual is None:
            if not wanted.optional:
                report.differences.append(
                    Difference(name, version, "missing", where, relevant, note)
                )
        elif wanted.version is not None and actual != wanted.version:
            there_text = actual if wanted.name == name else f"{wanted.name} {actual}"
            report.differences.append(Difference(name, version, there_text, where, relevant, note))
    return report
