"""
The Vespa client: a local proxy that routes every request through the Vast autoscaler to a
worker in the signed format (``vespa-client``, ``twistd vespa-client``), and :class:`VastClient`
for Python scripts and Twisted programs.
"""

from vast_vespa.client.api import VastClient, VastResponse

__all__ = ["VastClient", "VastResponse"]
