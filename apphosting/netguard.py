"""Outbound destinations a user names: refuses loopback, private, link-local and cloud-metadata addresses.

The API checks a URL's host when a deployment is created (`host_problem` for what the text alone
shows, `resolve_public` for what its name resolves to at that moment). A name can resolve
differently later (DNS rebinding), so whatever fetches from the URL must check again at the time
of use with `resolve_public` and connect to the addresses it returned, not resolve the name anew.

Names are judged as DNS will see them (`canonical_host`: percent-decoded, IDNA-mapped, lowercase,
without the final dot), so another spelling of an internal name is the same internal name.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final
from urllib.parse import unquote

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Resolves a host name to its addresses (as text); tests pass a stub.
Resolver = Callable[[str], Awaitable[Sequence[str]]]

# Instance-metadata endpoints of the clouds (AWS, GCP, Azure, OpenStack; AWS IPv6; ECS task
# metadata; Alibaba). Most are link-local anyway; they are named so the message says what they are.
METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
METADATA_HOSTS: Final = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
# Names that resolve inside a Kubernetes cluster (cluster DNS, and with its search path `<ns>.svc.
# cluster.local`, `svc.cluster.local`, `cluster.local`) or on the local network, never on the
# internet: Argo CD fetches a chart from inside the host cluster, where they reach its services.
CLUSTER_SUFFIXES: Final = (".svc", ".cluster.local", ".local", ".internal", ".localhost")
# `<service>.<namespace>` reaches a service through the search path; these namespaces exist in every
# host cluster (Kubernetes' own, and Argo CD's).
CLUSTER_NAMESPACES: Final = frozenset({"default", "kube-system", "kube-public", "kube-node-lease", "argocd"})
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# How much of a host a message repeats: enough to recognise it, never a whole oversized value.
_SHOWN = 80
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not reachable from the internet
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

DEFAULT_RESOLVE_TIMEOUT = 2.0


class Refused(Exception):
    """The destination is not one the platform may connect to; the message says why."""


class Unresolvable(Exception):
    """The host name did not resolve (or not in time)."""


def address_kind(address: str | IPAddress) -> str | None:
    """What kind of internal address this is ("a loopback address", …), or None for a public address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address in IPv6 clothing reaches the IPv4 host: judge that one.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_kind(embedded)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or ip in _SHARED:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "not a public internet address"
    return None


def address_problem(address: str | IPAddress) -> str | None:
    """Why the platform must not connect to this address, or None when it is a public address."""
    kind = address_kind(address)
    return None if kind is None else f"{address} is {kind}"


# Both are pure functions of the text, and each check of a URL asks them several times about one host (the
# text's problem, then the name to resolve): remembered, a host is parsed once, not five times, each parse
# of a name going through two failed address parsers.
@functools.lru_cache(maxsize=1024)
def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    # inet_aton accepts the forms browsers and curl do: 2130706433, 0x7f.1, 017700000001 …
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def host_allowed(host: str, allowed: Collection[str]) -> bool:
    """True when the allow-list is empty or names the host exactly or as `*.suffix`."""
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def canonical_host(host: str) -> str | None:
    """The host as a resolver sees it, or None when that is neither an IP address nor a DNS name.

    Percent-decoded, IDNA-mapped (fullwidth letters and the ideographic full stop spell `k8s.svc`
    too), lowercase, without the final dot.
    """
    try:
        decoded = unquote(host, errors="strict") if "%" in host else host
        if decoded.startswith("[") and decoded.endswith("]"):
            literal = _literal_ip(decoded)
            return None if literal is None else str(literal)
        # Python's IDNA 2003 codec: nameprep (NFKC, case folding) and the four Unicode full stops.
        name = decoded.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    name = name.removesuffix(".")
    if _literal_ip(name) is not None:
        return name
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def _cluster_kind(name: str) -> str | None:
    """Why a canonical name reaches inside a cluster or the local network, or None."""
    if name == "localhost" or name.endswith(".localhost"):
        return "a loopback name"
    if name in METADATA_HOSTS:
        return "a cloud metadata name"
    if "." not in name:
        return "a single-label name (it resolves through the cluster's search path, not on the internet)"
    for suffix in CLUSTER_SUFFIXES:
        if name.endswith(suffix):
            return f"a cluster-internal name (*{suffix})"
    if name.rpartition(".")[2] in CLUSTER_NAMESPACES:
        return "a cluster-internal name (<service>.<namespace>)"
    return None


def host_problem(host: str, *, allowed: Collection[str] = ()) -> str | None:
    """What the host's text alone shows to be refused: an internal address or name, or one off the allow-list."""
    shown = host[:_SHOWN]
    name = canonical_host(host)
    if name is None:
        return f"{shown!r} is not a valid host name"
    literal = _literal_ip(name)
    if literal is not None:
        problem = address_problem(literal)
        if problem is not None:
            return problem
    else:
        kind = _cluster_kind(name)
        if kind is not None:
            return f"{shown} is {kind}"
    if not host_allowed(name, allowed):
        return f"{shown} is not one of the allowed hosts ({', '.join(sorted(allowed))})"
    return None


async def system_resolver(host: str) -> list[str]:
    """The host's addresses from the system resolver (getaddrinfo)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class CachingResolver:
    """Remembers each name's answer for a while and asks once for concurrent lookups of one name.

    getaddrinfo runs in a small thread pool and cannot be cancelled: without this, every create
    naming a slow or dead DNS name would queue behind the last one's lookup. An answer is kept
    for `ttl` seconds and a failure for `failure_ttl`; the fetch at the time of use asks afresh.
    """

    def __init__(
        self,
        resolver: Resolver = system_resolver,
        *,
        ttl: float = 60.0,
        failure_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._ttl = ttl
        self._failure_ttl = failure_ttl
        self._clock = clock
        self._known: dict[str, tuple[float, Sequence[str] | BaseException]] = {}
        self._asking: dict[str, asyncio.Future[Sequence[str]]] = {}

    async def __call__(self, host: str) -> Sequence[str]:
        known = self._known.get(host)
        if known is not None and known[0] > self._clock():
            if isinstance(known[1], BaseException):
                raise known[1]
            return known[1]
        asking = self._asking.get(host)
        if asking is None:
            asking = self._asking[host] = asyncio.ensure_future(self._ask(host))
            # Read its outcome even when every caller gave up, so no error goes unretrieved.
            asking.add_done_callback(lambda done: None if done.cancelled() else done.exception())
        # Shielded: a caller that gives up (its timeout) leaves the lookup to finish and be kept.
        return await asyncio.shield(asking)

    async def _ask(self, host: str) -> Sequence[str]:
        try:
            addresses = list(await self._resolver(host))
        except Exception as exc:
            self._known[host] = (self._clock() + self._failure_ttl, exc)
            raise
        else:
            self._known[host] = (self._clock() + self._ttl, addresses)
            return addresses
        finally:
            del self._asking[host]


async def resolve_public(
    host: str,
    *,
    allowed: Collection[str] = (),
    resolver: Resolver | None = None,
    resolve_seconds: float = DEFAULT_RESOLVE_TIMEOUT,
) -> list[str]:
    """The addresses to connect to for `host`; raises Refused when any of them (or the name) is internal.

    Every address must be public: a name resolving to one public and one private address is
    refused, since a client may pick either. Raises Unresolvable when the name does not resolve.
    """
    problem = host_problem(host, allowed=allowed)
    name = canonical_host(host)
    if problem is not None or name is None:
        raise Refused(problem or f"{host[:_SHOWN]!r} is not a valid host name")
    literal = _literal_ip(name)
    if literal is not None:
        return [str(literal)]
    try:
        async with asyncio.timeout(resolve_seconds):
            # The name a resolver is asked, whatever spelling the URL used.
            addresses = list(await (resolver or system_resolver)(name))
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise Unresolvable(f"{host} does not resolve ({exc or 'timed out'})") from None
    if not addresses:
        raise Unresolvable(f"{host} resolves to no address")
    for address in addresses:
        try:
            kind = address_kind(address)
        except ValueError:
            kind = "something that is not an IP address"
        if kind is not None:
            raise Refused(f"{host} resolves to {kind} ({address})")
    return addresses
