"""Fixtures of the environment tests: an isolated pip/uv configuration, an index a VM can reach."""

from environment_helpers import isolated, served  # noqa: F401  (fixtures)
