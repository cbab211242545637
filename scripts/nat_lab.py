"""A NAT lab in Linux network namespaces: a public peer, a volunteer behind home router A, a client behind B.

    sudo .venv/bin/python scripts/nat_lab.py check              # prerequisites, one line each
    sudo .venv/bin/python scripts/nat_lab.py scenario           # build, run peers, status + generate, tear down
    sudo .venv/bin/python scripts/nat_lab.py scenario --hard-nat --turn   # endpoint-dependent NAT at A; coturn
    sudo .venv/bin/python scripts/nat_lab.py scenario --hard-nat --keep   # (no TURN: the relay); keep it
    sudo .venv/bin/python scripts/nat_lab.py clean              # remove labs of processes that are gone

Topology (every interface, bridge and iptables rule lives inside the lab's namespaces, none in the host's:
deleting the namespaces removes them all):

    [pub] 203.0.113.10 ──┐
                         ├── br0 in [inet] 203.0.113.1 (the "internet"; routes no private space)
    [rtra] wan 203.0.113.2 ┤        [rtrb] wan 203.0.113.3 ──┘
           lan 192.168.1.1            lan 192.168.2.1
              │                          │
    [vol]  192.168.1.10         [cli]  192.168.2.10

Each router: ip_forward=1, MASQUERADE out of `wan` (`--random-fully` with hard_nat: a new external port per
connection, i.e. endpoint-dependent mapping), FORWARD drops what comes in on `wan` unless it belongs to a
connection from inside (conntrack ESTABLISHED,RELATED), INPUT drops new connections from `wan` (like a home
router: silence, not a refusal). Linux conntrack filters by address and port, and without --random-fully it
keeps the source port when it can (endpoint-independent mapping): a port-restricted cone NAT.

Namespaces are named `sslab<pid>-<n>-<role>` (roles: inet pub rtra vol rtrb cli), so concurrent labs do not
collide and `clean` can tell an abandoned lab (its pid is gone) from a live one.

The scenario: a public peer (blocks 0:2) and a volunteer behind NAT A (2:4, only --initial-peers), then from
behind NAT B `swarm status` and `swarm generate --json` in four modes (plain/speculative x push/client-
mediated) beside `--local`; it prints each hop's path (direct, webrtc, webrtc-turn, relay), whether the text
is identical, and exits 1 if any mode failed. `scripts/bench_nat_paths.py` times the paths themselves.

Python API (tests/test_nat_lab.py):

    with Lab(hard_nat=False) as lab:
        lab.pub.ip, lab.vol.ip, lab.rtra.wan_ip, lab.vol.name    # the nodes: .name (namespace), .ip, .role
        lab.run("vol", ["ip", "route"])                          # subprocess.run inside the namespace
        p = lab.popen(lab.pub, [sys.executable, "-m", ...])      # Popen inside it; stopped at cleanup
        lab.ping("vol", lab.pub.ip); lab.tcp_probe("pub", lab.vol.ip, 8000)
        lab.forward_ports("31330:31331")                         # router A forwards them to vol
        turn_flags = lab.turn()                                  # coturn in pub: ["--turn", URL, ...]
    # everything gone here, also after an exception, Ctrl-C or SIGTERM (SIGHUP)

Stdlib only; needs root, `ip` (iproute2) and `iptables` (installed with apt-get when missing, if asked to).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "sslab"
NAME_RE = re.compile(rf"^{PREFIX}(\d+)-(\d+)-([a-z]+)$")
_counter = itertools.count()

PUBLIC_NET = "203.0.113"  # TEST-NET-3: note Python's ipaddress calls it private (is_global False)
LAN_A, LAN_B = "192.168.1", "192.168.2"


# --- prerequisites ------------------------------------------------------------------------------------

def _sh(argv: list[str], check: bool = True, timeout: float = 30.0, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    res = subprocess.run(argv, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {res.returncode}): {(res.stderr or '').strip()}")
    return res


def install_iptables() -> str | None:
    """`apt-get install -y iptables` unless iptables is there already; None on success, else why not."""
    if shutil.which("iptables"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "iptables is missing (apt-get install -y iptables, as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "install", "-y", "iptables"], ["apt-get", "update"], ["apt-get", "install", "-y", "iptables"]):
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
        if argv[1] == "install" and res.returncode == 0 and shutil.which("iptables"):
            return None
    return f"apt-get install -y iptables failed: {res.stderr.strip()[-300:]}"


def prerequisites(install: bool = False) -> list[tuple[str, bool, str]]:
    """[(what, ok, one line)] for root, ip netns, iptables (installed first when `install`)."""
    out = []
    root = os.geteuid() == 0
    out.append(("root", root, f"uid {os.geteuid()}" + ("" if root else ": run as root (namespaces, iptables)")))
    ip = shutil.which("ip")
    if not ip:
        out.append(("ip", False, "`ip` (iproute2) not found: apt-get install -y iproute2"))
    else:
        res = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, check=False)
        ok = res.returncode == 0
        out.append(("ip", ok, f"{ip}, `ip netns` works" if ok else f"`ip netns list` failed: {res.stderr.strip()}"))
    why = install_iptables() if install and root else None
    ipt = shutil.which("iptables")
    if ipt:
        ver = subprocess.run([ipt, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        out.append(("iptables", True, f"{ipt} ({ver})"))
    else:
        out.append(("iptables", False, why or "not found: apt-get install -y iptables (or run scenario: it installs it)"))
    return out


def lab_supported(install: bool = True) -> str | None:
    """None when a Lab can be built here, else the reason why not (for pytest.skip)."""
    bad = [line for what, ok, line in prerequisites(install) if not ok]
    return "; ".join(bad) if bad else None


# --- the lab ------------------------------------------------------------------------------------------

@dataclass
class Node:
    role: str
    name: str  # the namespace
    ip: str  # its address (LAN side for routers)
    wan_ip: str | None = None  # routers: their public address

    def __str__(self) -> str:
        return self.name


class Lab:
    """The topology above; a context manager (or call build()/close()). Cleanup is idempotent and always
    runs: on exit, on an exception, on Ctrl-C, on SIGTERM/SIGHUP (while the lab is open, from the main
    thread) and at interpreter exit."""

    ROLES = ("inet", "pub", "rtra", "vol", "rtrb", "cli")

    def __init__(self, hard_nat: bool = False, keep: bool = False, public_net: str = PUBLIC_NET, verbose: bool = False):
        self.hard_nat, self.keep, self.verbose = hard_nat, keep, verbose
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}-"
        p = public_net
        self.inet = Node("inet", self.tag + "inet", f"{p}.1")
        self.pub = Node("pub", self.tag + "pub", f"{p}.10")
        self.rtra = Node("rtra", self.tag + "rtra", f"{LAN_A}.1", wan_ip=f"{p}.2")
        self.vol = Node("vol", self.tag + "vol", f"{LAN_A}.10")
        self.rtrb = Node("rtrb", self.tag + "rtrb", f"{LAN_B}.1", wan_ip=f"{p}.3")
        self.cli = Node("cli", self.tag + "cli", f"{LAN_B}.10")
        self.nodes = {n.role: n for n in (self.inet, self.pub, self.rtra, self.vol, self.rtrb, self.cli)}
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._closed = False
        self._old_handlers: dict[int, object] = {}

    # building

    def __enter__(self) -> Lab:
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ip(self, *args: str) -> None:
        _sh(["ip", *args])

    def _in(self, node: Node | str, *argv: str) -> None:
        _sh(["ip", "netns", "exec", self.ns(node), *argv])

    def _veth(self, a: Node, a_if: str, b: Node, b_if: str) -> None:
        self._ip("link", "add", "name", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if, "netns", b.name)

    def _addr(self, node: Node, ifname: str, cidr: str) -> None:
        self._ip("-n", node.name, "addr", "add", cidr, "dev", ifname)
        self._ip("-n", node.name, "link", "set", ifname, "up")

    def _sysctl(self, node: Node, key: str, value: str) -> None:
        self._in(node, "sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")

    def build(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("the NAT lab needs root (network namespaces, iptables)")
        why = install_iptables()
        if why:
            raise RuntimeError(why)
        for node in self.nodes.values():
            self._ip("netns", "add", node.name)
            self._created.append(node.name)
            self._ip("-n", node.name, "link", "set", "lo", "up")
            self._sysctl(node, "net.ipv6.conf.all.disable_ipv6", "1")  # IPv4 only: no stray v6 paths
        # the public segment: a bridge inside [inet], one veth port per public host
        self._ip("-n", self.inet.name, "link", "add", "br0", "type", "bridge")
        self._addr(self.inet, "br0", f"{self.inet.ip}/24")
        self._sysctl(self.inet, "net.ipv4.ip_forward", "1")  # routes nothing private: 'network unreachable'
        for node, ifname in ((self.pub, "eth0"), (self.rtra, "wan"), (self.rtrb, "wan")):
            port = f"p-{node.role}"
            self._veth(node, ifname, self.inet, port)
            self._ip("-n", self.inet.name, "link", "set", port, "master", "br0")
            self._ip("-n", self.inet.name, "link", "set", port, "up")
            self._addr(node, ifname, f"{node.wan_ip or node.ip}/24")
            self._ip("-n", node.name, "route", "add", "default", "via", self.inet.ip)
        # the homes: router LAN <-> host, NAT on the router
        for router, host, hard in ((self.rtra, self.vol, self.hard_nat), (self.rtrb, self.cli, False)):
            self._veth(router, "lan", host, "eth0")
            self._addr(router, "lan", f"{router.ip}/24")
            self._addr(host, "eth0", f"{host.ip}/24")
            self._ip("-n", host.name, "route", "add", "default", "via", router.ip)
            self._sysctl(router, "net.ipv4.ip_forward", "1")
            for rule in self.router_rules(hard):
                self._in(router, "iptables", *rule)

    @staticmethod
    def router_rules(hard_nat: bool) -> list[list[str]]:
        """A home router's iptables rules (run inside its namespace)."""
        masq = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"] + (["--random-fully"] if hard_nat else [])
        return [
            masq,
            ["-P", "FORWARD", "DROP"],
            ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"],
            ["-P", "INPUT", "DROP"],
            ["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "lan", "-j", "ACCEPT"],
            ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-p", "icmp", "-j", "ACCEPT"],
        ]

    def forward_ports(self, ports: str = "31330:31331") -> None:
        """Port forwarding on router A (TCP `ports`, FIRST:LAST, on its WAN address to the volunteer), as a
        volunteer would set it up at home: new inbound connections on those ports reach `vol`."""
        self._in(self.rtra, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "tcp", "--dport", ports,
                 "-j", "DNAT", "--to-destination", self.vol.ip)
        self._in(self.rtra, "iptables", "-A", "FORWARD", "-i", "wan", "-o", "lan", "-p", "tcp", "-d", self.vol.ip,
                 "--dport", ports, "-j", "ACCEPT")

    # running things inside

    def ns(self, node: Node | str) -> str:
        """The namespace name of a Node, a role ('vol') or a namespace name."""
        if isinstance(node, Node):
            return node.name
        return self.nodes[node].name if node in self.nodes else node

    def node(self, node: Node | str) -> Node:
        if isinstance(node, Node):
            return node
        if node in self.nodes:
            return self.nodes[node]
        return next(n for n in self.nodes.values() if n.name == node)

    def _argv(self, node: Node | str, argv: list[str]) -> list[str]:
        if self._closed:
            raise RuntimeError("the lab is closed")
        return ["ip", "netns", "exec", self.ns(node), *map(str, argv)]

    def run(self, node: Node | str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside the namespace (text, captured output, cwd the repo unless given)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", ROOT)
        kw.setdefault("check", False)
        return subprocess.run(self._argv(node, argv), **kw)

    def popen(self, node: Node | str, argv: list[str], **kw) -> subprocess.Popen:
        """subprocess.Popen(argv) inside the namespace, in a session of its own (Ctrl-C at the terminal
        reaches us, not it); the lab stops it at cleanup. `ip netns exec` execs: the pid is argv's."""
        kw.setdefault("cwd", ROOT)
        kw.setdefault("start_new_session", True)
        kw.setdefault("env", {**os.environ, "PYTHONUNBUFFERED": "1"})
        proc = subprocess.Popen(self._argv(node, argv), **kw)
        self._procs.append(proc)
        return proc

    def turn(self, user: str = "specswarm", password: str = "lab-secret", port: int = 3478) -> list[str]:
        """Start coturn (Debian's `turnserver`) on the public segment, long-term credentials; the client
        flags that use it (`--turn turn:IP:PORT --turn-user U --turn-password P`)."""
        binary = shutil.which("turnserver")
        if binary is None:
            raise RuntimeError("no turnserver: apt-get install coturn (scripts/test.sh does, as root)")
        ip = self.pub.ip
        argv = [binary, "-n", "--listening-ip", ip, "--relay-ip", ip, "--listening-port", str(port),
                "--min-port", "49200", "--max-port", "49400", "--lt-cred-mech", "--user", f"{user}:{password}",
                "--realm", "specswarm-lab", "--no-tls", "--no-dtls", "--no-cli", "--log-file", "stdout",
                "--simple-log", "--pidfile", f"/tmp/{self.tag}turn.pid"]
        self.popen(self.pub, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # listening on UDP: `ss` inside the namespace
            out = self.run(self.pub, ["ss", "-uln"], capture_output=True, text=True).stdout
            if f"{ip}:{port}" in out:
                return ["--turn", f"turn:{ip}:{port}", "--turn-user", user, "--turn-password", password]
            time.sleep(0.1)
        raise RuntimeError("turnserver did not start listening within 10 s")

    def ping(self, src: Node | str, dst_ip: str, timeout: float = 1.0) -> bool:
        """One ICMP echo from `src` to `dst_ip` (a raw socket in Python: no ping binary needed)."""
        code = textwrap.dedent(f"""
            import os, socket, struct, sys, time
            def csum(b):
                b += b'\\0' * (len(b) % 2); s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
                s = (s >> 16) + (s & 0xffff); s += s >> 16; return ~s & 0xffff
            ident = os.getpid() & 0xffff
            hdr = struct.pack('!BBHHH', 8, 0, 0, ident, 1) + b'natlab'
            pkt = hdr[:2] + struct.pack('!H', csum(hdr)) + hdr[4:]
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout({timeout})
            try:
                s.sendto(pkt, ({dst_ip!r}, 0))
            except OSError:
                sys.exit(1)
            end = time.monotonic() + {timeout}
            while time.monotonic() < end:
                try:
                    data, (ip, _) = s.recvfrom(2048)
                except (socket.timeout, OSError):
                    break
                icmp = data[(data[0] & 15) * 4:]
                if ip == {dst_ip!r} and icmp[0] == 0 and struct.unpack('!H', icmp[4:6])[0] == ident:
                    sys.exit(0)
            sys.exit(1)
        """)
        return self.run(src, [sys.executable, "-c", code], timeout=timeout + 10).returncode == 0

    def tcp_probe(self, src: Node | str, ip: str, port: int, timeout: float = 2.0) -> str:
        """Open a TCP connection from `src` to ip:port: 'connected', 'refused', 'timeout' or 'unreachable'."""
        code = textwrap.dedent(f"""
            import errno, socket, sys
            try:
                socket.create_connection(({ip!r}, {int(port)}), timeout={timeout}).close(); print('connected')
            except ConnectionRefusedError: print('refused')
            except (socket.timeout, TimeoutError): print('timeout')
            except OSError as e: print('unreachable' if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else repr(e))
        """)
        res = self.run(src, [sys.executable, "-c", code], timeout=timeout + 15)
        return res.stdout.strip() or f"error: {res.stderr.strip()[-200:]}"

    def listen(self, node: Node | str, port: int, bind: str = "0.0.0.0") -> subprocess.Popen:
        """A TCP listener (accepts and closes, forever) inside `node`; returns once it listens. Stop it
        with .terminate() or leave it to cleanup."""
        code = textwrap.dedent(f"""
            import socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(({bind!r}, {int(port)})); s.listen(16); print('ready', flush=True)
            while True:
                s.accept()[0].close()
        """)
        proc = self.popen(node, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"listener on {self.ns(node)}:{port} did not start")
        return proc

    def nat_mapping(self, src: Node | str, ports: tuple[int, ...] = (3478, 3479), local_port: int = 40000) -> list[str]:
        """STUN-like: one UDP socket in `src` (local port `local_port`) sends to the public peer on each of
        `ports`; returns the source address the public side saw for each. All equal: endpoint-independent
        mapping (hole punching can work); different: endpoint-dependent (hard NAT)."""
        echo = textwrap.dedent(f"""
            import select, socket
            socks = []
            for port in {list(ports)!r}:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', port)); socks.append(s)
            print('ready', flush=True)
            while True:
                for s in select.select(socks, [], [])[0]:
                    data, (ip, port) = s.recvfrom(64); s.sendto(f'{{ip}}:{{port}}'.encode(), (ip, port))
        """)
        probe = textwrap.dedent(f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', {local_port})); s.settimeout(2)
            for port in {list(ports)!r}:
                s.sendto(b'?', ({self.pub.ip!r}, port))
                try: print(s.recvfrom(64)[0].decode())
                except OSError: print('no answer')
        """)
        proc = self.popen(self.pub, [sys.executable, "-c", echo], stdout=subprocess.PIPE, text=True)
        try:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("UDP reflector did not start")
            return self.run(src, [sys.executable, "-c", probe], timeout=30).stdout.split()
        finally:
            proc.terminate()
            proc.wait(5)
            proc.stdout.close()

    def reachability(self, port: int = 18080) -> dict[str, str]:
        """The sanity matrix: what a new TCP connection gets on each path that matters."""
        out = {}
        with self._listening(self.pub, port):
            out["vol -> pub"] = self.tcp_probe(self.vol, self.pub.ip, port)
            out["cli -> pub"] = self.tcp_probe(self.cli, self.pub.ip, port)
        with self._listening(self.vol, port):
            out["pub -> vol LAN ip"] = self.tcp_probe(self.pub, self.vol.ip, port)
            out["pub -> rtra WAN ip"] = self.tcp_probe(self.pub, self.rtra.wan_ip, port)
            out["cli -> rtra WAN ip"] = self.tcp_probe(self.cli, self.rtra.wan_ip, port)
            # the firewall itself: even with a route to the LAN through router A, new inbound is dropped
            self._ip("-n", self.pub.name, "route", "add", f"{LAN_A}.0/24", "via", self.rtra.wan_ip)
            try:
                out["pub -> vol LAN ip via rtra (routed)"] = self.tcp_probe(self.pub, self.vol.ip, port)
            finally:
                self._ip("-n", self.pub.name, "route", "del", f"{LAN_A}.0/24", "via", self.rtra.wan_ip)
        with self._listening(self.cli, port):
            out["pub -> cli LAN ip"] = self.tcp_probe(self.pub, self.cli.ip, port)
            out["pub -> rtrb WAN ip"] = self.tcp_probe(self.pub, self.rtrb.wan_ip, port)
        return out

    @contextlib.contextmanager
    def _listening(self, node: Node, port: int):
        proc = self.listen(node, port)
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(5)
            proc.stdout.close()

    # cleanup

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def leave(signum, frame):
            for s in self._old_handlers:
                signal.signal(s, signal.SIG_IGN)  # one is enough: the cleanup must not be cut short
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, leave)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def close(self) -> list[str]:
        """Stop every process started in the lab, delete its namespaces; returns the lab's namespaces
        still listed afterwards (none, normally). Idempotent; with keep=True only says what is left."""
        if self._closed:
            return []
        self._closed = True
        atexit.unregister(self.close)
        main = threading.current_thread() is threading.main_thread()
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            if self.keep:
                print(f"--keep: leaving namespaces {' '.join(self._created)} and their processes; remove them with "
                      f"`{sys.executable} {Path(__file__).resolve()} clean --all`", file=sys.stderr)
                return self._created
            return self._teardown()
        finally:
            if main:
                signal.signal(signal.SIGINT, old_int)
                self._restore_signal_handlers()

    def _teardown(self) -> list[str]:
        for proc in self._procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            for f in (proc.stdout, proc.stderr, proc.stdin):
                if f:
                    f.close()
        return delete_namespaces(self._created)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # its own session (popen's default): the group is its
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def delete_namespaces(names: list[str]) -> list[str]:
    """Kill any process still inside these (lab) namespaces, delete them; returns those still listed."""
    existing = set(list_namespaces())
    for name in names:
        if name not in existing:
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for name in names:
        if name in existing:
            for _ in range(20):  # a killed process may hold the namespace for a moment
                if subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False).returncode == 0:
                    break
                time.sleep(0.1)
    left = set(list_namespaces())
    return [n for n in names if n in left]


def list_namespaces() -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def lab_namespaces(all_labs: bool = False) -> list[str]:
    """Namespaces of labs whose process is gone (all of ours with all_labs)."""
    out = []
    for name in list_namespaces():
        m = NAME_RE.match(name)
        if m and (all_labs or not Path(f"/proc/{m.group(1)}").exists()):
            out.append(name)
    return out


# --- swarm processes in the lab -----------------------------------------------------------------------

class Swarm:
    """`python -m swarm.cli ...` processes in lab namespaces, their stdout collected line by line."""

    def __init__(self, lab: Lab, log_dir: Path):
        self.lab, self.log_dir = lab, log_dir
        self.lines: dict[str, queue.Queue] = {}

    def peer(self, node: Node, name: str, *args: str, timeout: float = 90.0) -> list[str]:
        """Start `swarm peer --model tiny ARGS` in `node`; returns its 'listening on' addresses."""
        argv = [sys.executable, "-m", "swarm.cli", "peer", "--model", "tiny", "--threads", "1", *args]
        with open(self.log_dir / f"{name}.log", "w") as log:  # the child keeps its own copy
            proc = self.lab.popen(node, argv, stdout=subprocess.PIPE, stderr=log, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] and None, daemon=True).start()
        addrs: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5 if not addrs else 1.0)
            except queue.Empty:
                if addrs:
                    break  # all its 'listening on' lines came together
                if proc.poll() is not None:
                    break
                continue
            if line.startswith("listening on "):
                addrs.append(line.split()[2])
        if not addrs:
            raise RuntimeError(f"peer {name} did not start (exit {proc.poll()}); log:\n{self.tail(name)}")
        return addrs

    def cli(self, node: Node, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "swarm.cli", *args]
        try:
            return self.lab.run(node, argv, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(argv, 124, exc.stdout or "", (exc.stderr or "") + f"\n(timed out after {timeout} s)")

    def tail(self, name: str, n: int = 15) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"


def generate_argv(initial_peer: str | None, max_new_tokens: int = 8, timeout: float = 15.0,
                  prompt: str = "def add(a, b):") -> list[str]:
    """`swarm generate` through `initial_peer`'s swarm (None: --local)."""
    where = ["--initial-peers", initial_peer] if initial_peer else ["--local"]
    return ["generate", "--model", "tiny", "--threads", "1", *where,
            "--max-new-tokens", str(max_new_tokens), "--timeout", str(timeout), "--prompt", prompt]


MODES = {  # the acceptance's four ways through the swarm: generate's flags
    "plain push": ["--no-speculative", "--push"],
    "plain client-mediated": ["--no-speculative", "--no-push"],
    "speculative push": ["--speculative", "--push"],
    "speculative client-mediated": ["--speculative", "--no-push"],
}


def generate_json(swarm: Swarm, node: Node, pub: str, flags: list[str], timeout: float = 90.0) -> dict:
    """`swarm generate --json` from `node`: its JSON (text, paths per hop ...) plus rc and stderr's tail."""
    gen = swarm.cli(node, *generate_argv(pub, max_new_tokens=16), "--json", *flags, timeout=timeout)
    try:
        out = json.loads(gen.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        out = {}
    return {**out, "rc": gen.returncode, "stderr": gen.stderr.strip()[-1500:]}


def run_scenario(lab: Lab, log_dir: Path, port: int = 31330, wait_s: float = 30.0,
                 volunteer_args: list[str] | None = None, out=print, turn: bool = False,
                 modes: dict[str, list[str]] = MODES) -> dict:
    """Public peer (blocks 0:2), volunteer behind NAT A (2:4, only --initial-peers), status and generate (each
    of `modes`, and --local as the reference) from the client behind NAT B; with `turn`, coturn on the public
    segment and both NATed sides told of it. Returns what happened (also printed through `out`)."""
    swarm = Swarm(lab, log_dir)
    result: dict = {}
    t0 = time.monotonic()
    turn_flags = lab.turn() if turn else []
    pub_addrs = swarm.peer(lab.pub, "pub", "--blocks", "0:2", "--port", str(port), "--public-ip", lab.pub.ip)
    pub = pub_addrs[0]
    out(f"[{time.monotonic() - t0:5.1f}s] public peer in {lab.pub.name} announces: {' '.join(pub_addrs)}"
        + (f"; TURN server {turn_flags[1]}" if turn else ""))
    extra = ["--port", str(port)] if volunteer_args is None else volunteer_args
    vol_addrs = swarm.peer(lab.vol, "vol", "--blocks", "2:4", *extra, *turn_flags, "--initial-peers", pub)
    out(f"[{time.monotonic() - t0:5.1f}s] volunteer in {lab.vol.name} (behind {lab.rtra.wan_ip}"
        f"{', hard NAT' if lab.hard_nat else ''}) announces: {' '.join(vol_addrs)}")
    result.update({"public_addrs": pub_addrs, "volunteer_addrs": vol_addrs})
    # wait until the client sees both records (the volunteer announces 'online' once its blocks are loaded)
    status: dict = {}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        st = swarm.cli(lab.cli, "status", "--model", "tiny", "--json", "--initial-peers", pub, *turn_flags, timeout=45)
        try:
            status = json.loads(st.stdout)
        except ValueError:
            status = {"error": (st.stderr or st.stdout).strip()[-500:]}
        if sum(p.get("state") == "online" and p.get("reachable") for p in status.get("peers", [])) >= 2:
            break
        time.sleep(1)
    result["status"] = status
    out(f"[{time.monotonic() - t0:5.1f}s] `swarm status --json` from {lab.cli.name}:")
    for p in status.get("peers", []):
        out(f"    peer …{p['peer_id'][-8:]} blocks {p['blocks']} {p['state']} reachability={p.get('reachability')} "
            f"observed={p.get('observed')} reachable={p['reachable']} path={p.get('path')} rtt_ms={p.get('rtt_ms')} "
            f"addrs={p['addrs']} data_addr={p['data_addr']}")
    if "peers" in status:
        out(f"    coverage {status['coverage']} gaps {status['gaps']} complete={status['complete']}")
    else:
        out(f"    {status}")
    ref = generate_json(swarm, lab.cli, None, [])
    result["local"] = ref
    out(f"[{time.monotonic() - t0:5.1f}s] reference (--local): {ref.get('text', ref)!r}")
    result["runs"] = {}
    for name, flags in modes.items():
        run = generate_json(swarm, lab.cli, pub, flags + turn_flags)
        run["identical"] = run.get("text") is not None and run.get("text") == ref.get("text")
        result["runs"][name] = run
        hops = ", ".join(f"{h} via {p}" for h, p in zip(run.get("route", []), run.get("paths", [])))
        out(f"[{time.monotonic() - t0:5.1f}s] {name}: exit {run['rc']}, "
            + (f"{'identical to --local' if run['identical'] else 'DIFFERENT: ' + repr(run.get('text'))}; {hops}; "
               f"{run.get('tokens_per_s', 0):.1f} tokens/s" if run["rc"] == 0 else run["stderr"][-600:]))
    for name in ("pub", "vol"):
        verdict = [x for x in (log_dir / f"{name}.log").read_text().splitlines() if "reachability:" in x][:1]
        out(f"--- {name}'s verdict: {verdict[0].split(': ', 1)[1] if verdict else '(none logged)'}")
        out(f"--- last lines of {name}'s log:")
        out(textwrap.indent(swarm.tail(name, 6), "    "))
    return result


# --- command line -------------------------------------------------------------------------------------

def cmd_check(args) -> int:
    rows = prerequisites(install=args.install)
    for what, ok, line in rows:
        print(f"{what:9} {'ok  ' if ok else 'FAIL'} {line}")
    return 0 if all(ok for _, ok, _ in rows) else 1


def cmd_clean(args) -> int:
    names = lab_namespaces(all_labs=args.all)
    left = delete_namespaces(names)
    print(f"removed {len(names) - len(left)} namespaces" + (f"; still there: {' '.join(left)}" if left else ""))
    return 1 if left else 0


def cmd_scenario(args) -> int:
    bad = [line for what, ok, line in prerequisites(install=True) if not ok]
    if bad:
        print("cannot build the lab: " + "; ".join(bad), file=sys.stderr)
        return 1
    log_dir = Path(tempfile.mkdtemp(prefix="natlab-logs-"))
    lab = Lab(hard_nat=args.hard_nat, keep=args.keep)
    rc = 1
    try:
        with lab:
            print(f"lab {lab.tag}*: pub {lab.pub.ip}; router A {lab.rtra.wan_ip} -> vol {lab.vol.ip}"
                  f"{' (hard NAT: --random-fully)' if args.hard_nat else ''}; router B {lab.rtrb.wan_ip} -> cli {lab.cli.ip}")
            print(f"ping vol -> pub: {'ok' if lab.ping(lab.vol, lab.pub.ip) else 'FAILED'}; "
                  f"ping cli -> pub: {'ok' if lab.ping(lab.cli, lab.pub.ip) else 'FAILED'}")
            reach = lab.reachability()
            for path, what in reach.items():
                print(f"tcp {path:38} {what}")
            expected_ok = ("vol -> pub", "cli -> pub")
            sane = all((what == "connected") == (path in expected_ok) for path, what in reach.items())
            print("topology:", "as intended (outbound works, new inbound is dropped)" if sane else "NOT AS INTENDED")
            result = run_scenario(lab, log_dir, port=args.port, turn=args.turn,
                                  volunteer_args=shlex.split(args.volunteer_args) if args.volunteer_args else None)
            ok = all(r["rc"] == 0 and r["identical"] for r in result["runs"].values())
            print("result:", "every mode generated the --local text" if ok else "SOME MODE FAILED (see above)")
            rc = 0 if sane and ok else 1
            if args.json:
                print(json.dumps(result, indent=1))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    except SystemExit as exc:  # SIGTERM / SIGHUP
        rc = exc.code if isinstance(exc.code, int) else 1
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"nat_lab: error: {exc}", file=sys.stderr)
        print(f"logs: {log_dir}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            mine = [n for n in list_namespaces() if n.startswith(lab.tag)]
            print(f"cleanup: {'no lab namespace left' if not mine else 'LEFT: ' + ' '.join(mine)}")
    if args.keep:
        print(f"logs: {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="verify prerequisites (root, ip netns, iptables), one line each")
    p.add_argument("--install", action="store_true", help="apt-get install -y iptables when missing")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("scenario", help="build the lab, run a public peer + a NATed volunteer, generate from "
                                        "behind another NAT, print what happened, tear down")
    p.add_argument("--hard-nat", action="store_true", help="router A maps each connection to a new random port "
                                                           "(MASQUERADE --random-fully: endpoint-dependent mapping)")
    p.add_argument("--turn", action="store_true", help="also run coturn on the public segment; the volunteer and "
                                                       "the client use it (--turn ...)")
    p.add_argument("--keep", action="store_true", help="leave the lab (and peers) running for debugging")
    p.add_argument("--port", type=int, default=31330, help="the peers' --port [default: 31330]")
    p.add_argument("--volunteer-args", metavar="'ARGS'", help="the volunteer's listen flags instead of --port PORT "
                   "(e.g. '--listen /ip4/0.0.0.0/tcp/0'); --blocks 2:4 --initial-peers PUB are always given")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=cmd_scenario)
    p = sub.add_parser("clean", help="remove namespaces of labs whose process is gone")
    p.add_argument("--all", action="store_true", help="every lab namespace, also of running labs (--keep ones)")
    p.set_defaults(func=cmd_clean)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
