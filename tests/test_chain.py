"""Real peers (separate processes, real libp2p on 127.0.0.1) serving block ranges to real clients."""

import asyncio
import json
import subprocess
import sys
import threading

import pytest
import torch

from peer.p2p import P2PNode
from peer.channel import new_session_id
from peer.transport import INFERENCE_PROTOCOL
from protocol import framing
from protocol import messages as m
from swarm.decode.generate import LocalModel, generate
from swarm.launch import PeerProcess, start_peers
from peer.transport import fetch_info, parse_tcp_addr
from swarm.client.swarm_model import SwarmModel

SPANS = [(0, 3), (3, 5), (5, 8)]


@pytest.fixture(scope="module")
def swarm3(tiny, tmp_path_factory):
    path = tiny("llama3").path
    peers = start_peers(path, SPANS, "--cache-tokens", "4096", "--max-sessions", "8",
                        log_dir=tmp_path_factory.mktemp("logs"))
    yield path, peers
    for p in peers:
        p.stop()


def cli(*args):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--prompt", "def fibonacci(n):",
                          "--max-new-tokens", "24", "--ignore-eos", "--json", "--no-speculative", *args],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("transport", ["tcp", "libp2p"])
@pytest.mark.parametrize("push", [True, False, None], ids=["push", "client-mediated", "auto"])
def test_three_peers_greedy_equals_local(swarm3, push, transport):
    path, peers = swarm3
    if push is None and transport == "libp2p":
        pytest.skip("the shape choice does not depend on the transport")
    local = cli("--model", str(path), "--local")
    remote = cli("--model", str(path), "--initial-peers", *[p.addr for p in peers], "--transport", transport,
                 *{True: ["--push"], False: ["--no-push"], None: []}[push])
    assert remote["tokens"] == local["tokens"]
    expected = {True: {"push"}, False: {"client-mediated"}, None: {"push", "client-mediated"}}[push]
    assert remote["where"] in expected and remote["transport"] == transport
    assert remote["mode"] == "plain"
    assert [r.split(":", 1)[1] for r in remote["route"]] == ["0:3", "3:5", "5:8"]


def test_explicit_route_and_sampling(swarm3):
    path, peers = swarm3
    route = ",".join(f"{p.peer_id[-10:]}:{a}:{b}" for p, (a, b) in zip(peers, SPANS))
    same = ("--dtype", "float32")  # the launcher's peers' (a client's default, auto, may be bfloat16)
    local = cli("--model", str(path), "--local", "--temperature", "0.8", "--seed", "3", *same)
    remote = cli("--model", str(path), "--initial-peers", *[p.addr for p in peers], "--route", route,
                 "--temperature", "0.8", "--seed", "3", *same)
    assert remote["tokens"] == local["tokens"]


@pytest.mark.parametrize("flags", [["--k", "4", "--pipeline"], [], ["--tree", "2"], ["--no-push", "--k", "8", "--pipeline"]])
def test_speculative_through_the_chain_equals_local(swarm3, tmp_path_factory, flags):
    path, peers = swarm3
    draft = tmp_path_factory.getbasetemp() / "chain-draft"
    if not draft.exists():
        from conftest import make_checkpoint

        make_checkpoint(draft, "llama3", seed=5, num_hidden_layers=2)
    local = cli("--model", str(path), "--local")
    spec = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--prompt", "def fibonacci(n):",
                           "--max-new-tokens", "24", "--ignore-eos", "--json", "--model", str(path), "--draft", str(draft),
                           "--initial-peers", *[p.addr for p in peers], "--speculative", *flags],
                          capture_output=True, text=True, timeout=180)
    assert spec.returncode == 0, spec.stderr
    got = json.loads(spec.stdout)
    assert got["tokens"] == local["tokens"] and got["mode"].startswith("speculative")
    assert got["rounds"] >= 1 and got["tokens_per_round"] >= 1.0 and 0 <= got["acceptance_rate"] <= 1


def test_bad_route_is_refused_clearly(swarm3):
    path, peers = swarm3
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(path), "--prompt", "x",
                          "--initial-peers", peers[0].addr, peers[2].addr, "--no-dht"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "do not cover blocks [0, 8) (they serve 0:3, 5:8)" in out.stderr  # runtime, not usage


async def raw_requests(addr: str, hidden_size: int) -> dict:
    """Hostile and broken requests on one stream; returns the error code each one got."""
    node = await P2PNode.start()
    codes = {}
    try:
        stream = await node.open_stream(addr, INFERENCE_PROTOCOL)

        async def ask(name, payload: bytes):
            await stream.send(payload)
            reply = m.decode(await asyncio.wait_for(stream.recv(), 20))
            codes[name] = reply.code if isinstance(reply, m.Error) else type(reply).__name__

        sid = new_session_id()
        await ask("garbage", b"\x00\x01 definitely not a message")
        await ask("bad_magic", b"XX" + bytes(30))
        await ask("bad_version", m.encode(m.Info())[:2] + b"\x09" + m.encode(m.Info())[3:])
        await ask("bad_json", m.PREFIX.pack(m.MAGIC, m.VERSION, int(m.Kind.OPEN), 5) + b"{nope")
        await ask("open_wrong_blocks", m.encode(m.Open(sid, 16, (0, 8))))
        await ask("open_too_long", m.encode(m.Open(sid, 10**6, (0, 3))))
        await ask("open", m.encode(m.Open(sid, 16, (0, 3))))
        h = torch.randn(2, hidden_size)
        await ask("unknown_session", m.encode(m.Step(new_session_id(), 1, 0, h)))
        await ask("gap", m.encode(m.Step(sid, 1, 5, h)))
        await ask("overflow", m.encode(m.Step(sid, 1, 0, torch.randn(17, hidden_size))))
        await ask("wrong_width", m.encode(m.Step(sid, 1, 0, torch.randn(2, hidden_size + 1))))
        await ask("bad_parents", m.encode(m.Step(sid, 1, 0, h, parents=[0, 0])))
        await ask("bad_compact", m.encode(m.Step(sid, 1, 0, h, compact=(3, [0]))))
        lie = m.encode(m.Step(sid, 1, 0, h))
        await ask("short_tensor", lie[:-4])
        await ask("good_step", m.encode(m.Step(sid, 2, 0, h)))
        await ask_raw_oversize(node, addr, codes)
    finally:
        await node.close()
    return codes


async def ask_raw_oversize(node, addr, codes):
    """A header announcing more than the peer accepts is refused before anything is allocated.

    On a direct TCP stream the peer answers with an error and hangs up; on libp2p it resets the stream.
    """
    info, _ = await fetch_info(node, addr)
    reader, writer = await asyncio.open_connection(*parse_tcp_addr(info.data_addr))
    writer.write(framing.header(framing.DEFAULT_MAX_FRAME + 1) + b"\0" * 1000)
    await writer.drain()
    n = framing.parse_header(await reader.readexactly(framing.HEADER_SIZE))
    codes["oversize_tcp"] = m.decode(await reader.readexactly(n)).code
    assert await reader.read() == b""  # then the peer hung up
    writer.close()
    stream = await node.open_stream(addr, INFERENCE_PROTOCOL)
    await node.run_trio(stream._s.write, framing.header(framing.DEFAULT_MAX_FRAME + 1))
    try:
        await asyncio.wait_for(stream.recv(), 20)
        codes["oversize_libp2p"] = "answered"
    except (EOFError, ConnectionResetError):
        codes["oversize_libp2p"] = "reset"


def test_hostile_requests_get_errors_while_an_honest_session_is_served(swarm3):
    path, peers = swarm3
    local = LocalModel.load(path)
    reference = generate(local, [5, 6, 7, 8], 60, stop_at_eos=False).tokens
    honest = {}

    def run_honest():
        model = SwarmModel(path, [p.addr for p in peers])
        try:
            honest["tokens"] = generate(model, [5, 6, 7, 8], 60, stop_at_eos=False).tokens
        finally:
            model.close()

    t = threading.Thread(target=run_honest)
    t.start()
    codes = asyncio.run(raw_requests(peers[0].addr, local.head.cfg.hidden_size))
    t.join(timeout=120)
    assert honest["tokens"] == reference
    assert codes == {
        "garbage": "bad_request", "bad_magic": "bad_request", "bad_version": "unsupported_version",
        "bad_json": "bad_request", "open_wrong_blocks": "bad_request", "open_too_long": "too_long",
        "open": "Opened", "unknown_session": "unknown_session", "gap": "bad_step", "overflow": "too_long",
        "wrong_width": "bad_step", "bad_parents": "bad_step", "bad_compact": "bad_step",
        "short_tensor": "bad_request", "good_step": "Result", "oversize_tcp": "bad_request",
        "oversize_libp2p": "reset",
    }
    assert all(p.proc.poll() is None for p in peers)  # every peer still up


def test_same_identity_file_same_peer_id(tiny, tmp_path):
    key = tmp_path / "peer.key"
    first = PeerProcess(tiny("llama2").path, (0, 8), "--identity", str(key))
    first.stop()
    second = PeerProcess(tiny("llama2").path, (0, 8), "--identity", str(key))
    second.stop()
    third = PeerProcess(tiny("llama2").path, (0, 8))
    third.stop()
    assert first.peer_id == second.peer_id != third.peer_id
    assert key.stat().st_mode & 0o077 == 0


def test_idle_sessions_expire_and_free_their_cache(tiny):
    peer = PeerProcess(tiny("llama2").path, (0, 8), "--session-timeout", "1", "--cache-tokens", "64")

    async def scenario():
        node = await P2PNode.start()
        try:
            stream = await node.open_stream(peer.addr, INFERENCE_PROTOCOL)
            sid = new_session_id()
            await stream.send(m.encode(m.Open(sid, 64, (0, 8))))
            assert isinstance(m.decode(await stream.recv()), m.Opened)
            await stream.send(m.encode(m.Open(new_session_id(), 8, (0, 8))))
            full = m.decode(await stream.recv())
            await asyncio.sleep(3)
            await stream.send(m.encode(m.Step(sid, 1, 0, torch.randn(1, 64))))
            gone = m.decode(await stream.recv())
            await stream.send(m.encode(m.Open(new_session_id(), 64, (0, 8))))
            again = m.decode(await stream.recv())
            return full, gone, again
        finally:
            await node.close()

    try:
        full, gone, again = asyncio.run(scenario())
    finally:
        peer.stop()
    assert full.code == "cache_full" and gone.code == "unknown_session" and isinstance(again, m.Opened)
