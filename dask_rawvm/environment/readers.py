"""Small, forgiving readers of the files environments are made of (metadata, JSON, URLs)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlsplit


def read_text(file: Path) -> str:
    """The file's text, or "" when it cannot be read (a missing optional metadata file)."""
    try:
        return file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def read_json(file: Path) -> dict[str, object] | None:
    """The JSON object a file holds, or None when it is missing, unreadable or not an object."""
    text = read_text(file)
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def file_url_path(url: str) -> str:
    """The local path of a ``file:`` URL; any other string is returned as is."""
    parts = urlsplit(url)
    return unquote(parts.path) if parts.scheme == "file" else url


def as_list(value: object) -> list[object]:
    """A configuration value that may be a scalar, a list or missing, as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
