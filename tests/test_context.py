"""Issue 13: the model's context (`max_position_embeddings`, 256 for the tiny checkpoints) bounds every
generation, local or through peers, plain or speculative.

A prompt longer than the context is refused before anything is sent ("prompt too long for this model
(N > M)"); a reply that would run past the context stops at it (finish reason "length"); no session
asks for more positions than the context and no step reaches past its session. A peer refuses a
session past the context (`too_long`), and the client takes that as the request's fault: a
`ContextTooLong`, never a ban or a failover.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from conftest import make_checkpoint
from peer.channel import new_session_id
from peer.limits import Limits
from peer.model import Checkpoint, ContextTooLong, StepLayout
from peer.server import BlockServer
from peer.transport import dial, listen_tcp
from protocol import messages as m
from swarm.client.background import BackgroundLoop
from swarm.client.chain import ChainSession, RemoteError
from swarm.client.config import ClientConfig
from swarm.client.route import Hop
from swarm.decode.generate import generate
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel

CONTEXT = 256


def ids(n: int) -> list[int]:
    return [2 + (7 * i) % 300 for i in range(n)]


def too_long(n: int) -> str:
    return re.escape(f"prompt too long for this model ({n} > {CONTEXT})")


@pytest.fixture(scope="module")
def path(tiny):
    return tiny("llama2").path


@pytest.fixture(scope="module")
def target(path):
    return LocalModel.load(path)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    return LocalModel.load(make_checkpoint(tmp_path_factory.mktemp("draft"), "llama2", seed=11,
                                           num_hidden_layers=2).path)


class Watched:
    """A model whose sessions are watched: the lengths asked for and the furthest position any step reached."""

    def __init__(self, model):
        self.model, self.head = model, model.head
        self.lengths: list[int] = []
        self.reach = 0

    def session(self, max_length: int, sampling=None):
        self.lengths.append(max_length)
        inner, watched = self.model.session(max_length, sampling), self

        class Session:
            overlaps, verdicts = inner.overlaps, inner.verdicts

            def submit(self, hidden, layout, check=None):
                watched.reach = max(watched.reach, layout.start + layout.n)
                return inner.submit(hidden, layout, check)

            def close(self):
                inner.close()
        return Session()


def test_a_prompt_longer_than_the_context_is_refused_before_anything_runs(target, draft):
    watched = Watched(target)
    for kw in ({}, dict(draft=draft, spec=SpecConfig(k=4))):
        with pytest.raises(ValueError, match=too_long(257)) as e:
            generate(watched, ids(257), 10, **kw)
        assert isinstance(e.value, ContextTooLong) and (e.value.length, e.value.context) == (257, CONTEXT)
    assert watched.lengths == []  # refused before any session was opened
    with pytest.raises(ContextTooLong, match=re.escape("session too long for this model (257 > 256)")):
        target.session(CONTEXT + 1)
    with pytest.raises(ContextTooLong):
        target.blocks.new_cache(CONTEXT + 1)
    target.session(CONTEXT).close()


@pytest.mark.parametrize("prompt_len", [200, 250, 255, 256])
def test_a_plain_reply_stops_at_the_context(target, prompt_len):
    watched = Watched(target)
    res = generate(watched, ids(prompt_len), 100, stop_at_eos=False)
    assert len(res.tokens) == CONTEXT - prompt_len and res.stopped_by == "length"
    assert watched.lengths == [CONTEXT] and watched.reach == max(prompt_len, CONTEXT - 1)  # the last token: never fed
    if prompt_len < CONTEXT:  # the same tokens as a generation that asked for exactly what fits
        assert res.tokens == generate(target, ids(prompt_len), CONTEXT - prompt_len, stop_at_eos=False).tokens


SPECS = {"k4": SpecConfig(k=4, pipeline=False), "adaptive-pipelined": SpecConfig(pipeline=True),
         "tree3": SpecConfig(tree_width=3, pipeline=False), "fixed-tree": SpecConfig(k=5, tree_width=2)}


@pytest.mark.parametrize("mode", SPECS)
def test_a_speculative_reply_stops_at_the_context_and_no_step_passes_it(target, draft, mode):
    """Trees near the end would need more cache slots than the context has: they give way to chains."""
    prompt = ids(230)
    reference = generate(target, prompt, CONTEXT - 230, stop_at_eos=False).tokens
    watched = Watched(target)
    res = generate(watched, prompt, 60, draft=draft, spec=SPECS[mode], stop_at_eos=False)
    assert res.tokens == reference and res.stopped_by == "length"
    assert max(watched.lengths) <= CONTEXT and watched.reach <= CONTEXT
    assert res.drafted > 0
    if mode.startswith("tree"):
        assert res.tree_rounds > 0


def test_a_draft_with_a_shorter_context_stops_drafting_at_it(target, tmp_path):
    short = LocalModel.load(make_checkpoint(tmp_path / "short", "llama2", seed=11, num_hidden_layers=2,
                                            max_position_embeddings=128).path)
    prompt = ids(100)
    res = generate(target, prompt, 80, draft=short, spec=SpecConfig(k=4, pipeline=False), stop_at_eos=False)
    assert res.tokens == generate(target, prompt, 80, stop_at_eos=False).tokens
    assert res.drafted > 0 and res.ks[-1] == 0  # past the draft's context: plain steps


@pytest.fixture(scope="module")
def peer(path):
    """One in-process peer serving every block on direct TCP."""
    bg, ckpt, kp = BackgroundLoop(), Checkpoint(path), create_new_key_pair()
    pid = str(ID.from_pubkey(kp.public_key))
    server = BlockServer(ckpt.load_blocks(0, 8), ckpt.model_id, Limits(), name=pid, key_pair=kp)
    listener, addr = bg.run(listen_tcp(server.handle, "127.0.0.1"))
    yield bg, server, Hop(addr, pid, (0, 8))

    async def stop():
        listener.close()

    bg.run(stop())
    bg.run(server.close())
    bg.close()


def test_a_peer_refuses_a_session_past_the_context(peer):
    bg, server, hop = peer

    async def ask(max_length: int):
        stream = await dial(None, hop.addr)
        try:
            await stream.send(m.encode(m.Open(new_session_id(), max_length, (0, 8))))
            return m.decode(await stream.recv())
        finally:
            await stream.close()

    refused = bg.run(ask(CONTEXT + 44))
    assert isinstance(refused, m.Error) and refused.code == m.ErrorCode.TOO_LONG == "too_long"
    assert "300" in refused.message and "256" in refused.message and refused.message.endswith("(300 > 256)")
    assert isinstance(bg.run(ask(CONTEXT)), m.Opened)


@pytest.mark.parametrize("sealed", [True, False])
def test_a_client_that_skips_the_check_gets_context_too_long(peer, sealed):
    """Opening past the context, or stepping past the session: the peer's too_long is ContextTooLong,
    not a RemoteError (which the client would fail over from)."""
    bg, server, hop = peer
    config = ClientConfig(sealed=sealed, timeout=20)

    chain = ChainSession(lambda addr: dial(None, addr), [hop], config)
    with pytest.raises(ContextTooLong, match=re.escape("(300 > 256)")) as e:
        bg.run(chain.open(300))
    assert not isinstance(e.value, RemoteError) and (e.value.length, e.value.context) == (300, CONTEXT)
    bg.run(chain.close())

    chain = ChainSession(lambda addr: dial(None, addr), [hop], config)
    bg.run(chain.open(16))
    hidden = torch.randn(20, server.blocks.cfg.hidden_size)
    with pytest.raises(ContextTooLong, match=re.escape("(20 > 16)")):
        bg.run(chain.step(hidden, StepLayout(0, 20)))
    bg.run(chain.close())


def test_a_false_too_long_is_a_peer_failure_when_the_client_knows_the_context(peer, monkeypatch):
    """A peer that claims too_long for a session within the model's context is wrong or lying (a way to end
    sessions without being banned): a client that knows the context treats it as any other peer error."""
    from protocol.messages import ProtocolError

    bg, server, hop = peer

    def lie(*args, **kwargs):
        raise ProtocolError(m.ErrorCode.TOO_LONG, "session too long for this model (100 > 50)")

    monkeypatch.setattr(server, "_open", lie)
    chain = ChainSession(lambda addr: dial(None, addr), [hop], ClientConfig(sealed=False, timeout=20), CONTEXT)
    with pytest.raises(RemoteError, match="too_long"):
        bg.run(chain.open(100))
    bg.run(chain.close())


# --- through a real swarm (peer processes) -----------------------------------------------------------

@pytest.fixture(scope="module")
def swarm(path, tmp_path_factory):
    from swarm.launch import start_peers

    peers = start_peers(path, [(0, 4), (4, 8)], log_dir=tmp_path_factory.mktemp("logs"))
    yield peers
    for p in peers:
        p.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.cli", "generate", *args], capture_output=True, text=True,
                          timeout=180)


def test_cli_refuses_a_prompt_too_long_in_one_line(path, swarm):
    from swarm.text import load_tokenizer

    text = "the quick brown fox jumps over the lazy dog " * 60
    n = len(load_tokenizer(path).encode(text).ids)
    assert n > CONTEXT
    for where in (["--local"], ["--initial-peers", *[p.addr for p in swarm]]):
        out = cli("--model", str(path), *where, "--prompt", text, "--no-speculative")
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [f"swarm generate: error: prompt too long for this model "
                                                   f"({n} > {CONTEXT})"]
    assert all(p.proc.poll() is None for p in swarm)


def test_cli_stops_a_reply_at_the_context(path):
    from swarm.text import load_tokenizer

    tokenizer = load_tokenizer(path)
    words = 1
    while len(tokenizer.encode("fox " * (words + 1)).ids) <= CONTEXT - 10:
        words += 1
    text = "fox " * words
    n = len(tokenizer.encode(text).ids)
    out = cli("--model", str(path), "--local", "--prompt", text, "--max-new-tokens", "100", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["prompt_tokens"] == n and result["new_tokens"] == CONTEXT - n and result["stopped_by"] == "length"


def test_swarm_too_long_is_no_failover_and_the_next_generation_works(path, swarm, target, draft):
    from swarm.client.swarm_model import SwarmModel

    model = SwarmModel(path, [p.addr for p in swarm], ClientConfig(timeout=20))
    try:
        with pytest.raises(ValueError, match=too_long(300)):
            generate(model, ids(300), 10)
        with pytest.raises(ContextTooLong):  # past the client's check: the peers refuse, too_long
            model.session(CONTEXT + 1)
        assert model.banned == {} and model.failovers == 0
        prompt = ids(240)
        reference = generate(target, prompt, CONTEXT - 240, stop_at_eos=False).tokens
        res = generate(model, prompt, 50, stop_at_eos=False)
        assert res.tokens == reference and res.stopped_by == "length"
        res = generate(model, prompt, 50, draft=draft, spec=SpecConfig(pipeline=True), stop_at_eos=False)
        assert res.tokens == reference
        assert model.banned == {} and model.failovers == 0
    finally:
        model.close()
