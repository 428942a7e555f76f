"""twistd plugins for Vespa. ServiceMaker lines only: import nothing else here."""

from twisted.application.service import ServiceMaker

vespa = ServiceMaker(
    "Vespa worker",
    "vespa.tap",
    "Serverless worker: a signed, streaming HTTP proxy in front of an inference backend.",
    "vespa",
)

vespa_client = ServiceMaker(
    "Vespa client",
    "vespa.client.tap",
    "Local proxy to a Vast serverless endpoint: routes, signs and streams every request.",
    "vespa-client",
)
