"""Which process answered: ``host:pid`` by default, the Ray Serve replica id when running under Ray.

Why: behind a load balancer or Ray Serve's router a caller (and an operator reading logs) must be able to
see which replica scored an image, e.g. to confirm adapter-affinity routing or to trace a bad answer to a
machine. One value per process, set once at start-up.
"""

from __future__ import annotations

import os
import socket

_name = f"{socket.gethostname()}:{os.getpid()}"


def replica_name() -> str:
    """This process's name in responses (`replica` field, ``X-Clipshot-Replica`` header)."""
    return _name


def set_replica_name(name: str) -> None:
    """Rename this process (the Ray Serve replica does, before its app starts)."""
    global _name
    _name = name


__all__ = ["replica_name", "set_replica_name"]
