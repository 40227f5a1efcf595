"""Which hosts a list of endpoints may aim us at: only public addresses, unless the operator says otherwise.

A file of endpoints (``warden scan --endpoints FILE``) may come from someone else: a hostile one could aim
the probe at an internal service (a cloud metadata address, an admin port on loopback, a database on the
private network) and read its answers back through the scan's rows (server-side request forgery).  Every
host is resolved before anything is sent and every address it resolves to must be global (not loopback,
private, link-local, shared, reserved, multicast or unspecified; IPv6 only in global unicast 2000::/3,
IPv4-mapped and NAT64 forms judged by the IPv4 address they embed, 6to4 and Teredo refused).  Hosts must be
ASCII (an internationalised name in its ``xn--`` form): the resolver and the HTTP client apply different IDNA
rules to some names (``faß``: IDNA 2003 gives ``fass``, IDNA 2008 ``xn--fa-hia``), so a non-ASCII name could be
checked as one host and dialled as another.  The operator
lifts the rule for a scan of their own test servers with ``allow_private``.

The file is checked when it is read (a name that does not resolve from there passes), again on the worker
right before its first request, and at every connection: :func:`public_only_transport` gives the HTTP client
a network backend that resolves the name once per connection, checks every address, and dials the checked
address itself (TLS still verifies the certificate against the name), so a DNS answer that changes between a
check and the connection (rebinding) meets the same rule.  The client follows no redirects and reads no proxy
from the environment (a proxy would resolve the name where we cannot check it).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from .errors import PrivateAddressError

__all__ = ["PrivateAddressError", "check_public_host", "host_of", "public_only_transport"]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the IPv4 address it embeds is dialled
_UNICAST = ipaddress.ip_network("2000::/3")  # global unicast; every other IPv6 block is refused
_TUNNELS = (ipaddress.ip_network("2002::/16"), ipaddress.ip_network("2001::/32"))  # 6to4, Teredo


def _is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_public(str(ip.ipv4_mapped))
        if ip in _NAT64:
            return _is_public(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if ip not in _UNICAST or any(ip in n for n in _TUNNELS):
            return False
    return bool(ip.is_global) and not ip.is_multicast


def host_of(url: str) -> tuple[str, int | None]:
    """The host and port the HTTP client (httpx) will dial for ``url``: the host is checked as the client
    reads it, never as another parser might (IDNA 2003 and 2008 map some names differently)."""
    import httpx

    u = httpx.URL(url)
    return u.host, u.port


def check_public_host(host: str, port: int | None, what: str, *, unresolved_ok: bool = False) -> list[str]:
    """The addresses ``host`` resolves to, all public; else :class:`PrivateAddressError` naming ``what``.
    ``unresolved_ok``: a name that does not resolve (yet, or not from here) passes with no address: the
    check is made again where the request leaves."""
    try:
        infos = socket.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        if unresolved_ok:
            return []
        raise PrivateAddressError(f"{what}: host {host[:100]!r} does not resolve ({e.__class__.__name__}); hosts "
                                  "are resolved before anything is sent, so that none points at an internal "
                                  "address: fix the name") from None  # fmt: skip
    addrs = sorted({str(i[4][0]) for i in infos})
    bad = [a for a in addrs if not _is_public(a)]
    if bad or not addrs:
        raise PrivateAddressError(f"{what}: host {host[:100]!r} resolves to {', '.join(bad[:3]) or 'nothing'}, which "
                                  "is not a public address (loopback, private, link-local or reserved); a list of "
                                  "endpoints may not aim the probe at internal services. For your own test "
                                  "servers, pass --allow-private-endpoints")  # fmt: skip
    return addrs


def public_only_transport(what: str) -> Any:
    """An ``httpx.HTTPTransport`` that checks the addresses of every connection it opens, where it opens it:
    the name is resolved once, every address must be public (:func:`check_public_host`), and the socket is
    dialled to a checked address, never to the name again (no second lookup for a rebinding DNS server to
    answer).  The server name for TLS stays the URL's host.  Fails closed: if httpx no longer has the
    connection pool this relies on, an error, not an unchecked transport."""
    import httpcore
    import httpx

    class _PublicOnly(httpcore.SyncBackend):
        def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                        socket_options: Any = None) -> httpcore.NetworkStream:  # fmt: skip
            last: Exception | None = None
            for addr in check_public_host(host, port, what):
                try:
                    return super().connect_tcp(addr, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as e:  # the next checked address, as a resolver-driven connect would
                    last = e
            assert last is not None
            raise last

    t = httpx.HTTPTransport()
    pool = getattr(t, "_pool", None)
    if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("this httpx has no connection pool to check addresses in: pin httpx to a tested version")
    pool._network_backend = _PublicOnly()
    return t
