"""What a volunteer running `swarm peer` sees and controls: the loopback warning, --announce / --public-ip
(printed, in the DHT record, and dialled by clients end to end), --port with --identity (same addresses
after a restart), a port in use (one line, exit 1), flag mistakes (one line, exit 2), a log line per
refused request (rate-limited) and the periodic summary line."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
import time

import pytest

from peer.limits import ServeStats
from peer.p2p import P2PNode, _concrete, check_announce, load_or_create_identity
from peer.serve import PeerOptions
from peer.tcp import TcpStream
from peer.transport import data_addrs, parse_tcp_addr
from swarm.client.swarm_model import SwarmModel
from swarm.launch import PeerProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECSWARM_CACHE", str(tmp_path_factory.getbasetemp() / "volunteer-cache"))


def swarm(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def free_port_pair() -> int:
    """A port P such that P and P + 1 are free on every interface (for --port P)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("0.0.0.0", 0))
            port = a.getsockname()[1]
            if port < 65534:
                with socket.socket() as b:
                    try:
                        b.bind(("0.0.0.0", port + 1))
                        return port
                    except OSError:
                        pass
    raise RuntimeError("no two consecutive free ports")


def wait_for(path, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text()
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


def test_announce_checks_and_addresses():
    me, other = (P2PNode(load_or_create_identity(None), 1).peer_id for _ in range(2))
    assert check_announce(["/ip4/203.0.113.7/tcp/31337", f"/dns4/peer.example/tcp/4001/p2p/{me}"], "198.51.100.1",
                          me) == ["/ip4/203.0.113.7/tcp/31337", "/dns4/peer.example/tcp/4001"]
    for bad in ("/ip4/0.0.0.0/tcp/1", "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4", "/ip4/1.2.3.4/udp/5", "nonsense",
                f"/ip4/1.2.3.4/tcp/5/p2p/{other}"):
        with pytest.raises(ValueError, match="--announce"):
            check_announce([bad], peer_id=me)
    for bad in ("0.0.0.0", "::", "example.org", "224.0.0.1"):
        with pytest.raises(ValueError, match="--public-ip"):
            check_announce([], bad)
    bound = ["/ip4/192.0.2.2/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]
    assert _concrete(bound) == (bound, bound)  # nothing announced: where it listens
    assert _concrete(bound, public_ip="203.0.113.7")[1] == ["/ip4/203.0.113.7/tcp/4001"]  # never 0.0.0.0
    assert _concrete(bound, ["/dns4/x.example/tcp/9"], "203.0.113.7")[1] == \
        ["/dns4/x.example/tcp/9", "/ip4/203.0.113.7/tcp/4001"]


def test_port_means_stable_addresses_on_every_interface():
    opts = PeerOptions("m", port=31337)
    assert opts.listen == ["/ip4/0.0.0.0/tcp/31337"] and opts.data_port == 31338
    assert PeerOptions("m", port=31337, data_port=4000).data_port == 4000
    assert PeerOptions("m").listen == ["/ip4/127.0.0.1/tcp/0"] and PeerOptions("m").data_port == 0
    for bad in (dict(port=0), dict(port=65535), dict(port=1, listen=["/ip4/127.0.0.1/tcp/0"]), dict(summary_every=-1),
                dict(announce=["/ip4/0.0.0.0/tcp/1"]), dict(public_ip="nope")):
        with pytest.raises(ValueError):
            PeerOptions("m", **bad)


def test_refusal_lines_are_rate_limited(caplog):
    stats = ServeStats(logging.getLogger("test.volunteer"), lines=3, window=60.0)
    with caplog.at_level(logging.INFO, logger="test.volunteer"):
        for i in range(10):
            stats.refuse("bad_request", "tcp:10.0.0.1:5555", f"garbage\nnumber {i}")
        stats.refuse("cache_full", "…abcd1234", "no room")
        stats.tokens_served, stats.sessions_served = 40, 2
        line = stats.summary(1, 100, 200, final=True)
    logged = [r.getMessage() for r in caplog.records]
    assert [m for m in logged if m.startswith("refused")] == [
        "refused a request from tcp:10.0.0.1:5555 [bad_request]: garbage number 0",
        "refused a request from tcp:10.0.0.1:5555 [bad_request]: garbage number 1",
        "refused a request from tcp:10.0.0.1:5555 [bad_request]: garbage number 2",
        "refused a request from …abcd1234 [cache_full]: no room"]
    assert any(m.startswith("(7 more requests refused [bad_request]") for m in logged), logged
    assert line.startswith("sessions: 1 open, 2 served; tokens: 40 served, ") and "cache: 100 of 200 tokens free" in line
    assert line.endswith("; refused: 11 requests (bad_request 10, cache_full 1)")


def test_flag_mistakes_get_one_line_and_exit_2(tiny):
    path = str(tiny("llama2").path)
    cases = ((["--announce", "/ip4/0.0.0.0/tcp/4001"], "--announce"), (["--public-ip", "not-an-ip"], "--public-ip"),
             (["--port", "4001", "--listen", "/ip4/127.0.0.1/tcp/0"], "--port"))  # (the rest: above)
    runs = [subprocess.Popen([sys.executable, "-m", "swarm.cli", "peer", "--model", path, "--blocks", "0:8", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            for argv, _ in cases]  # at once: each is mostly start-up time
    for (argv, mentions), run in zip(cases, runs):
        _, err = run.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and mentions in lines[0], (argv, err)


def test_loopback_warning_refusals_and_summary(tiny, tmp_path):
    log = tmp_path / "peer.log"
    peer = PeerProcess(tiny("llama2").path, (0, 8), "--summary-every", "1", log_file=log)
    try:
        assert peer.addr.startswith("/ip4/127.0.0.1/")
        text = wait_for(log, "other machines cannot reach this peer")
        assert "WARNING specswarm.peer: listening on 127.0.0.1 only: other machines cannot reach this peer" in text
        (data_addr,) = data_addrs([peer.addr])

        async def garbage(n: int) -> None:
            stream = await TcpStream.connect(*parse_tcp_addr(data_addr))
            for i in range(n):
                await stream.send(b"not a specswarm message %d" % i)
                await asyncio.wait_for(stream.recv(), 10)  # the peer answers each with an Error
            await stream.close()
        asyncio.run(garbage(8))
        text = wait_for(log, "refused: 8 requests (bad_request 8)", timeout=10)
    finally:
        peer.stop()
    text = log.read_text()
    refused = [line for line in text.splitlines() if "refused a request from tcp:127.0.0.1:" in line]
    assert len(refused) == 5 and "[bad_request]" in refused[0] and "bad magic" in refused[0], text
    assert "(3 more requests refused [bad_request]" in text  # the rest, in one line (at the latest at shutdown)
    summaries = [line for line in text.splitlines() if "INFO specswarm.peer: summary: " in line]
    assert len(summaries) >= 2 and "sessions: 0 open, 0 served; tokens: 0 served, 0.0/s" in summaries[0], text
    assert "refused: 8 requests (bad_request 8)" in summaries[-1]


@pytest.mark.slow  # ~30 s: a volunteer's peer restarted with its flags and identity
def test_public_ip_port_and_identity(tiny, tmp_path):
    """--port P --public-ip 127.0.0.2: announced and printed on 127.0.0.2 (never 0.0.0.0), in the DHT record
    with the data port P+1; a client that knows only the announced address generates through it; a restart
    with --identity has the same addresses; a second peer on the port gets one line and exit code 1."""
    path, port = str(tiny("llama2").path), free_port_pair()
    flags = ("--port", str(port), "--public-ip", "127.0.0.2", "--identity", str(tmp_path / "peer.key"))
    peer, again = PeerProcess(path, (0, 8), *flags, log_file=tmp_path / "peer.log"), None
    try:
        assert peer.addr == f"/ip4/127.0.0.2/tcp/{port}/p2p/{peer.peer_id}"
        again = subprocess.Popen([sys.executable, "-m", "swarm.cli", "peer", "--model", path, "--blocks", "0:8",
                                  "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, text=True)
        status = swarm("status", "--model", path, "--initial-peers", peer.addr, "--json")
        (rec,) = json.loads(status.stdout)["peers"]
        assert rec["addrs"] == [peer.addr] and rec["data_addr"] == f"tcp://127.0.0.2:{port + 1}", rec
        out = swarm("generate", "--model", path, "--initial-peers", peer.addr, "--prompt", "def f(x):",
                    "--max-new-tokens", "4", "--no-speculative", "--ignore-eos", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["new_tokens"] == 4, out.stderr
        model = SwarmModel(path, [peer.addr])  # which addresses the client dials
        try:
            assert [h.addr for h in model.route] == [f"tcp://127.0.0.2:{port + 1}"]
            assert model.peers[peer.peer_id].addr == peer.addr
        finally:
            model.close()
        _, err = again.communicate(timeout=60)  # a second peer on the same port
        assert again.returncode == 1 and "address in use" in err.strip().splitlines()[-1], err
    finally:
        peer.stop()
        if again is not None and again.poll() is None:
            again.kill()
    last = [line for line in (tmp_path / "peer.log").read_text().splitlines() if "summary: " in line][-1]
    served = re.search(r"sessions: 0 open, (\d+) served; tokens: (\d+) served", last)
    assert served and int(served[1]) >= 1 and int(served[2]) >= 4, last  # the generate above, at shutdown
    restarted = PeerProcess(path, (0, 8), *flags, log_file=tmp_path / "peer.log")
    try:
        assert restarted.addr == peer.addr
        assert data_addrs([restarted.addr]) == [f"tcp://127.0.0.2:{port + 1}"]
    finally:
        restarted.stop()


def test_data_port_in_use_is_one_line_and_exit_1(tiny):
    port = free_port_pair()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port + 1))
        taken.listen()
        out = swarm("peer", "--model", str(tiny("llama2").path), "--blocks", "0:8", "--port", str(port))
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "direct inference" in last and "address in use" in last, out.stderr
