"""Run by tests/test_vastai.py in a child process: one request through the official vastai
SDK serverless client (asyncio), printed as a RESULT line; with ``session`` as a fourth
argument, a session instead (create, a request in it, is_open, close, a request after the
close), printed as a SESSION line."""

import asyncio
import json
import ssl
import sys
from typing import Any

from vastai.serverless.client import CoroutineServerless


async def in_session(endpoint: Any) -> None:  # the SDK's endpoint
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    session = await endpoint.session(cost=50, lifetime=30)
    print("CREATED " + json.dumps({"session_id": session.session_id, "url": session.url}))
    result = await session.request("/v1/chat/completions", payload)
    is_open = await session.is_open()
    await session.close()
    # The session object refuses requests once closed: ask the worker directly.
    after = await endpoint.request("/v1/chat/completions", payload, session=session, retry=False)
    summary = {
        "session_id": session.session_id,
        "request": {k: result.get(k) for k in ("ok", "status", "url")},
        "completion_tokens": result["response"]["usage"]["completion_tokens"],
        "is_open": is_open,
        "open_after_close": session.open,
        "after_close": {k: after.get(k) for k in ("ok", "status", "response")},
    }
    print("SESSION " + json.dumps(summary))


async def main(
    autoscaler_url: str, account_key: str, endpoint_name: str, mode: str = "request"
) -> None:
    client = CoroutineServerless(
        api_key=account_key, autoscaler_url=autoscaler_url, webserver_url=autoscaler_url
    )
    # The SDK downloads the Vast root certificate on first use; everything here is plain
    # HTTP on loopback, so hand it a local context instead.
    client._ssl_context = ssl.create_default_context()
    async with client:
        endpoint = await client.get_endpoint(endpoint_name)
        if mode == "session":
            await in_session(endpoint)
            sys.stdout.flush()
            return
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        result = await endpoint.request("/v1/chat/completions", payload, cost=10, timeout=30)
        workers = await client.get_endpoint_workers(endpoint)
    summary = {k: result.get(k) for k in ("ok", "status", "response", "url")}
    summary["workers"] = [(w.id, w.status, w.perf) for w in workers]
    print("RESULT " + json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
