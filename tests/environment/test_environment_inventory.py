"""Inventory: installed distributions, local code, conda, index config, lock files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from environment_helpers import isolated  # noqa: F401  (fixture)

from dask_rawvm.environment import (
    EnvironmentSpecError,
    inventory_environment,
    read_index_config,
    redact_url,
    resolve_environment_spec,
)
from dask_rawvm.environment.lockfiles import (
    parse_conda_lock,
    parse_requirement_lines,
    parse_requirements_file,
    parse_uv_lock,
)


def dist_info(
    site: Path,
    name: str,
    version: str,
    requires: tuple[str, ...] = (),
    direct_url: dict[str, object] | None = None,
) -> Path:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n\nLong description: Name: nope\n")
    (info / "INSTALLER").write_text("pip\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return info


def fake_env(root: Path) -> tuple[Path, Path]:
    prefix = root / "env"
    site = prefix / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    return prefix, site


def test_direct_url_kinds(tmp_path: Path) -> None:
    prefix, site = fake_env(tmp_path)
    project = tmp_path / "src" / "mylib"
    project.mkdir(parents=True)
    wheel = tmp_path / "wheels" / "localwheel-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK")
    dist_info(
        site,
        "mylib",
        "0.1",
        ("numpy>=1",),
        {"url": project.as_uri(), "dir_info": {"editable": True}},
    )
    dist_info(
        site,
        "vcslib",
        "2.0",
        (),
        {
            "url": "https://github.com/org/vcslib.git",
            "vcs_info": {"vcs": "git", "commit_id": "abc123", "requested_revision": "main"},
        },
    )
    dist_info(
        site,
        "archlib",
        "3.0",
        (),
        {"url": "https://example.com/archlib-3.0.tar.gz", "archive_info": {}},
    )
    dist_info(site, "localwheel", "1.0", (), {"url": wheel.as_uri(), "archive_info": {}})
    dist_info(
        site, "gone", "1.0", (), {"url": "file:///nowhere/gone-1.0.tar.gz", "archive_info": {}}
    )
    dist_info(site, "numpy", "2.0.0")

    spec = inventory_environment(path=[str(site)], prefix=prefix, cwd=prefix, environ={})

    pins = {p.name: p for p in spec.packages}
    assert pins["vcslib"].requirement() == "vcslib @ git+https://github.com/org/vcslib.git@abc123"
    assert pins["archlib"].url == "https://example.com/archlib-3.0.tar.gz"
    assert pins["numpy"].requirement() == "numpy==2.0.0"
    local = {c.name: c for c in spec.local_code}
    assert local["mylib"].kind == "project" and local["mylib"].editable
    assert local["mylib"].path == str(project)
    assert local["localwheel"].kind == "wheel"
    assert "gone" not in pins and any("gone==1.0" in note for note in spec.notes)
    # numpy is only there for the editable project, which is shipped without its
    # dependencies: it must be asked for explicitly.
    assert pins["numpy"].root


def test_roots_and_extras(tmp_path: Path) -> None:
    prefix, site = fake_env(tmp_path)
    dist_info(
        site,
        "top",
        "1.0",
        ("mid==1.0", 'testtool ; extra == "test"', "winonly ; sys_platform == 'win32'"),
    )
    dist_info(site, "mid", "1.0", ("leaf",))
    dist_info(site, "leaf", "1.0")
    dist_info(site, "testtool", "1.0")  # the only member of top's "test" extra: active
    dist_info(site, "loner", "1.0", ('absent ; extra == "x"', 'leaf ; extra == "x"'))
    dist_info(site, "winonly", "1.0")
    proj = tmp_path / "proj"
    proj.mkdir()
    dist_info(
        site,
        "localpkg",
        "0.1",
        ("dask[array]==1.0",),
        {"url": proj.as_uri(), "dir_info": {"editable": True}},
    )
    dist_info(site, "dask", "1.0", ('numpy ; extra == "array"',))
    dist_info(site, "numpy", "2.0")

    spec = inventory_environment(path=[str(site)], prefix=prefix, cwd=prefix, environ={})
    roots = {p.name for p in spec.packages if p.root}
    assert roots == {"top", "loner", "winonly", "dask"}
    assert next(p for p in spec.packages if p.name == "dask").requirement() == "dask[array]==1.0"


def test_loose_modules(tmp_path: Path) -> None:
    prefix, site = fake_env(tmp_path)
    dist_info(site, "requests", "2.0")
    work = tmp_path / "work"
    (work / "mypkg").mkdir(parents=True)
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "analysis.py").write_text("X = 1\n")
    (work / "setup.py").write_text("")
    (work / "requests.py").write_text("")  # shadows an installed package: not shipped
    (work / "tests").mkdir()
    (work / "tests" / "__init__.py").write_text("")
    (work / "data").mkdir()  # no __init__.py: not a package
    inside = prefix / "scripts"
    inside.mkdir()
    (inside / "inprefix.py").write_text("")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "shared_utils.py").write_text("")

    spec = inventory_environment(
        path=["", str(site), str(inside), str(extra)], prefix=prefix, cwd=work, environ={}
    )
    modules = {c.path: c.modules for c in spec.local_code if c.kind == "modules"}
    assert modules == {
        str(work): ("analysis.py", "mypkg"),
        str(extra): ("shared_utils.py",),
    }


def test_conda_meta(tmp_path: Path) -> None:
    prefix, site = fake_env(tmp_path)
    dist_info(site, "torch", "2.3.0")
    meta = prefix / "conda-meta"
    meta.mkdir()

    def record(name: str, version: str, python: bool, requested: bool, **extra: object) -> None:
        files = [f"lib/python3.11/site-packages/{name}/__init__.py"] if python else ["bin/x"]
        data = {
            "name": name,
            "version": version,
            "files": files,
            "channel": "https://conda.anaconda.org/conda-forge/linux-64",
            "requested_spec": name if requested else "",
            "depends": [],
            **extra,
        }
        (meta / f"{name}-{version}-0.json").write_text(json.dumps(data))

    record("pytorch", "2.3.0", python=True, requested=True)
    record("py-opencv", "4.9.0", python=True, requested=True)
    record("ffmpeg", "6.1", python=False, requested=True)
    record("openssl", "3.2", python=False, requested=False)
    record("libpng", "1.6", python=False, requested=True)

    spec = inventory_environment(path=[str(site)], prefix=prefix, cwd=prefix, environ={})
    pins = {p.name: p for p in spec.packages}
    assert pins["torch"].source == "index" and pins["torch"].conda_name == "pytorch"
    assert pins["opencv-python"].source == "conda"
    assert pins["opencv-python"].requirement() == "opencv-python==4.9.0"
    assert pins["ffmpeg"].source == "conda" and not pins["ffmpeg"].python
    assert "openssl" not in pins and "libpng" not in pins
    assert spec.conda_channels == ("conda-forge",)


def test_index_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\nindex-url = https://user:s3cret@pypi.corp/simple\n"
        "extra-index-url = https://extra.corp/simple\n  https://extra2.corp/simple\n"
    )
    project = tmp_path / "proj"
    project.mkdir()
    (project / "uv.toml").write_text(
        '[[index]]\nurl = "https://uv.corp/simple"\n\n'
        '[[index]]\nurl = "https://explicit.corp/simple"\nexplicit = true\n'
    )
    environ = {
        "PIP_FIND_LINKS": "/srv/wheels",
        "UV_EXTRA_INDEX_URL": "https://tok3n@uvextra.corp/simple",
        "UV_INDEX": "named=https://named.corp/simple",
        "PIP_CONFIG_FILE": str(tmp_path / "missing.conf"),
    }
    config = read_index_config(environ=environ, cwd=project, prefix=tmp_path, home=home)
    assert config.index_url == "https://user:s3cret@pypi.corp/simple"
    assert config.extra_index_urls == (
        "https://extra.corp/simple",
        "https://extra2.corp/simple",
        "https://uv.corp/simple",
        "https://named.corp/simple",
        "https://tok3n@uvextra.corp/simple",
    )
    assert config.find_links == ("/srv/wheels",)
    shown = json.dumps(config.redacted())
    assert "s3cret" not in shown and "tok3n" not in shown
    assert "https://user:****@pypi.corp/simple" in shown
    env_only = read_index_config(
        environ={"UV_DEFAULT_INDEX": "https://d.corp/simple", "PIP_CONFIG_FILE": "/dev/null"},
        cwd=tmp_path,
        prefix=tmp_path,
        home=tmp_path / "nohome",
    )
    assert env_only.index_url == "https://d.corp/simple" and not env_only.best_match


def test_redact_url() -> None:
    assert redact_url("https://u:p@h/simple") == "https://u:****@h/simple"
    assert redact_url("https://token@h/simple") == "https://****@h/simple"
    assert redact_url("https://h/simple") == "https://h/simple"
    assert redact_url("/local/dir") == "/local/dir"


def test_inventory_of_300_packages_pins_each_and_finds_its_roots(tmp_path: Path) -> None:
    # Its speed (target 0.3 s) is a figure of benchmarks/environment.py, not a timed test.
    prefix, site = fake_env(tmp_path)
    for i in range(300):
        dist_info(site, f"pkg{i:03d}", "1.0", (f"pkg{i + 1:03d}>=1",) if i % 3 else ())
    spec = inventory_environment(path=[str(site)], prefix=prefix, cwd=prefix, environ={})
    pins = {pin.name: pin for pin in spec.packages}
    assert set(pins) == {f"pkg{i:03d}" for i in range(300)}
    assert {pin.specifier for pin in pins.values()} == {"==1.0"}
    # pkg{i} needs pkg{i+1} unless i % 3 == 0: the roots are those nothing needs.
    needed = {f"pkg{i + 1:03d}" for i in range(300) if i % 3}
    assert {name for name, pin in pins.items() if pin.root} == set(pins) - needed


def test_inventory_of_this_environment() -> None:
    spec = resolve_environment_spec("local")
    names = spec.names()
    assert {"packaging", "pytest"} <= names
    assert spec.python_version and spec.origin == "local"


PIP_COMPILE = """\
#
# This file is autogenerated by pip-compile with Python 3.11
#
--index-url https://user:pw@pypi.corp/simple
--extra-index-url https://extra.corp/simple

-e ./localproj
-e git+https://github.com/org/tool.git@0123abcd#egg=tool
certifi==2024.2.2 \\
    --hash=sha256:0569859f95fc761b18b45ef421b1290a0f65f147e92a1e5eb3e635f9a5e4e66f \\
    --hash=sha256:dc383c07b76109f368f6106eee2b593b04a011ea4d55f652c6ca24a754d1cdd1
    # via requests
idna==3.6 ; python_version >= "3.8"
    # via requests
requests[socks]==2.31.0
    # via -r requirements.in
urllib3==2.2.1
    # via
    #   localproj
    #   requests
"""


def test_parse_pip_compile_requirements(tmp_path: Path) -> None:
    (tmp_path / "localproj").mkdir()
    (tmp_path / "localproj" / "pyproject.toml").write_text('[project]\nname = "LocalProj"\n')
    file = tmp_path / "requirements.txt"
    file.write_text(PIP_COMPILE)
    spec = parse_requirements_file(file)
    pins = {p.name: p for p in spec.packages}
    assert pins["certifi"].requirement() == "certifi==2024.2.2" and not pins["certifi"].root
    assert pins["idna"].marker == 'python_version >= "3.8"' and not pins["idna"].root
    assert pins["requests"].root and pins["requests"].extras == ("socks",)
    assert pins["urllib3"].root  # needed by local code, which ships without dependencies
    assert pins["tool"].url == "git+https://github.com/org/tool.git@0123abcd"
    assert [(c.name, c.editable) for c in spec.local_code] == [("localproj", True)]
    assert spec.index.index_url == "https://user:pw@pypi.corp/simple"
    assert spec.index.extra_index_urls == ("https://extra.corp/simple",)


def test_parse_includes_and_plain_lists(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("six==1.16.0\n")
    (tmp_path / "cons.txt").write_text("attrs==23.1.0\n")
    file = tmp_path / "requirements.txt"
    file.write_text("-r base.txt\n-c cons.txt\nclick>=8  # a comment\n")
    spec = parse_requirements_file(file)
    pins = {p.name: p for p in spec.packages}
    assert pins["six"].root and pins["click"].specifier == ">=8"
    assert not pins["attrs"].root
    listed = resolve_environment_spec(["numpy==2.0.0", "--find-links /srv/w"])
    assert [p.requirement() for p in listed.packages] == ["numpy==2.0.0"]
    assert "/srv/w" in listed.index.find_links[-1]


UV_LOCK = """\
version = 1
requires-python = ">=3.11"
resolution-markers = ["python_full_version >= '3.12'", "python_full_version < '3.12'"]

[[package]]
name = "myapp"
version = "0.1.0"
source = { editable = "." }
dependencies = [
    { name = "numpy" },
    { name = "pywin32", marker = "sys_platform == 'win32'" },
    { name = "tool" },
]

[[package]]
name = "numpy"
version = "1.26.4"
source = { registry = "https://pypi.org/simple" }
resolution-markers = ["python_full_version < '3.12'"]

[[package]]
name = "numpy"
version = "2.0.0"
source = { registry = "https://pypi.org/simple" }
resolution-markers = ["python_full_version >= '3.12'"]

[[package]]
name = "pywin32"
version = "306"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "tool"
version = "1.0"
source = { git = "https://github.com/org/tool?rev=main#deadbeef" }
dependencies = [{ name = "private" }]

[[package]]
name = "private"
version = "0.3"
source = { registry = "https://pkgs.corp/simple" }
"""


def test_parse_uv_lock(tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    file = tmp_path / "uv.lock"
    file.write_text(UV_LOCK)
    spec = parse_uv_lock(file)
    assert [(c.name, c.path) for c in spec.local_code] == [("myapp", str(tmp_path))]
    pins = {(p.name, p.version): p for p in spec.packages}
    assert pins[("numpy", "1.26.4")].marker == "python_full_version < '3.12'"
    assert pins[("numpy", "1.26.4")].root
    assert pins[("pywin32", "306")].marker == "sys_platform == 'win32'"
    assert pins[("tool", "1.0")].url == "git+https://github.com/org/tool@deadbeef"
    assert not pins[("private", "0.3")].root
    assert spec.index.extra_index_urls == ("https://pkgs.corp/simple",)
    assert resolve_environment_spec(file).origin == str(file)


CONDA_LOCK = """\
version: 1
metadata:
  channels:
    - url: conda-forge
      used_env_vars: []
  platforms: [linux-64, osx-arm64]
package:
  - name: python
    version: 3.11.8
    manager: conda
    platform: linux-64
    dependencies: {openssl: '>=3', libzlib: '>=1.2'}
  - name: openssl
    version: 3.2.1
    manager: conda
    platform: linux-64
    dependencies: {}
  - name: pytorch
    version: 2.2.1
    manager: conda
    platform: linux-64
    dependencies: {python: '>=3.11,<3.12', numpy: ''}
  - name: numpy
    version: 1.26.4
    manager: conda
    platform: linux-64
    dependencies: {python: '>=3.11,<3.12'}
  - name: graphviz
    version: 9.0.0
    manager: conda
    platform: linux-64
    dependencies: {}
  - name: rich
    version: 13.7.0
    manager: pip
    platform: linux-64
    dependencies: {}
  - name: appnope
    version: 0.1.4
    manager: conda
    platform: osx-arm64
    dependencies: {python: '>=3.7'}
"""


def test_parse_conda_lock(tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    file = tmp_path / "conda-lock.yml"
    file.write_text(CONDA_LOCK)
    spec = parse_conda_lock(file)
    pins = {p.name: p for p in spec.packages}
    assert spec.python_version == "3.11"
    assert set(pins) == {"torch", "numpy", "graphviz", "rich"}
    assert pins["torch"].conda_name == "pytorch" and pins["torch"].root
    assert not pins["numpy"].root  # pytorch depends on it
    assert not pins["graphviz"].python and pins["graphviz"].root
    assert pins["rich"].source == "index"
    assert spec.conda_channels == ("conda-forge",)
    assert resolve_environment_spec(str(file)).python_version == "3.11"


def test_bad_environment_argument(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentSpecError, match="no such lock file"):
        resolve_environment_spec(str(tmp_path / "nope.txt"))
    with pytest.raises(EnvironmentSpecError, match="cannot parse requirement"):
        resolve_environment_spec(["numpy=="])


def test_requirements_text_dedent() -> None:
    # Continuation lines and trailing comments survive the logical-line join.
    text = textwrap.dedent(
        """\
        pkg==1.0 \\
            --hash=sha256:aa
        other==2.0  # pinned for a reason
        """
    ).splitlines()
    spec = parse_requirement_lines(text, Path("."))
    assert [p.requirement() for p in spec.packages] == ["other==2.0", "pkg==1.0"]
