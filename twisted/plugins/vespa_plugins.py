"""twistd plugins for Vespa. ServiceMaker lines only: import nothing else here."""

from twisted.application.service import ServiceMaker

vespa = ServiceMaker(
    "Vespa worker",
    "vast_vespa.worker.tap",
    "Serverless worker: a signed, streaming HTTP proxy in front of an inference backend.",
    "vespa",
)

vespa_autoscaler = ServiceMaker(
    "Vespa autoscaler emulator",
    "vast_vespa.emulator.tap",
    "Local emulator of the Vast.ai autoscaler: a development and test tool, never a "
    "production router.",
    "vespa-autoscaler",
)

vespa_sandbox = ServiceMaker(
    "Vespa sandbox",
    "vast_vespa.sandbox",
    "The whole system locally in one process: sample backend, autoscaler emulator, signed "
    "workers and the client proxy on 127.0.0.1:8010.",
    "vespa-sandbox",
)

vespa_client = ServiceMaker(
    "Vespa client",
    "vast_vespa.client.tap",
    "Local proxy to a Vast serverless endpoint: routes, signs and streams every request.",
    "vespa-client",
)
