"""Header filtering: hop-by-hop headers never cross the proxy."""

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from vast_vespa.headers import (
    PUBLIC_HEADER_OPS,
    LocationRewriter,
    carries_key,
    end_to_end,
    forwarded_request_headers,
    without_api_key,
)
from vast_vespa.net.header_table import RAW_HEADER_OPS


class HeaderTests(SynchronousTestCase):
    def test_hop_by_hop_and_connection_named_are_dropped(self) -> None:
        """Connection, the headers it names (whatever their case, those twisted.web spells
        its own way too: X-XSS-Protection) and the standard hop-by-hop ones are dropped, read
        through either HeaderOps; a listed token that cannot be a header name names none."""
        headers = Headers(
            {
                b"Connection": [b'keep-alive, x-PRIVATE, x-xss-protection, a b, "q"'],
                b"X-Private": [b"1"],
                b"X-Xss-Protection": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"TE": [b"trailers"],
                b"Transfer-Encoding": [b"chunked"],
                b"Upgrade": [b"h2c"],
                b"Proxy-Authorization": [b"secret"],
                b"Trailer": [b"x"],
                b"Authorization": [b"Bearer e2e"],
                b"Accept": [b"text/event-stream"],
            }
        )
        for ops in (PUBLIC_HEADER_OPS, RAW_HEADER_OPS):
            kept = dict(end_to_end(ops.table(headers), frozenset()))
            self.assertEqual(
                kept, {b"Authorization": [b"Bearer e2e"], b"Accept": [b"text/event-stream"]}
            )

    def test_forwarded_request_headers(self) -> None:
        """Host and Content-Length are Agent's to write; X-Forwarded-* are added or extended."""
        headers = Headers(
            {
                b"Host": [b"worker"],
                b"Content-Length": [b"3"],
                b"X-Forwarded-For": [b"10.0.0.1"],
                b"Set-Cookie": [b"a=1", b"b=2"],
            }
        )
        out = forwarded_request_headers(headers, "127.0.0.1", b"https")
        self.assertFalse(out.hasHeader(b"host"))
        self.assertFalse(out.hasHeader(b"content-length"))
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.1, 127.0.0.1"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])


class ForwardedHostTests(SynchronousTestCase):
    def test_forwarded_host_and_port(self) -> None:
        """X-Forwarded-Host is the Host the client asked for and X-Forwarded-Port its port
        (else the scheme's), replacing any the client sent."""
        cases = [
            (b"203.0.113.7:43000", b"http", b"43000"),
            (b"example.com", b"https", b"443"),
            (b"example.com", b"http", b"80"),
            (b"[::1]:3000", b"http", b"3000"),
            (b"[::1]", b"https", b"443"),
        ]
        for host, scheme, port in cases:
            headers = Headers({b"Host": [host], b"X-Forwarded-Host": [b"evil"]})
            out = forwarded_request_headers(headers, None, scheme, forwarded_host=True)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [host])
            self.assertEqual(out.getRawHeaders(b"x-forwarded-port"), [port])
        out = forwarded_request_headers(Headers({b"Host": [b"h"]}), None, b"http")
        self.assertFalse(out.hasHeader(b"x-forwarded-host"))


class EndpointKeyTests(SynchronousTestCase):
    def test_without_api_key(self) -> None:
        """Every api_key parameter goes (percent-encoded or not); the rest stays in order."""
        self.assertEqual(
            without_api_key(b"/v1/x?a=1&api_key=k%2B1&b=2&api%5Fkey=k2"),
            (b"/v1/x?a=1&b=2", frozenset({b"k+1", b"k2"})),
        )
        self.assertEqual(without_api_key(b"/v1/x?api_key=k"), (b"/v1/x", frozenset({b"k"})))
        for target in (b"/v1/x", b"/v1/x?a=1", b"/v1/x?my_api_key=k", b"/api_key?x=1"):
            self.assertEqual(without_api_key(target), (target, frozenset()))

    def test_carries_key(self) -> None:
        """Only an Authorization that is Bearer and one of the keys is the endpoint key."""
        keys = frozenset({b"k1"})
        self.assertTrue(carries_key(Headers({b"Authorization": [b"Bearer k1"]}), keys))
        self.assertTrue(carries_key(Headers({b"Authorization": [b"bearer  k1 "]}), keys))
        self.assertFalse(carries_key(Headers({b"Authorization": [b"Bearer sk-app"]}), keys))
        self.assertFalse(carries_key(Headers({b"Authorization": [b"Basic k1"]}), keys))
        self.assertFalse(carries_key(Headers(), keys))


class LocationTests(SynchronousTestCase):
    def test_rewritten(self) -> None:
        """Absolute URLs under BACKEND_URL move to the public URL, path and query kept."""
        rewriter = LocationRewriter("http://localhost:8000")
        public = b"https://203.0.113.7:43000"
        for value, expected in [
            (b"http://localhost:8000/docs/?a=1", b"https://203.0.113.7:43000/docs/?a=1"),
            (b"HTTP://LocalHost:8000/x", b"https://203.0.113.7:43000/x"),
            (b"http://localhost:8000", b"https://203.0.113.7:43000/"),
            (b"http://localhost:8000?q", b"https://203.0.113.7:43000/?q"),
        ]:
            self.assertEqual(rewriter.rewrite(value, public), expected)

    def test_left_alone(self) -> None:
        """Relative URLs, other hosts and ports, and look-alike hosts pass unchanged."""
        rewriter = LocationRewriter("http://localhost:8000")
        for value in (
            b"/relative",
            b"http://localhost:8001/x",
            b"http://localhost:80000/x",
            b"http://localhost:8000.evil.com/x",
            b"https://localhost:8000/x",
            b"http://example.com/x",
        ):
            self.assertEqual(rewriter.rewrite(value, b"http://w:1"), value)

    def test_default_port_and_base_path(self) -> None:
        """The default port may be written or not; a base path must match, and goes."""
        rewriter = LocationRewriter("http://backend/api/")
        public = b"http://w:1"
        self.assertEqual(rewriter.rewrite(b"http://backend:80/api/v1", public), b"http://w:1/v1")
        self.assertEqual(rewriter.rewrite(b"http://backend/api", public), b"http://w:1/")
        self.assertEqual(rewriter.rewrite(b"http://backend/apix", public), b"http://backend/apix")
        self.assertEqual(rewriter.rewrite(b"http://backend/other", public), b"http://backend/other")
        ipv6 = LocationRewriter("http://[::1]:8000")
        self.assertEqual(ipv6.rewrite(b"http://[::1]:8000/x", public), b"http://w:1/x")
