# -*- test-case-name: tests.test_net_guard -*-
"""
The fast path's one start-up check. Parts of :mod:`vast_vespa.net` replace steps of Twisted's own
path (event dispatch, accept loop, write path, splice, a leaner Request, headers filled directly,
a quiet control pool) through Twisted's private names, which any Twisted release may rename.
:data:`NEEDS` lists every one of them with the shape it must have; :func:`choose_fast_path` checks
them all once per process and, if one is missing or changed, logs one warning line naming it and
the worker runs on stock Twisted (its own reactor loop, accept loop and write path, no splice, and
requests through twisted.web's public API only). ``FAST_PATH=false`` asks for stock Twisted by
hand. A test checks that NEEDS names every private name :mod:`vast_vespa.net` uses.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

import twisted

_log = Logger()


def _method(*parameters: str) -> Callable[[Any], bool]:
    """A callable whose required parameters (after ``self``) are ``parameters``; optional
    ones may be added."""

    def check(value: Any) -> bool:
        if not callable(value):
            return False
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError):
            return False
        required = [
            name
            for name, parameter in signature.parameters.items()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        ]
        if required[:1] == ["self"]:
            required = required[1:]
        return required == list(parameters)

    return check


def _kind(*types: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, types)


def _present(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Need:
    """One private name: where it is (``module:Class`` or ``module``), its name, what it must
    be (``shape``, described in ``expected``), and the reactor it applies to (None: any)."""

    owner: str
    name: str
    shape: Callable[[Any], bool]
    expected: str
    reactor: type | None = None

    def __str__(self) -> str:
        owner = self.owner.replace(":", ".").removesuffix("()")
        return f"{owner}.{self.name} ({self.expected})"


_EPOLL = EPollReactor
# The attributes twisted.web's Request constructor sets on a request (its own and
# Componentized's), which LeanRequest's constructor sets itself.
REQUEST_ATTRIBUTES = frozenset(
    {
        "notifications",
        "channel",
        "client",
        "host",
        "requestHeaders",
        "received_cookies",
        "responseHeaders",
        "cookies",
        "transport",
        "queued",
        "_parsePOSTFormSubmission",
        "_adapterCache",
    }
)
NEEDS: tuple[Need, ...] = (
    # net/dispatch.py: the lean event dispatch, on the running epoll reactor
    Need("reactor", "_poller", lambda v: callable(getattr(v, "poll", None)), "epoll", _EPOLL),
    Need("reactor", "_selectables", _kind(dict), "a dict", _EPOLL),
    Need("reactor", "_reads", _kind(set, dict), "a set", _EPOLL),
    Need("reactor", "_doReadOrWrite", _method("selectable", "fd", "event"), "a method", _EPOLL),
    Need(
        "reactor",
        "_disconnectSelectable",
        _method("selectable", "why", "isRead"),
        "a method",
        _EPOLL,
    ),
    Need("reactor", "doIteration", _method("timeout"), "a method", _EPOLL),
    Need("twisted.internet.posixbase", "_NO_FILEDESC", _present, "a connection-lost reason"),
    # net/listen.py and net/splice.py: a TCP connection's send queue and state
    Need("twisted.internet.abstract:FileDescriptor()", "_tempDataLen", _kind(int), "an int"),
    Need("twisted.internet.tcp:Connection", "dataBuffer", _kind(bytes), "bytes"),
    Need("twisted.internet.tcp:Connection", "offset", _kind(int), "an int"),
    Need("twisted.internet.tcp:Connection", "_writeDisconnecting", _kind(bool), "a bool"),
    Need("twisted.internet.tcp:Connection", "_writeDisconnected", _kind(bool), "a bool"),
    Need("twisted.internet.tcp:Connection", "TLS", _kind(bool), "a bool"),
    Need("twisted.internet.tcp:Connection", "doRead", _method(), "a method"),
    Need("twisted.internet.tcp:Connection", "doWrite", _method(), "a method"),
    # net/listen.py: the accept loop
    Need("twisted.internet.tcp:Port", "transport", lambda v: v is _tcp().Server, "tcp.Server"),
    Need("twisted.internet.tcp:Port", "sessionno", _kind(int), "an int"),
    Need("twisted.internet.tcp:Port", "_buildAddr", _method("address"), "a method"),
    Need("twisted.internet.tcp:Port", "doRead", _method(), "a method"),
    Need(
        "twisted.internet.tcp:Server",
        "__init__",
        _method("sock", "protocol", "client", "server", "sessionno", "reactor"),
        "the constructor",
    ),
    Need(
        "twisted.application.internet:StreamServerEndpointService",
        "_raiseSynchronously",
        _kind(bool),
        "a bool",
    ),
    # net/client.py: the control pool's quiet factory, and the endpoint wrapper skipped
    Need(
        "twisted.web.client:HTTPConnectionPool",
        "_factory",
        lambda v: v is _web_client()._HTTP11ClientFactory,
        "the _HTTP11ClientFactory class",
    ),
    Need(
        "twisted.web.client:_HTTP11ClientFactory",
        "__init__",
        _method("quiescentCallback", "metadata"),
        "the constructor",
    ),
    Need(
        "twisted.internet.endpoints:_WrappingProtocol()",
        "_wrappedProtocol",
        _kind(Protocol),
        "the protocol it wraps",
    ),
    # net/header_table.py: the dict behind Headers, by canonical name
    Need(
        "twisted.web.http_headers:Headers()",
        "_rawHeaders",
        lambda v: v == {b"Content-Type": [b"text/plain"]},
        "a dict by canonical name",
    ),
    Need(
        "twisted.web.http_headers",
        "_nameEncoder",
        lambda v: v.encode(b"x-request-id") == b"X-Request-Id",
        "a name encoder to canonical names",
    ),
    # net/request.py: what twisted.web's Request constructor sets (LeanRequest sets the same
    # in one step), and the state Request.write keeps
    Need(
        "twisted.web.server:Request()",
        "__dict__",
        lambda v: set(v) == REQUEST_ATTRIBUTES,
        "the attributes LeanRequest sets",
    ),
    Need("twisted.web.server:Request", "_cleanup", _method(), "a method"),
    Need("twisted.web.server:Request", "_disconnected", _kind(bool), "a bool"),
    Need("twisted.web.server:Request", "_encoder", lambda v: v is None, "None"),
    Need("twisted.web.server:Request", "_inFakeHead", _kind(bool), "a bool"),
)


def _tcp() -> Any:
    from twisted.internet import tcp

    return tcp


def _web_client() -> Any:
    from twisted.web import client

    return client


# How a probe instance is made, for names an object only gets in its constructor.
_PROBES: dict[str, Callable[[Any, Any], Any]] = {
    "FileDescriptor": lambda cls, reactor: cls(reactor),  # what every TCP connection sets up
    "_WrappingProtocol": lambda cls, reactor: cls(Deferred(), Protocol()),  # endpoints' wrapper
    "Headers": lambda cls, reactor: cls({b"content-type": [b"text/plain"]}),  # one header set
    "Request": lambda cls, reactor: cls(_ProbeChannel(), parsePOSTFormSubmission=False),
}


class _ProbeChannel:
    """What twisted.web's Request constructor asks of its channel."""

    transport = None

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None


def _owner(need: Need, reactor: Any) -> Any:
    """The object ``need.name`` is looked up on: the reactor, a module, a class, or (owner
    ending in ``()``) an instance of that class."""
    if need.owner == "reactor":
        return reactor
    module_name, _, class_name = need.owner.partition(":")
    owner: Any = importlib.import_module(module_name)
    if not class_name:
        return owner
    instance = class_name.endswith("()")
    owner = getattr(owner, class_name.removesuffix("()"))
    return _PROBES[owner.__name__](owner, reactor) if instance else owner


def missing(reactor: Any) -> list[Need]:
    """The needs that the installed Twisted (and ``reactor``) do not meet."""
    unmet = []
    for need in NEEDS:
        if need.reactor is not None and not isinstance(reactor, need.reactor):
            continue  # that part of the fast path leaves other reactors alone
        try:
            value = getattr(_owner(need, reactor), need.name)
            met = need.shape(value)
        except Exception:
            met = False
        if not met:
            unmet.append(need)
    return unmet


_chosen: dict[tuple[bool, type], bool] = {}


def choose_fast_path(enabled: bool, reactor: Any) -> bool:
    """Whether to run the fast path: ``enabled`` (FAST_PATH) and every need met. Decided and
    logged once per process and kind of reactor (the sandbox's workers and client share it)."""
    key = (enabled, type(reactor))
    if key in _chosen:
        return _chosen[key]
    if not enabled:
        _log.info("fast path off (FAST_PATH=false): running on stock Twisted")
        chosen = False
    else:
        unmet = missing(reactor)
        if unmet:
            _log.warn(
                "fast path off: Twisted {version} lacks {unmet}; running on stock Twisted "
                "(set FAST_PATH=false to silence this)",
                version=twisted.__version__,
                unmet=", ".join(str(need) for need in unmet),
            )
        chosen = not unmet
    _chosen[key] = chosen
    return chosen
