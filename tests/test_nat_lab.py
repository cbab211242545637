"""scripts/nat_lab.py: the NAT lab (network namespaces, iptables MASQUERADE) and what a swarm does in it.

The topology does what it says (outbound from behind either NAT works, new inbound is dropped; the hard
NAT maps each destination to a new port), nothing is left behind (namespaces, processes; also on an
exception, SIGTERM or Ctrl-C), a client behind NAT B can use a public peer (the control), and a route
that needs the volunteer behind NAT A fails today: issue 15. Needs root, `ip netns` and iptables
(`scripts/nat_lab.py check --install`); skipped otherwise.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import nat_lab

WHY_NOT = None if sys.platform.startswith("linux") else "network namespaces are Linux only"
WHY_NOT = WHY_NOT or nat_lab.lab_supported(install=False)
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=f"NAT lab unavailable: {WHY_NOT}"),
              pytest.mark.timeout(90)]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """Peers cache their block throughput here, not in the user's cache (measured once for the module)."""
    monkeypatch.setenv("SPECSWARM_CACHE", str(tmp_path_factory.getbasetemp() / "natlab-cache"))


@pytest.fixture
def lab():
    with nat_lab.Lab() as lab:
        yield lab
    assert not mine(lab.tag), "the lab left namespaces behind"


def mine(tag: str) -> list[str]:
    return [n for n in nat_lab.list_namespaces() if n.startswith(tag)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- (a) the topology --------------------------------------------------------------------------------

def test_outbound_works_and_new_inbound_is_dropped(lab):
    assert lab.ping(lab.vol, lab.pub.ip) and lab.ping(lab.cli, lab.pub.ip)
    assert not lab.ping(lab.pub, lab.vol.ip)
    reach = lab.reachability()
    assert reach["vol -> pub"] == "connected"
    assert reach["cli -> pub"] == "connected"
    # private space is not routed on the "internet"; router A's WAN address forwards nothing new inward,
    # not even to a host that routes the LAN through it on purpose (the firewall, not just the routing)
    assert reach["pub -> vol LAN ip"] == "unreachable"
    assert reach["pub -> rtra WAN ip"] == "timeout"
    assert reach["cli -> rtra WAN ip"] == "timeout"
    assert reach["pub -> vol LAN ip via rtra (routed)"] == "timeout"
    assert reach["pub -> cli LAN ip"] == "unreachable"
    assert reach["pub -> rtrb WAN ip"] == "timeout"


@pytest.mark.parametrize("hard_nat", [False, True], ids=["cone", "hard"])
def test_nat_mapping(hard_nat):
    """One UDP socket behind NAT A, two destinations: the same external port (Linux keeps the source port:
    endpoint-independent mapping), or with --hard-nat a new random one each (endpoint-dependent)."""
    with nat_lab.Lab(hard_nat=hard_nat) as lab:
        seen = lab.nat_mapping(lab.vol, local_port=40000)
        assert len(seen) == 2 and all(s.startswith(f"{lab.rtra.wan_ip}:") for s in seen), seen
        if hard_nat:
            assert seen[0] != seen[1], seen
        else:
            assert seen == [f"{lab.rtra.wan_ip}:40000"] * 2
        assert lab.nat_mapping(lab.cli) == [f"{lab.rtrb.wan_ip}:40000"] * 2  # router B is never hard


# --- (b) cleanup ---------------------------------------------------------------------------------------

def test_cleanup_removes_namespaces_and_processes():
    with nat_lab.Lab() as lab:
        assert len(mine(lab.tag)) == len(lab.nodes)
        proc = lab.popen(lab.vol, ["sleep", "600"])
        # a grandchild outside the process group we started: found by `ip netns pids`
        lab.run(lab.pub, ["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 &"])
        stray = [int(p) for p in subprocess.run(["ip", "netns", "pids", lab.pub.name], capture_output=True,
                                                text=True, check=False).stdout.split()]
        assert stray
    assert mine(lab.tag) == []
    assert proc.poll() is not None
    time.sleep(0.2)
    assert not any(alive(p) for p in stray)
    assert lab.close() == []  # idempotent


def test_cleanup_on_exception():
    with pytest.raises(ZeroDivisionError), nat_lab.Lab() as lab:
        lab.popen(lab.cli, ["sleep", "600"])
        raise ZeroDivisionError
    assert mine(lab.tag) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cleanup_on_signal(sig):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'scripts')!r})
        import nat_lab
        with nat_lab.Lab() as lab:
            p = lab.popen(lab.vol, ["sleep", "600"])
            print(lab.tag, p.pid, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        tag, pid = proc.stdout.readline().split()
        assert mine(tag)
        proc.send_signal(sig)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert rc == 128 + sig if sig == signal.SIGTERM else rc != 0  # SystemExit(143); KeyboardInterrupt
    assert mine(tag) == []
    assert not alive(int(pid))


# --- (c) a swarm in the lab -----------------------------------------------------------------------------

def start_public(lab, swarm, blocks: str) -> str:
    return swarm.peer(lab.pub, "pub", "--blocks", blocks, "--port", "31330", "--public-ip", lab.pub.ip)[0]


def test_client_behind_nat_uses_a_public_peer(lab, tmp_path):
    """The control: NAT B alone does not stop a client, so the failure below is NAT A's."""
    swarm = nat_lab.Swarm(lab, tmp_path)
    pub = start_public(lab, swarm, "0:4")
    gen = swarm.cli(lab.cli, *nat_lab.generate_argv(pub, max_new_tokens=4), timeout=60)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.strip()


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 15: NATed peers are not reachable yet")
def test_route_through_a_natted_volunteer(lab, tmp_path):
    swarm = nat_lab.Swarm(lab, tmp_path)
    pub = start_public(lab, swarm, "0:2")
    vol = swarm.peer(lab.vol, "vol", "--blocks", "2:4", "--port", "31330", "--initial-peers", pub)
    gen = swarm.cli(lab.cli, *nat_lab.generate_argv(pub, max_new_tokens=4), timeout=75)
    if gen.returncode != 0 and "no_route" not in gen.stderr:  # a different failure is a real one, not issue 15
        raise RuntimeError(f"generate failed unexpectedly (exit {gen.returncode}); volunteer announced {vol}:\n"
                           f"{gen.stderr[-2000:]}")
    assert gen.returncode == 0, f"volunteer announced {vol}; {gen.stderr.strip().splitlines()[-1:]}"
    assert gen.stdout.strip()
