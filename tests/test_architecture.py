"""The shape of the package, held over its import graph (``ast``, every import statement,
function-level ones included): no import circle, no lower layer importing a higher one,
``cluster.py`` knowing no cloud, and the scheduler preload light enough for a VM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dask_rawvm
from dask_rawvm.config import PROVIDERS as PROVIDER_SECTIONS
from dask_rawvm.config import resolve_options
from dask_rawvm.providers import PROVIDERS, provider_for

PACKAGE = Path(dask_rawvm.__file__).parent

#: group -> layer, bottom (0) to top. A module may import from a lower layer or its own group.
LAYERS = {
    "neutral": 0,
    "environment": 1,
    "localcloud": 1,
    "providers": 2,
    "machines": 3,
    "cluster": 4,
    "commands": 5,
    "package": 6,
}
#: Top-level modules outside the packages of a layer, by group: a new one is placed here.
MODULES = {
    "dask_rawvm.errors": "neutral",
    "dask_rawvm.backoff": "neutral",
    "dask_rawvm.needs": "neutral",
    "dask_rawvm.config": "neutral",
    "dask_rawvm.tls": "neutral",
    "dask_rawvm.cost": "neutral",
    "dask_rawvm.progress": "neutral",
    "dask_rawvm.idle_shutdown": "neutral",
    "dask_rawvm.bulk_retire": "neutral",
    "dask_rawvm.cluster_log": "neutral",
    "dask_rawvm.log_guard": "neutral",
    "dask_rawvm.data": "neutral",
    "dask_rawvm.cluster": "cluster",
    "dask_rawvm.card": "cluster",
    "dask_rawvm.cli": "commands",
    "dask_rawvm.demo": "commands",
    "dask_rawvm": "package",
}
PACKAGES = {"environment", "localcloud", "providers", "machines"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def group(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in PACKAGES:
        return parts[1]
    if module not in MODULES:
        raise AssertionError(f"{module} is in no layer: place it in MODULES (and the docs)")
    return MODULES[module]


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports."""
    sources = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    anchor = module.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from package import module`` imports the module; else the package.
                names = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base
                    for a in node.names
                ]
            else:
                continue
            targets.update(n for n in names if n in sources and n != module)
        graph[module] = targets
    return graph


def import_circles() -> list[list[str]]:
    """Every import circle a depth-first walk meets (one per back edge)."""
    graph = import_graph()
    circles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            circles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    return circles


def test_there_is_no_import_circle() -> None:
    circles = import_circles()
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_layer_imports_a_higher_one() -> None:
    wrong = [
        f"{source} ({group(source)}) imports {target} ({group(target)})"
        for source, targets in import_graph().items()
        for target in sorted(targets)
        if group(source) != group(target) and LAYERS[group(target)] >= LAYERS[group(source)]
    ]
    assert wrong == []


def test_the_cluster_knows_dask_not_clouds() -> None:
    tree = ast.parse((PACKAGE / "cluster.py").read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    clouds = ("botocore", "aiobotocore", "boto3", "moto", "asyncssh", "dask_rawvm.localcloud")
    implementations = ("dask_rawvm.providers.", "dask_rawvm.machines.")
    assert [m for m in imported if m.startswith(clouds)] == []
    # The registry and the interface only: no provider implementation.
    assert [m for m in imported if m.startswith(implementations)] == []
    assert "dask_rawvm.providers" in imported


def test_the_scheduler_preloads_import_no_cloud_and_no_cluster() -> None:
    """What runs on the scheduler VM loads distributed, not the client's machinery."""
    heavy = ["moto", "botocore", "aiobotocore", "asyncssh", "dask_rawvm.localcloud",
             "dask_rawvm.cluster", "dask_rawvm.providers", "dask_rawvm.machines"]  # fmt: skip
    code = (
        "import sys, dask_rawvm.idle_shutdown, dask_rawvm.bulk_retire, dask_rawvm.data\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_public_names_still_import_from_the_top() -> None:
    from dask_rawvm import LocalCloud, ProviderError, RawVMCluster, RawVMError

    assert issubclass(ProviderError, RawVMError) and issubclass(ProviderError, RuntimeError)
    assert RawVMCluster.__module__ == "dask_rawvm.cluster"
    assert LocalCloud.__module__ == "dask_rawvm.localcloud.server"
    with pytest.raises(AttributeError):
        dask_rawvm.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_every_provider_builds_itself_from_the_options(name: str) -> None:
    provider = provider_for(resolve_options(provider=name), "c")
    assert type(provider) is PROVIDERS[name]
    assert not getattr(type(provider), "__abstractmethods__", None)


def test_each_provider_section_has_a_provider_class() -> None:
    assert sorted(PROVIDER_SECTIONS) == sorted(PROVIDERS)
