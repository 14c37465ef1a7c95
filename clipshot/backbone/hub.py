"""Is the model hub reachable? Asked once, quickly, before open_clip tries to download a pretrained tag.

Why: offline, huggingface_hub retries every candidate file with exponential back-off (~58 s of warnings on
our machines) before open_clip gives up. A bounded DNS + TCP probe answers in at most ``timeout`` seconds;
when the hub is unreachable the download runs in huggingface_hub's offline mode, which still loads weights
already in the local cache and otherwise fails at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connection to the hub's host opens within ``timeout`` s (DNS included)."""
    url = urlparse(endpoint or hub_endpoint())
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:  # in a thread: getaddrinfo has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for the duration (cache only, no network, no retries)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
