"""Whether the Hugging Face Hub can be asked: offline modes and a quick reachability probe.

An offline machine must fail in seconds, not after minutes of HTTP retries: model and dataset loading ask
here first and go to the local caches only (``local_files_only``) when the Hub cannot answer.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP probe of the Hub endpoint (``HF_ENDPOINT``); behind a proxy it proves nothing, so True."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def answers() -> bool:
    """:func:`reachable`, probed once per process (model loading asks several times)."""
    return reachable()


def models_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return constants.HF_HUB_OFFLINE or env in _TRUE


def datasets_offline() -> bool:
    """Whether the datasets library is in offline (cache-only) mode."""
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def models_available() -> bool:
    """Whether a model id can be looked up online: not in offline mode, and the endpoint answers."""
    if models_offline():
        return False
    if not answers():
        log.debug("the Hugging Face Hub does not answer: loading from the local cache only")
        return False
    return True
