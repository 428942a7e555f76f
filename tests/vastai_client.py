"""Run by tests/test_vastai.py in a child process: one request through the official vastai
SDK serverless client (asyncio), printed as a RESULT line."""

import asyncio
import json
import ssl
import sys

from vastai.serverless.client import CoroutineServerless


async def main(autoscaler_url: str, account_key: str, endpoint_name: str) -> None:
    client = CoroutineServerless(
        api_key=account_key, autoscaler_url=autoscaler_url, webserver_url=autoscaler_url
    )
    # The SDK downloads the Vast root certificate on first use; everything here is plain
    # HTTP on loopback, so hand it a local context instead.
    client._ssl_context = ssl.create_default_context()
    async with client:
        endpoint = await client.get_endpoint(endpoint_name)
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        result = await endpoint.request("/v1/chat/completions", payload, cost=10, timeout=30)
        workers = await client.get_endpoint_workers(endpoint)
    summary = {k: result.get(k) for k in ("ok", "status", "response", "url")}
    summary["workers"] = [(w.id, w.status, w.perf) for w in workers]
    print("RESULT " + json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
