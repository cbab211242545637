"""Issue 7: sealed sessions end to end, and peers that survive hostile input.

In-process peers (BlockServers on direct TCP, one event loop) let us capture every byte handed to
the transport and inject forged frames next to an honest session; one real peer process takes the
fuzzing and the session flood.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peer.channel import new_session_id
from peer.model import BlockRange, Checkpoint, StepLayout
from peer.limits import Limits, RateLimit
from peer.server import BlockServer
from peer.tcp import TcpStream
from peer.transport import data_addrs, dial, listen_tcp, parse_tcp_addr
from protocol import crypto, framing, sealing
from protocol import messages as m
from swarm.client.background import BackgroundLoop
from swarm.client.chain import ChainSession, RemoteError
from swarm.client.config import ClientConfig
from swarm.client.route import Hop
from swarm.decode.generate import LocalModel, generate
from swarm.launch import PeerProcess
from conftest import stop_in_process

SPANS = [(0, 3), (3, 5), (5, 8)]
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


class InProcessSwarm:
    """Three peers and the client in one process, talking over direct TCP on 127.0.0.1."""

    def __init__(self, path, spans=SPANS, limits: Limits | None = None):
        self.bg = BackgroundLoop()
        ckpt = Checkpoint(path)
        self.head = ckpt.load_head()
        self.servers, self.hops, self.listeners = [], [], []
        for span in spans:
            kp = create_new_key_pair()
            pid = str(ID.from_pubkey(kp.public_key))
            server = BlockServer(ckpt.load_blocks(*span), ckpt.model_id, limits or Limits(),
                                 open_stream=lambda addr: dial(None, addr), name=pid, key_pair=kp)
            listener, addr = self.bg.run(listen_tcp(server.handle, "127.0.0.1"))
            self.servers.append(server)
            self.listeners.append(listener)
            self.hops.append(Hop(addr, pid, span))
        self.sealed, self.push = True, True
        self.chains: list[ChainSession] = []

    def session(self, max_length: int, sampling=None):
        """A `RunBlocks` over the three peers (what `generate` drives; hidden states back, never verdicts)."""
        config = ClientConfig(push=self.push, sealed=self.sealed, timeout=30)
        chain = ChainSession(lambda addr: dial(None, addr), self.hops, config)
        self.bg.run(chain.open(max_length))
        self.chains.append(chain)
        loop = self.bg.loop

        class Run:
            overlaps, verdicts = True, False

            def submit(self, hidden, layout, check=None):
                return asyncio.run_coroutine_threadsafe(chain.step(hidden, layout), loop)

            def __call__(self, hidden, layout):
                return self.submit(hidden, layout).result(60)

            def close(self):
                asyncio.run_coroutine_threadsafe(chain.close(), loop).result()
        return Run()

    def close(self):
        stop_in_process(self.bg, self.listeners, self.servers)


@pytest.fixture(scope="module")
def tiny_path(tiny):
    return tiny("llama3").path


@pytest.fixture(scope="module")
def reference(tiny_path):
    return generate(LocalModel.load(tiny_path), PROMPT, 12, stop_at_eos=False).tokens


@pytest.fixture
def capture(monkeypatch):
    """Every payload any TcpStream sends, and every hidden state any block range computes on."""
    sent: list[bytes] = []
    hidden: list[torch.Tensor] = []
    send, forward = TcpStream.send, BlockRange.forward

    async def recording_send(self, payload):
        sent.append(bytes(payload))
        await send(self, payload)

    def recording_forward(self, h, *args, **kw):
        out = forward(self, h, *args, **kw)
        hidden.extend([h.detach().clone(), out.detach().clone()])
        return out

    monkeypatch.setattr(TcpStream, "send", recording_send)
    monkeypatch.setattr(BlockRange, "forward", recording_forward)
    return sent, hidden


def leaks(sent: list[bytes], hidden: list[torch.Tensor]) -> dict[str, int]:
    """How many hidden-state rows (their first 32 fp32 bytes) and protocol fields appear in the capture."""
    wire = b"".join(sent)
    rows = [r.float().contiguous().numpy().tobytes()[:32] for h in hidden for r in h.reshape(-1, h.shape[-1])]
    ids = torch.tensor(PROMPT)
    return {
        "hidden_rows": sum(r in wire for r in rows),
        "token_ids": sum(enc in wire for enc in (ids.numpy().tobytes(), ids.int().numpy().tobytes(),
                                                  str(PROMPT).replace(" ", "").encode()[1:-1])),
        "fields": sum(f in wire for f in (b'"start"', b'"parents"', b'"next"', b'"addr"', b'"max_length"')),
    }


@pytest.mark.parametrize("push", [True, False])
def test_capture_holds_no_plaintext_and_output_equals_local(tiny_path, reference, capture, push):
    sent, hidden = capture
    swarm = InProcessSwarm(tiny_path)
    try:
        swarm.push = push
        swarm.sealed = False  # control: in plaintext the search finds everything
        assert generate(swarm, PROMPT, 12, stop_at_eos=False).tokens == reference
        plain = leaks(sent, hidden)
        sent.clear(), hidden.clear()
        swarm.sealed = True
        assert generate(swarm, PROMPT, 12, stop_at_eos=False).tokens == reference
        sealed = leaks(sent, hidden)
    finally:
        swarm.close()
    assert plain["hidden_rows"] > 50 and plain["fields"] >= 2
    assert sealed == {"hidden_rows": 0, "token_ids": 0, "fields": 0}
    assert len(hidden) == 2 * 12 * len(SPANS)  # every step of every hop was searched for
    assert all(crypto.is_envelope(p) or m.decode(p).KIND in (m.Kind.INFO, m.Kind.INFO_REPLY) for p in sent)


async def _ask(addr: str, payload: bytes):
    stream = await TcpStream.connect(*parse_tcp_addr(addr))
    try:
        await stream.send(payload)
        return m.decode(await asyncio.wait_for(stream.recv(), 10))
    finally:
        await stream.close()


def test_tampered_replayed_and_foreign_frames_are_refused(tiny_path, reference, capture):
    sent, _ = capture
    swarm = InProcessSwarm(tiny_path)
    try:
        model = LocalModel.load(tiny_path)
        honest = swarm.session(64)
        ids = torch.tensor(PROMPT)
        out = honest(model.head.embed(ids), m_layout(0, len(PROMPT)))
        chain = swarm.chains[0]
        frames = [p for p in sent if crypto.is_envelope(p)]
        step0 = next(p for p in frames if p[3] == crypto.Type.C2P and p[4:20] == bytes.fromhex(chain.ids[0]))
        link1 = next(p for p in frames if p[3] == crypto.Type.LINK)
        open0 = next(p for p in frames if p[3] == crypto.Type.OPEN)
        codes: dict[str, str] = {}

        def ask(name, payload, hop=0):
            reply = swarm.bg.run(_ask(swarm.hops[hop].addr, payload))
            codes[name] = reply.code if isinstance(reply, m.Error) else type(reply).__name__

        positions = [0, 1, 2, 3, 5, 20, 27, 28, 40, len(step0) // 2, len(step0) - 17, len(step0) - 1]
        for i in positions:  # one bit of each part: magic, version, type, channel, counter, body, tag
            bad = bytearray(step0)
            bad[i] ^= 1 << (i % 8)
            ask(f"flip{i}", bytes(bad))
        bad = bytearray(link1)
        bad[-5] ^= 4
        ask("flip_link", bytes(bad), hop=1)
        ask("replay_step", step0)
        ask("replay_link", link1, hop=1)
        ask("replay_open", open0)
        # another client's session: sealed under our own keys, or in plaintext
        ours, _ = crypto.client_handshake(swarm.servers[0].static.public, bytes.fromhex(chain.ids[0]), b"")
        step = m.Step(chain.ids[0], 9, len(PROMPT), torch.randn(1, 64))
        ours.c2p.counter = 1000  # (ahead of the honest counter: refused for its key, not as a replay)
        ask("foreign_sealed", ours.c2p.seal(sealing.pack(m.encode(step))))
        ask("foreign_plain", m.encode(step))
        ask("foreign_close", m.encode(m.Close(chain.ids[0])))
        link_out, _ = crypto.link_keys(os.urandom(32), bytes.fromhex(chain.ids[1]))
        link_out.counter = 1000
        ask("forged_link", link_out.seal(sealing.pack(m.encode(m.Result(chain.ids[1], 2, torch.randn(1, 64))))), hop=1)
        # the honest session goes on as if nothing happened, and ends like the local run
        tokens = [int(model.head.logits(out[-1:])[0].argmax())]
        for pos in range(len(PROMPT), len(PROMPT) + 11):
            h = honest(model.head.embed(torch.tensor(tokens[-1:])), m_layout(pos, 1))
            tokens.append(int(model.head.logits(h)[0].argmax()))
        honest.close()
    finally:
        swarm.close()
    assert tokens == reference
    expected = {f"flip{i}": "bad_seal" for i in positions}
    expected.update(flip0="bad_request", flip1="bad_request", flip2="unsupported_version", flip3="bad_seal",
                    flip5="unknown_session", flip_link="bad_seal", replay_step="replayed", replay_link="replayed",
                    replay_open="bad_request", foreign_sealed="bad_seal", foreign_plain="bad_seal",
                    foreign_close="bad_seal", forged_link="bad_seal")
    assert codes == expected


def m_layout(start, n):
    return StepLayout(start=start, n=n)


def test_client_rejects_a_tampered_or_replayed_reply(tiny_path, monkeypatch):
    swarm = InProcessSwarm(tiny_path, spans=[(0, 8)])
    send = TcpStream.send
    state = {"mode": None, "last": None}

    async def meddling(self, payload):
        if crypto.is_envelope(payload) and payload[3] == crypto.Type.P2C:
            if state["mode"] == "flip":
                payload = payload[:-3] + bytes([payload[-3] ^ 1]) + payload[-2:]
            elif state["mode"] == "replay" and state["last"] is not None:
                payload = state["last"]
            state["last"] = payload
        await send(self, payload)

    monkeypatch.setattr(TcpStream, "send", meddling)
    try:
        h = torch.randn(2, 64)
        for mode in ("flip", "replay"):
            run = swarm.session(16)
            state["mode"] = mode
            with pytest.raises(RemoteError) as err:
                run(h, m_layout(0, 2))
            assert err.value.code == {"flip": "bad_seal", "replay": "replayed"}[mode]
            state["mode"] = None
            run.close()
    finally:
        swarm.close()


def test_client_checks_the_peer_identity(tiny_path):
    swarm = InProcessSwarm(tiny_path, spans=[(0, 8)])
    try:
        impostor = str(ID.from_pubkey(create_new_key_pair().public_key))
        chain = ChainSession(lambda addr: dial(None, addr), [Hop(swarm.hops[0].addr, impostor, (0, 8))], ClientConfig())
        with pytest.raises(RemoteError) as err:
            swarm.bg.run(chain.open(16))
        assert err.value.code == "bad_identity"
        swarm.bg.run(chain.close())
    finally:
        swarm.close()


def test_crypto_layers():
    static = crypto.StaticKey()
    sid = bytes.fromhex(new_session_id())
    keys, first = crypto.client_handshake(static.public, sid, b"open")
    peer_keys, plain = static.accept(crypto.parse_envelope(first))
    assert plain == b"open"
    frames = [keys.c2p.seal(bytes([i])) for i in range(3)]
    assert peer_keys.c2p.open(crypto.parse_envelope(frames[1])) == b"\x01"
    for old in (frames[0], frames[1]):  # reordered, replayed
        with pytest.raises(crypto.ReplayError):
            peer_keys.c2p.open(crypto.parse_envelope(old))
    assert peer_keys.c2p.open(crypto.parse_envelope(frames[2])) == b"\x02"
    onion = keys.onion.seal_onion(b"ctl")
    assert peer_keys.onion.open_onion(onion) == b"ctl"
    with pytest.raises(crypto.ReplayError):
        peer_keys.onion.open_onion(onion)
    other = crypto.StaticKey()
    with pytest.raises(crypto.SealError):  # sealed for another peer
        other.accept(crypto.parse_envelope(first))
    kp = create_new_key_pair()
    pub, sig = crypto.sign_static_key(kp, static.public)
    pid = str(ID.from_pubkey(kp.public_key))
    assert crypto.verify_static_key(pid, pub, static.public.hex(), sig) == static.public
    with pytest.raises(crypto.SealError):
        crypto.verify_static_key(pid, pub, other.public.hex(), sig)


def test_one_codec_for_every_hop_speaks_the_sealed_wire_format(monkeypatch):
    derivations = []
    hkdf = crypto._hkdf
    monkeypatch.setattr(crypto, "_hkdf", lambda *a: derivations.append(a) or hkdf(*a))
    static, sid = crypto.StaticKey(), new_session_id()
    client = sealing.ClientHop(static.public, sid)
    with pytest.raises(crypto.SealError):  # a sealed hop begins with its Open
        client.seal(m.Close(sid))
    hello = client.seal(m.Open(sid, 16, (0, 8)))
    peer, payload = sealing.PeerHop.accept(static, crypto.parse_envelope(hello))
    assert len(derivations) == 2  # one key derivation per side and handshake
    assert peer.read(payload, 0) == (m.Open(sid, 16, (0, 8)), b"")
    step = m.Step(sid, 1, 0, torch.randn(2, 64), [-1, 0], (0, [0]))
    got, onion = peer.open(client.seal(step, b"layers"))
    assert (got.session, got.step, got.parents, got.compact, bytes(onion)) == (sid, 1, [-1, 0], (0, [0]), b"layers")
    assert torch.equal(got.hidden, step.hidden)
    # byte for byte what the protocol says: u32 length | message | onion, sealed with the c2p key
    assert sealing.unpack(peer.recv.open(crypto.parse_envelope(client.seal(step, b"x")))) == (m.encode(step), b"x")
    frame = client.seal(step)
    peer.open(frame)
    with pytest.raises(crypto.ReplayError):  # each frame opens once
        peer.open(frame)
    assert client.open(peer.seal(m.Result(sid, 1, torch.ones(1, 64))))[0].step == 1
    ctrl, inner = peer.onion.open(client.onion.seal(m.Control(sid, 2, 2), b"inner"))  # an onion layer is a codec too
    assert ctrl == m.Control(sid, 2, 2) and bytes(inner) == b"inner"
    refusal = client.open(m.encode(m.Error("bad_seal", "no")))[0]  # a plaintext refusal, marked as such
    assert refusal.message == "(unauthenticated) no"
    with pytest.raises(crypto.SealError):
        client.open(m.encode(m.Result(sid, 1, torch.ones(1, 64))))  # nothing else comes in plaintext
    plain = sealing.Plain()  # the plaintext variant: the same interface, the message's own bytes
    assert plain.seal(step) == m.encode(step) and plain.open(m.encode(m.Close(sid))) == (m.Close(sid), b"")
    with pytest.raises(crypto.SealError):
        plain.open(hello)


@pytest.mark.parametrize("push", [True, False])
def test_tree_steps_and_compaction_through_sealed_peers_equal_local(tiny_path, push):
    """A draft tree, then steps that first keep one of its paths (`StepLayout.compact`, in each later
    hop's onion layer in push mode): through three sealed peers exactly as in one process."""
    local = LocalModel.load(tiny_path).session(32)
    swarm = InProcessSwarm(tiny_path)
    try:
        swarm.push = push
        remote = swarm.session(32)
        g = torch.Generator().manual_seed(0)
        steps = [StepLayout(0, 8), StepLayout(8, 4, parents=(-1, 0, 0, 2)), StepLayout(10, 2, compact=(8, (0, 2))),
                 StepLayout(12, 3, parents=(-1, -1, 1)), StepLayout(14, 1, compact=(12, (1, 2)))]
        for layout in steps:
            hidden = torch.randn(layout.n, 64, generator=g)
            assert torch.equal(remote(hidden, layout), local.submit(hidden, layout).result())
        remote.close()
    finally:
        swarm.close()


def test_rate_limit_slows_a_flood():
    bucket = RateLimit(rate=100.0, burst=10)
    delays = [bucket.delay() for _ in range(30)]
    assert delays[:10] == [0.0] * 10 and delays[-1] > 0.15
    assert RateLimit(0, 1).delay() == 0.0


# --- a real peer process under attack --------------------------------------------------------------

def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def hardened_peer(tiny, tmp_path_factory):
    peer = PeerProcess(tiny("llama2").path, (0, 8), "--max-sessions", "8", "--max-sessions-per-client", "4",
                       "--cache-tokens", "4096", "--max-session-tokens", "256", "--frame-timeout", "1",
                       "--max-connections", "64", log_file=tmp_path_factory.mktemp("logs") / "peer.log")
    yield tiny("llama2").path, peer, data_addrs([peer.addr])[0]
    peer.stop()


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_peer", Path(__file__).parents[1] / "scripts" / "fuzz_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ_FRAMES = int(os.environ.get("SPECSWARM_FUZZ_FRAMES", "20000"))  # scripts/fuzz_peer.py runs 100 000


def test_fuzzed_peer_survives_and_serves_an_honest_generation(hardened_peer):
    path, peer, addr = hardened_peer
    from swarm.client.swarm_model import SwarmModel

    reference = generate(LocalModel.load(path), [5, 6, 7, 8], 40, stop_at_eos=False).tokens
    honest = {}

    def run_honest():
        # over libp2p: its own per-client quota
        model = SwarmModel(path, [peer.addr], ClientConfig(transport="libp2p", discovery=False))
        try:
            honest["tokens"] = generate(model, [5, 6, 7, 8], 40, stop_at_eos=False).tokens
        finally:
            model.close()

    rss0 = _rss_mib(peer.proc.pid)
    t = threading.Thread(target=run_honest)
    t.start()
    fuzzer = _load_fuzzer()
    stats = asyncio.run(fuzzer.fuzz(addr, FUZZ_FRAMES, connections=4, check_every=2500))
    t.join(120)
    assert honest.get("tokens") == reference
    assert peer.proc.poll() is None and stats["frames"] == FUZZ_FRAMES and stats["replies"] > FUZZ_FRAMES // 4
    assert _rss_mib(peer.proc.pid) - rss0 < 150
    # every fuzzer session was dropped with its connection (and the honest one when it closed: it may have still
    # been running when the fuzzer took its last count, so ask again for a few seconds)
    free, deadline = stats["free_cache_tokens_after"], time.monotonic() + 10
    while free != 4096 and time.monotonic() < deadline:
        time.sleep(0.2)
        free = asyncio.run(fuzzer.ask_info(*parse_tcp_addr(addr))).free_cache_tokens
    assert free == 4096


def test_session_flood_gets_refusals_and_slow_senders_are_dropped(hardened_peer):
    path, peer, addr = hardened_peer
    host, port = parse_tcp_addr(addr)

    async def flood():
        from protocol.crypto import client_handshake

        info = await _ask(addr, m.encode(m.Info()))
        static = bytes.fromhex(info.x25519)
        codes: dict[str, int] = {}
        streams, keys = [], {}
        for i in range(60):  # 60 connections, 5 opens each: sealed and plaintext
            s = await TcpStream.connect(host, port)
            streams.append(s)
            for j in range(5):
                sid = new_session_id()
                msg = m.Open(sid, 200, (0, 8))
                if j % 2:
                    keys[i, j], frame = client_handshake(static, bytes.fromhex(sid), sealing.pack(m.encode(msg)))
                    await s.send(frame)
                else:
                    await s.send(m.encode(msg))
        for i, s in enumerate(streams):
            for j in range(5):
                data = await asyncio.wait_for(s.recv(), 10)
                if crypto.is_envelope(data):
                    data = sealing.unpack(keys[i, j].p2c.open(crypto.parse_envelope(data)))[0]
                reply = m.decode(data)
                key = reply.code if isinstance(reply, m.Error) else type(reply).__name__
                codes[key] = codes.get(key, 0) + 1
        extra = [await TcpStream.connect(host, port) for _ in range(10)]  # beyond --max-connections 64
        refused = 0
        for s in extra:
            try:
                await s.send(m.encode(m.Info()))
                reply = m.decode(await asyncio.wait_for(s.recv(), 5))
                refused += isinstance(reply, m.Error) and reply.code == "too_many_sessions"
            except (EOFError, ConnectionError):
                refused += 1
        for s in streams + extra:
            await s.close()
        # slowloris: a header, a few bytes, then nothing: dropped after --frame-timeout (1 s)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(framing.header(1000) + b"slow")
        await writer.drain()
        t0 = time.monotonic()
        gone = await asyncio.wait_for(reader.read(), 10)
        slow = time.monotonic() - t0
        writer.close()
        await asyncio.sleep(0.5)
        after = await _ask(addr, m.encode(m.Info()))
        return codes, refused, gone, slow, after

    rss0 = _rss_mib(peer.proc.pid)
    codes, refused, gone, slow, after = asyncio.run(flood())
    assert codes == {"Opened": 4, "too_many_sessions": 296}  # --max-sessions-per-client 4 (all from 127.0.0.1)
    assert refused >= 5
    assert gone == b"" and 0.5 < slow < 5
    assert after.free_cache_tokens == 4096 and peer.proc.poll() is None
    assert _rss_mib(peer.proc.pid) - rss0 < 100


def test_require_encryption_refuses_plaintext_sessions(tiny_path):
    swarm = InProcessSwarm(tiny_path, spans=[(0, 8)], limits=Limits(require_encryption=True))
    try:
        reply = swarm.bg.run(_ask(swarm.hops[0].addr, m.encode(m.Open(new_session_id(), 16, (0, 8)))))
        assert isinstance(reply, m.Error) and reply.code == "encryption_required"
        swarm.sealed = False
        with pytest.raises(RemoteError, match="encryption_required"):
            swarm.session(16)
        swarm.sealed = True
        run = swarm.session(16)  # sealed sessions are served
        assert run(torch.randn(2, 64), m_layout(0, 2)).shape == (2, 64)
        run.close()
    finally:
        swarm.close()
