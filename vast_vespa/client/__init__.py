"""
The Vespa client: a local proxy that routes every request through the Vast autoscaler to a
worker in the signed format (``vespa-client``, ``twistd vespa-client``), and :class:`VastClient`
for Python scripts and Twisted programs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vast_vespa.client.api import VastClient, VastResponse

__all__ = ["VastClient", "VastResponse"]


def __getattr__(name: str) -> Any:
    """The Python API, imported on first use: so that ``python -m vast_vespa.client.settings``
    finds its module not yet imported (runpy warns otherwise)."""
    if name in __all__:
        from vast_vespa.client import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
