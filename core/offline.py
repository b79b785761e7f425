"""The lab's one offline switch and network probe, for everything it may download (ImageNet weights
in core.models, torchvision datasets in core.datasets). Set CLASSIFIER_LAB_OFFLINE=1 on an
air-gapped machine: nothing then waits on, or half-fetches, a download."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

OFFLINE_ENV = "CLASSIFIER_LAB_OFFLINE"
DOWNLOAD_PROBE_TIMEOUT_S = 3.0


def downloads_off() -> str | None:
    """Why nothing may be downloaded ("downloads are off: CLASSIFIER_LAB_OFFLINE is set"), or None."""
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return f"downloads are off: {OFFLINE_ENV} is set"
    return None


def probe_network(url: str, timeout: float = DOWNLOAD_PROBE_TIMEOUT_S) -> str | None:
    """None when the download host answers within ``timeout``, else the reason.

    torchvision's downloader has no timeout; probing first keeps an offline machine from hanging.
    """
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach {u.hostname}: {e}"
