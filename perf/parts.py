"""
The fast path's parts (and TLS session resumption), each turned off alone for ``bench.py
--parts``: a few lines of Python run in the worker process before twistd starts, replacing one
part with Twisted's own way. These
exist for measurement only (the worker has one switch, FAST_PATH, for the whole fast path); the
table they give is "what each part buys" in docs/performance.md.
"""

from __future__ import annotations

PRELUDES: dict[str, str] = {
    # The reactor's own event dispatch (log.callWithLogger around each event).
    "dispatch": (
        "import vast_vespa.net.dispatch as m\nm.lean_event_dispatch = lambda reactor: False\n"
    ),
    # Twisted's own accept loop, no deferred accept (connections still send at once).
    "accept": (
        "import vast_vespa.net.listen as m\n"
        "from twisted.internet import tcp\n"
        "def only_send_now(port):\n"
        "    if isinstance(port, tcp.Port) and port.transport is tcp.Server:\n"
        "        port.transport = m.SendNowServer\n"
        "    return port\n"
        "m._send_now = only_send_now\n"
    ),
    # Twisted's own write path: every write queued for the next reactor turn.
    "send-now": (
        "import vast_vespa.net.listen as m, vast_vespa.net.client as c\n"
        "from twisted.internet import tcp\n"
        "m.SendNowServer.write = tcp.Server.write\n"
        "m.SendNowServer.write_now = tcp.Server.write\n"
        "m.SendNowServer.writeSequence = tcp.Server.writeSequence\n"
        "c.send_now = lambda transport, data: transport.write(data)\n"
    ),
    # Writes made during a turn sent at once, not together when the turn is over.
    "outbox": (
        "import vast_vespa.net.listen as m, vast_vespa.net.dispatch as d\n"
        "import vast_vespa.net.client as c\n"
        "m.OUTBOX = c.OUTBOX = d.Outbox()  # never opened: nothing is held\n"
    ),
    # Big bodies copied through the worker instead of spliced in the kernel.
    "splice": "import vast_vespa.net.client as c\nc.can_splice = lambda transport: False\n",
    # twisted.web's own Request steps (resource walk, head writing, write checks).
    # Not the fast path: TLS listeners without session resumption (no tickets, no cache), as
    # Twisted's own ssl: endpoint serves them; for the TLS scenarios.
    "tls-resumption": (
        "import vast_vespa.net.tls as t\n"
        "from OpenSSL import SSL\n"
        "make = t.ServerTLS._make_context\n"
        "def no_resumption(self):\n"
        "    context = make(self)\n"
        "    context.set_options(SSL.OP_NO_TICKET)\n"
        "    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)\n"
        "    return context\n"
        "t.ServerTLS._make_context = no_resumption\n"
        # The fast path's Python ssl context: no tickets (TLS 1.2 clients without tickets
        # still resume from OpenSSL's session cache, which Python's ssl cannot turn off).
        "import ssl\n"
        "make_stdlib = t.ServerTLS.stdlib_context\n"
        "def no_tickets(self, protocols):\n"
        "    context = make_stdlib(self, protocols)\n"
        "    context.options |= ssl.OP_NO_TICKET\n"
        "    context.num_tickets = 0\n"
        "    return context\n"
        "t.ServerTLS.stdlib_context = no_tickets\n"
    ),
    # Twisted's own TLS protocol (pyOpenSSL, interfaces copied per connection, writes
    # gathered for a turn by callLater(0)) instead of vast_vespa.net.lean_tls; for the TLS
    # scenarios.
    "lean-tls": (
        "import vast_vespa.net.listen as m\n"
        "from twisted.protocols.tls import TLSMemoryBIOFactory\n"
        "def twisted_tls(tls, factory, clock):\n"
        "    return TLSMemoryBIOFactory(tls, False, factory, clock)\n"
        "m.LeanTLSFactory = twisted_tls\n"
    ),
    # twisted.web's public Headers methods (each name canonicalised, each value checked)
    # instead of the dict behind Headers (vast_vespa.net.header_table).
    "header-table": (
        "import vast_vespa.net.header_table as h, vast_vespa.headers as p\n"
        "h.RAW_HEADER_OPS = p.PUBLIC_HEADER_OPS\n"
    ),
    "lean-request": (
        "import vast_vespa.net.request as r, vast_vespa.site as s\nr.LeanRequest = s.VespaRequest\n"
    ),
}
