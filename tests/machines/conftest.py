"""Fixtures of the machines layer's tests: its parts over an in-memory provider."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from memory_provider import Parts, make_parts


@pytest.fixture
def parts_factory() -> Callable[..., Awaitable[Parts]]:
    """Opened parts: ``await parts_factory(names_after_launch=..., **options)``."""

    async def factory(names_after_launch: bool = True, **options: Any) -> Parts:
        parts = make_parts(names_after_launch, **options)
        await parts.session.open()
        return parts

    return factory


@pytest.fixture
async def parts(parts_factory: Callable[..., Awaitable[Parts]]) -> AsyncIterator[Parts]:
    yield await parts_factory()
