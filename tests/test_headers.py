"""Header filtering: hop-by-hop headers never cross the proxy."""

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from vast_vespa.headers import end_to_end, forwarded_request_headers


class HeaderTests(SynchronousTestCase):
    def test_hop_by_hop_and_connection_named_are_dropped(self):
        """Connection, the headers it names, and the standard hop-by-hop ones are dropped."""
        headers = Headers(
            {
                b"Connection": [b"keep-alive, X-Private"],
                b"X-Private": [b"1"],
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
        kept = {name.lower(): values for name, values in end_to_end(headers, frozenset())}
        self.assertEqual(set(kept), {b"authorization", b"accept"})

    def test_forwarded_request_headers(self):
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
