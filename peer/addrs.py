"""Which of a peer's addresses others can use: checking what a volunteer gives, classifying, filtering.

A peer tells others multiaddrs `/ip4|ip6|dns*/HOST/tcp/PORT` (with `/p2p/<id>` when complete). This
module checks the ones a volunteer gives (`check_announce`), makes bound wildcards concrete
(`concrete`), says what kind of address an IP is (`scope`: unspecified, loopback, private, global,
multicast) and keeps only the usable ones (`usable`):
  * never a wildcard (0.0.0.0, ::) or multicast address;
  * loopback only in a loopback swarm (every bootstrap peer is loopback; with no bootstrap peer: when
    the peer listens on loopback only, e.g. the first peer of a test swarm);
  * a private-range address (RFC 1918, CGNAT 100.64/10, link-local, IPv6 ULA/link-local) not when
    the verdict is private, unless a bootstrap peer is on that same network (same /24, or /64);
  * when the verdict is private, no public or loopback address or name either: nobody could dial it.
"Private range" is ours, not Python's `is_private`, which also covers the documentation ranges
(192.0.2/24, 198.51.100/24, 203.0.113/24: the NAT lab's "internet"); those count as global here.

Knows multiaddr text and IP ranges; nothing of sockets, libp2p hosts, the DHT or how a verdict is reached.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Sequence

import multiaddr
from libp2p.utils.address_validation import expand_wildcard_address

PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "fc00::/7", "fe80::/10"))
SCOPES = ("unspecified", "loopback", "private", "global", "multicast")


def check_announce(announce: Sequence[str] = (), public_ip: str | None = None, peer_id: str | None = None) -> list[str]:
    """The `announce` multiaddrs without their /p2p/ part, checked: each /ip4|ip6|dns*/HOST/tcp/PORT with a
    concrete host and port (a /p2p/ part must name `peer_id`, when given); `public_ip` an IP address.
    ValueError (one line) for anything else."""
    out = []
    for text in announce:
        try:
            ma = multiaddr.Multiaddr(text)
            names = [p.name for p in ma.protocols()]
            shape = names[0] in ("ip4", "ip6", "dns", "dns4", "dns6") and names[1:] in (["tcp"], ["tcp", "p2p"])
            host, port = ma.value_for_protocol(names[0]), int(ma.value_for_protocol("tcp"))
            wildcard = port == 0 or (names[0] in ("ip4", "ip6") and ipaddress.ip_address(host).is_unspecified)
            if not shape or wildcard or (peer_id and len(names) == 3 and ma.value_for_protocol("p2p") != peer_id):
                raise ValueError
        except Exception:
            raise ValueError(f"--announce wants the /ip4/HOST/tcp/PORT others dial (or /ip6, /dns4, /dns6; no "
                             f"wildcard or port 0; /p2p/ only with this peer's id), got {text!r}") from None
        out.append(f"/{names[0]}/{host}/tcp/{port}")
    if public_ip is not None:
        try:
            if ipaddress.ip_address(public_ip).is_unspecified or ipaddress.ip_address(public_ip).is_multicast:
                raise ValueError
        except ValueError:
            raise ValueError(f"--public-ip wants the IP address others reach this machine at (e.g. 203.0.113.7), "
                             f"got {public_ip!r}") from None
    return out


def concrete(addrs: list[Any], announce: Sequence[str] = (), public_ip: str | None = None):
    """(where it listens, as peers can dial it: a wildcard (0.0.0.0, ::) becomes each interface's address;
    what to tell others: `announce` and each bound port on `public_ip`, else the former)."""
    out: list[str] = []
    for addr in addrs:
        text = str(addr)
        candidates = [text]
        if text.startswith(("/ip4/0.0.0.0/", "/ip6/::/")):
            candidates = [str(a) for a in expand_wildcard_address(addr)]
            if text.startswith("/ip4/"):
                candidates.append(text.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/", 1))
        out += [c for c in candidates if c not in out]
    ports = [a.split("/")[4] for a in out if public_ip and a.split("/")[3] == "tcp"]
    told = list(announce) + [f"/ip{6 if ':' in (public_ip or '') else 4}/{public_ip}/tcp/{p}" for p in ports]
    return out, list(dict.fromkeys(told)) or out


def host_port(maddr: str) -> tuple[str, str, int] | None:
    """(protocol, host, tcp port) of `/ip4|ip6|dns*/HOST/tcp/PORT[/...]`; None for any other shape."""
    parts = maddr.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[3] != "tcp":
        return None
    try:
        return parts[1], parts[2], int(parts[4])
    except ValueError:
        return None


def scope(host: str) -> str:
    """One of SCOPES for an IP address; "global" for a DNS name (it is meant for others)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "global"
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_multicast:
        return "multicast"
    return "private" if any(ip in net for net in PRIVATE_NETS if net.version == ip.version) else "global"


def same_network(host: str, others: Iterable[str]) -> bool:
    """Whether IP `host` shares its /24 (IPv4) or /64 (IPv6) with one of `others` (a heuristic for "on
    the same LAN": we do not know the netmasks of other machines)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    net = ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False)
    for other in others:
        try:
            if ipaddress.ip_address(other) in net:
                return True
        except ValueError:
            continue
    return False


def bootstrap_hosts(bootstrap: Iterable[str]) -> list[str]:
    """The hosts of bootstrap multiaddrs (those of a known shape)."""
    return [hp[1] for hp in map(host_port, bootstrap) if hp is not None]


def usable(addrs: Sequence[str], bootstrap: Sequence[str] = (), verdict: str = "unknown") -> list[str]:
    """The addresses of `addrs` (multiaddrs, with or without /p2p/) that peers of the swarm reached
    through `bootstrap` could dial, given the reachability `verdict` (module docstring)."""
    hosts = bootstrap_hosts(bootstrap)
    kinds = [scope(hp[1]) if hp else "global" for hp in map(host_port, addrs)]
    real = [k for k in kinds if k not in ("unspecified", "multicast")]
    loopback_swarm = all(scope(h) == "loopback" for h in hosts) if hosts else all(k == "loopback" for k in real)
    out = []
    for addr, kind in zip(addrs, kinds):
        hp = host_port(addr)
        if kind in ("unspecified", "multicast"):
            continue
        if kind == "loopback" and not loopback_swarm:
            continue
        if verdict == "private" and not (kind == "private" and same_network(hp[1], hosts)):
            continue
        out.append(addr)
    return list(dict.fromkeys(out))
