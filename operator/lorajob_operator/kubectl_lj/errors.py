"""The plugin's one error type."""

from __future__ import annotations

__all__ = ["PluginError"]


class PluginError(Exception):
    """A problem the user can act on; printed as `error: ...`, exit code 1."""
