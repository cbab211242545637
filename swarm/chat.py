"""Chatting with a model through the swarm: streaming replies, a live status line, a kept conversation.

`Chat` holds the conversation as tokens and generates each reply speculatively (or plainly) through
a `SwarmModel` or `LocalModel`, keeping the round policy it learnt from one reply to the next. `run_interactive` is the REPL behind `swarm chat` and `swarm demo`:
/reset forgets the conversation, /stats prints the session's numbers, /quit leaves, Ctrl-C stops a
reply without ending the chat. `run_scripted` answers a list of prompts (scripts/chat.py, no tty).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from swarm.decode.generate import generate
from swarm.decode.round_policy import CostModel
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel, Model
from swarm.text import TextStream


@dataclass
class ChatStats:
    replies: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def line(self) -> str:
        tps = self.tokens / self.seconds if self.seconds else 0.0
        per_round = f", {self.tokens / self.rounds:.2f} tokens/round" if self.rounds else ""
        acc = f", acceptance {self.accepted / self.drafted:.0%}" if self.drafted else ""
        return f"{self.replies} replies, {self.tokens} tokens in {self.seconds:.1f} s, {tps:.1f} tokens/s{per_round}{acc}"


@dataclass
class Chat:
    model: Model  # SwarmModel or LocalModel
    tokenizer: Tokenizer
    draft: LocalModel | None = None  # None: plain decoding
    spec: SpecConfig = field(default_factory=SpecConfig)
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    history: list[int] = field(default_factory=list)
    stats: ChatStats = field(default_factory=ChatStats)
    policy: CostModel | None = None  # the round policy, carried from reply to reply

    @property
    def where(self) -> str:
        route = getattr(self.model, "route", None)
        return " -> ".join(f"…{h.peer_id[-6:]}[{h.blocks[0]}:{h.blocks[1]}]" for h in route) if route else "local"

    def reply(self, text: str, on_text=None) -> str:
        """Continue the conversation with `text`; streams decoded text to on_text(piece)."""
        context = self.model.head.cfg.max_position_embeddings - self.max_new_tokens - 2 * self.spec.k_max - 2
        self.history = (self.history + self.tokenizer.encode(text).ids)[-max(1, context):]
        stream = TextStream(self.tokenizer, on_text)
        t0 = time.perf_counter()
        try:
            res = generate(self.model, self.history, self.max_new_tokens, self.params, draft=self.draft,
                           spec=self.spec if self.draft is not None else None, on_tokens=stream.add,
                           policy=self.policy)
            if self.draft is not None:
                self.policy = res.policy
                self.stats.rounds += res.rounds
                self.stats.drafted += res.drafted
                self.stats.accepted += res.accepted
        except KeyboardInterrupt:
            if on_text:
                on_text(" [stopped]")
        self.stats.replies += 1
        self.stats.tokens += len(stream.tokens)
        self.stats.seconds += time.perf_counter() - t0
        self.history += stream.tokens
        return stream.text

    def reset(self) -> None:
        self.history = []


def run_interactive(chat: Chat, out=sys.stdout) -> None:
    print(f"specswarm chat — route {chat.where}. Type a prompt (a code model: it continues your text). "
          "/reset /stats /quit; Ctrl-C stops a reply.", file=out)
    while True:
        try:
            line = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            chat.reset()
            print("(conversation forgotten)", file=out)
            continue
        if line.strip() == "/stats":
            print(chat.stats.line(), file=out)
            continue
        before = chat.stats.tokens, chat.stats.seconds, chat.stats.rounds
        chat.reply(line.replace("\\n", "\n") + "\n", on_text=lambda piece: (out.write(piece), out.flush()))
        tokens = chat.stats.tokens - before[0]
        seconds = chat.stats.seconds - before[1]
        rounds = chat.stats.rounds - before[2]
        per_round = f", {tokens / rounds:.2f} tokens/round" if rounds else ""
        print(f"\n\033[2m[{tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s{per_round}, route {chat.where}]\033[0m",
              file=out)


def run_scripted(chat: Chat, prompts: list[str], out=sys.stdout) -> None:
    for prompt in prompts:
        print(f">>> {prompt}", file=out)
        chat.reply(prompt, on_text=lambda piece: (out.write(piece), out.flush()))
        print(f"\n[{chat.stats.line()}, route {chat.where}]", file=out)
