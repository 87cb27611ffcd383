"""Package index settings of pip and uv (config files and environment variables)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from dask_rawvm.environment.readers import as_list, read_text
from dask_rawvm.environment.spec import IndexConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# --------------------------------------------------------------------------------------------
# Index configuration (pip and uv)
# --------------------------------------------------------------------------------------------


def read_index_config(
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    prefix: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> IndexConfig:
    """Read private index settings from pip and uv configuration.

    pip: ``pip.conf`` files (global, user, environment, ``PIP_CONFIG_FILE``) then
    ``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``, ``PIP_FIND_LINKS``. uv: ``uv.toml`` (system,
    user, project) then ``UV_DEFAULT_INDEX``/``UV_INDEX_URL``, ``UV_INDEX``/``UV_EXTRA_INDEX_URL``,
    ``UV_FIND_LINKS``. Later sources override the default index; extra locations add up.

    Parameters
    ----------
    environ : mapping, optional
        Environment variables (default ``os.environ``).
    cwd, prefix, home : path-like, optional
        Project directory (for ``uv.toml``), environment prefix (for its ``pip.conf``) and home
        directory (default: the current ones).

    Returns
    -------
    IndexConfig
    """
    env = os.environ if environ is None else environ
    home_dir = Path(home) if home is not None else Path.home()
    config = IndexConfig()
    for layer in (
        *_pip_files(env, home_dir, Path(prefix) if prefix else Path(sys.prefix)),
        _pip_env(env),
        *_uv_files(env, home_dir, Path(cwd) if cwd else Path.cwd()),
        _uv_env(env),
    ):
        config = config.merged(layer)
    return config


def _pip_files(env: Mapping[str, str], home: Path, prefix: Path) -> list[IndexConfig]:
    import configparser

    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    files = [
        Path("/etc/xdg/pip/pip.conf"),
        Path("/etc/pip.conf"),
        home / ".pip" / "pip.conf",
        xdg / "pip" / "pip.conf",
        prefix / "pip.conf",
    ]
    if env.get("PIP_CONFIG_FILE"):
        if env["PIP_CONFIG_FILE"] == os.devnull:
            return []
        files.append(Path(env["PIP_CONFIG_FILE"]))
    layers = []
    for file in files:
        if not file.is_file():
            continue
        parser = configparser.RawConfigParser()
        try:
            parser.read(file, encoding="utf-8")
        except configparser.Error:
            continue
        values: dict[str, str] = {}
        for section in ("global", "install"):
            if parser.has_section(section):
                values.update(parser.items(section))
        layers.append(_pip_layer(values, str(file)))
    return layers


def _pip_layer(values: Mapping[str, str], source: str) -> IndexConfig:
    index = values.get("index-url") or values.get("index_url")
    extra = (values.get("extra-index-url") or values.get("extra_index_url") or "").split()
    links = (values.get("find-links") or values.get("find_links") or "").split()
    no_index = str(values.get("no-index", "")).lower() in ("1", "true", "yes", "on")
    if not (index or extra or links or no_index):
        return IndexConfig()
    return IndexConfig(index, tuple(extra), tuple(links), no_index, (source,), best_match=True)


def _pip_env(env: Mapping[str, str]) -> IndexConfig:
    values = {
        "index-url": env.get("PIP_INDEX_URL", ""),
        "extra-index-url": env.get("PIP_EXTRA_INDEX_URL", ""),
        "find-links": env.get("PIP_FIND_LINKS", ""),
        "no-index": env.get("PIP_NO_INDEX", ""),
    }
    names = [k for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS") if env.get(k)]
    return _pip_layer(values, ",".join(names))


def _uv_files(env: Mapping[str, str], home: Path, cwd: Path) -> list[IndexConfig]:
    if env.get("UV_NO_CONFIG"):
        return []
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    files = [Path("/etc/uv/uv.toml"), xdg / "uv" / "uv.toml"]
    if env.get("UV_CONFIG_FILE"):
        files = [Path(env["UV_CONFIG_FILE"])]
    else:
        project = _find_project_config(cwd)
        if project is not None:
            files.append(project)
    layers = []
    for file in files:
        if not file.is_file():
            continue
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if file.name == "pyproject.toml":
            data = data.get("tool", {}).get("uv", {})
        layers.append(_uv_layer(data, str(file)))
    return layers


def _find_project_config(cwd: Path) -> Path | None:
    # uv uses the nearest uv.toml, else the nearest pyproject.toml with a [tool.uv] table.
    for directory in (cwd, *cwd.parents):
        if (directory / "uv.toml").is_file():
            return directory / "uv.toml"
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and "[tool.uv" in read_text(pyproject):
            return pyproject
    return None


def _uv_layer(data: Mapping[str, object], source: str) -> IndexConfig:
    pip = data.get("pip")
    merged: dict[str, object] = dict(data)
    if isinstance(pip, dict):
        merged.update(pip)
    index = merged.get("index-url")
    extra = [str(x) for x in as_list(merged.get("extra-index-url"))]
    for entry in as_list(merged.get("index")):
        if isinstance(entry, dict) and entry.get("url"):
            if entry.get("default"):
                index = entry["url"]
            elif not entry.get("explicit"):
                extra.append(str(entry["url"]))
    links = tuple(str(x) for x in as_list(merged.get("find-links")))
    no_index = bool(merged.get("no-index"))
    if not (index or extra or links or no_index):
        return IndexConfig()
    return IndexConfig(str(index) if index else None, tuple(extra), links, no_index, (source,))


def _uv_env(env: Mapping[str, str]) -> IndexConfig:
    index = env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL") or None
    extra = env.get("UV_INDEX", "").split() + env.get("UV_EXTRA_INDEX_URL", "").split()
    # UV_INDEX entries may be named: "name=https://..."
    extra = [e.split("=", 1)[1] if re.match(r"^[\w.-]+=", e) else e for e in extra]
    links = [x for x in re.split(r"[\s,]+", env.get("UV_FIND_LINKS", "")) if x]
    no_index = env.get("UV_NO_INDEX", "").lower() in ("1", "true", "yes")
    names = [
        k
        for k in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_INDEX", "UV_EXTRA_INDEX_URL")
        if env.get(k)
    ]
    if not (index or extra or links or no_index):
        return IndexConfig()
    return IndexConfig(index, tuple(extra), tuple(links), no_index, (",".join(names),))


