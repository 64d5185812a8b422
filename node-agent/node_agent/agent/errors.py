"""Why the agent cannot start."""

from __future__ import annotations


class AgentError(RuntimeError):
    """The agent cannot start (missing backend, bad socket path, install-cni failed, ...)."""
