"""The OpenAI Python SDK pointed at the client proxy (tox -e openai; skipped without openai)."""

from __future__ import annotations

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.test_client_e2e import ClientTestCase

try:
    import openai
except ImportError:
    HAVE_OPENAI = False
else:
    HAVE_OPENAI = True


class OpenAISDKTests(ClientTestCase):
    def setUp(self) -> None:
        if not HAVE_OPENAI:
            raise SkipTest("openai is not installed (tox -e openai)")
        super().setUp()

    def sdk(self) -> openai.OpenAI:
        url = self.start_client()
        # The SDK insists on a key; the proxy keeps it away from the worker.
        return openai.OpenAI(base_url=url + "/v1", api_key="sk-unused", max_retries=0)

    async def test_chat_completion(self) -> None:
        """client.chat.completions.create works against the proxy, signed end to end."""
        sdk = self.sdk()

        def complete() -> str | None:
            answer = sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            content: str | None = answer.choices[0].message.content
            return content

        self.assertEqual(await deferToThread(complete), "Hello there")
        self.assertEqual(self.fake_workers[0].verified[0].form, "json")
        self.assertNotIn(b"authorization", self.backend.seen[0].headers)

    async def test_streamed_chat_completion(self) -> None:
        """stream=True yields the chunks the backend sent, through the proxy."""
        sdk = self.sdk()

        def stream() -> list[str | None]:
            chunks = sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return [c.choices[0].delta.content for c in chunks if c.choices]

        self.assertEqual(await deferToThread(stream), ["Hello", " there"])

    async def test_route_cost_from_payload(self) -> None:
        """Without X-Serverless-Cost, the /route/ cost is the request's workload as the worker
        counts it (WORKLOAD=openai): max_tokens plus the prompt's tokens."""
        sdk = self.sdk()

        def complete(max_tokens: int) -> None:
            sdk.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "Say hello to me"}],  # 15 chars: 4 tokens
                max_tokens=max_tokens,
            )

        await deferToThread(complete, 500)
        await deferToThread(complete, 20)
        self.assertEqual([call["cost"] for call in self.autoscaler.calls], [504.0, 24.0])
