"""Chatting with a model through the swarm: streaming replies, a live status line, a kept conversation.

`Chat` holds the conversation as tokens and generates each reply speculatively (or plainly) through
a `SwarmModel` or `LocalModel`, keeping the round policy it learnt from one reply to the next. The
conversation is trimmed, with a note, to what the model's context holds. When the swarm cannot carry
a reply (no peer serves some blocks, or the client's failovers gave up) the chat does not end: it
counts down, looks at the swarm again and continues the reply where it stopped once a route exists.
Ctrl-C stops the reply (or the wait) only: the chat and the swarm stay. `Console` is where a chat
writes: on a terminal a dim status line at the bottom row (tokens/s, tokens/round, route) while a
reply streams and countdowns redrawn in place; anything else (a pipe, a file) gets plain text.
`run_interactive` is the REPL behind `swarm chat` and `swarm demo` (/reset /stats /quit);
`run_scripted` answers a list of prompts (piped in, or --prompt).

Knows decoding (`swarm.decode`), tokenizers and which client errors mean "the swarm lacks peers right
now" (`NoRoute`, failures a failover gave up on); nothing of sockets, routes' planning or peers.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tokenizers import Tokenizer

from swarm.client.chain import RemoteError
from swarm.client.route import NoRoute
from swarm.decode.generate import generate
from swarm.decode.round_policy import CostModel
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel, Model
from swarm.text import TextStream

RETRY_SECONDS = 5.0  # between looks at a swarm that cannot carry a reply
STATUS_EVERY = 0.1  # seconds between redraws of the status line
PERMANENT = {"wrong_model", "unsupported_version", "encryption_required"}  # refusals no wait will change
DIM, PLAIN = "\033[2m", "\033[0m"
T = TypeVar("T")


def swarm_lacks_peers(error: BaseException) -> bool:
    """Whether `error` means the swarm cannot carry the request right now (waiting may help): no route,
    or a peer or the network failing after the client's own failovers, short of a permanent refusal."""
    if isinstance(error, NoRoute):
        return True
    return isinstance(error, (RemoteError, OSError, EOFError)) and getattr(error, "code", None) not in PERMANENT


def why(error: BaseException) -> str:
    missing = getattr(error, "missing", None)
    if missing:
        return "no peer serves blocks " + ", ".join(f"[{a}, {b})" for a, b in missing) + " right now"
    return f"the swarm cannot carry this right now ({error})"


class Console:
    """Where a chat writes. On a terminal (`live`): a status line fenced off at the bottom row (a
    scroll region keeps the streamed text above it) and countdowns redrawn in place, dim. Elsewhere:
    plain text, one line per note, no escape codes."""

    def __init__(self, out=None, live: bool | None = None):
        self.out = out if out is not None else sys.stdout
        self.live = _isatty(self.out) if live is None else live
        self.at_line_start = True
        self._rows = 0  # the terminal's height while the status line is shown

    def write(self, text: str) -> None:
        if text:
            self._raw(text)
            self.at_line_start = text.endswith("\n")

    def _raw(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str) -> None:
        """`text` on a line of its own (dim on a terminal)."""
        self.write(("" if self.at_line_start else "\n") + (f"{DIM}{text}{PLAIN}" if self.live else text) + "\n")

    def status_on(self) -> None:
        """Show a status line at the bottom row until `status_off` (terminals only)."""
        rows = _size(self.out)[0] if self.live else 0
        if rows < 4 or self._rows:
            return
        if not self.at_line_start:
            self.write("\n")
        self._rows = rows  # a newline and back up (scrolls if at the bottom), then fence the last row off
        self._raw(f"\n\033[1A\0337\033[1;{rows - 1}r\0338")

    def status(self, text: str) -> None:
        if not self._rows:
            return
        rows, cols = _size(self.out)
        if rows != self._rows and rows >= 4:  # the terminal was resized: fence the new last row off
            self._raw(f"\0337\033[1;{rows - 1}r\0338")
            self._rows = rows
        self._raw(f"\0337\033[{self._rows};1H\033[2K{DIM}{text[:max(cols - 1, 1)]}{PLAIN}\0338")

    def status_off(self) -> None:
        if self._rows:
            self._raw(f"\0337\033[{self._rows};1H\033[2K\033[r\0338")
            self._rows = 0

    def countdown(self, reason: str, seconds: float, give_up: str) -> None:
        """Wait `seconds`, saying why and how long (redrawn each second on a terminal); Ctrl-C ends it."""
        end = time.monotonic() + seconds
        if not self.live:
            self.line(f"{reason}; retrying in {seconds:.0f} s… (Ctrl-C to {give_up})")
            time.sleep(seconds)
            return
        if not self.at_line_start:
            self.write("\n")
        try:
            while (left := end - time.monotonic()) > 0:
                text = f"{reason}; retrying in {math.ceil(left)} s… (Ctrl-C to {give_up})"
                self._raw(f"\r\033[K{DIM}{text[:max(_size(self.out)[1] - 1, 1)]}{PLAIN}")
                time.sleep(left - math.ceil(left) + 1)  # wake as the shown number changes
        finally:
            self._raw("\r\033[K")


def _isatty(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _size(out) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(out.fileno())
        return size.lines, size.columns
    except (AttributeError, ValueError, OSError):
        return 0, 80


def wait_for_swarm(attempt: Callable[[], T], console: Console, give_up: str = "quit",
                   seconds: float = RETRY_SECONDS) -> T:
    """attempt() until it stops failing for lack of peers, with a countdown between tries."""
    while True:
        try:
            return attempt()
        except Exception as e:  # anything else goes up as it is
            if not swarm_lacks_peers(e):
                raise
            console.countdown(why(e), seconds, give_up)


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
    seed: int = 0  # reply i samples with seed + i
    console: Console | None = None  # notes, countdowns and the status line (None: silent)
    retry_seconds: float = RETRY_SECONDS

    @property
    def where(self) -> str:
        route = getattr(self.model, "route", None)
        return " -> ".join(f"…{h.peer_id[-6:]}[{h.blocks[0]}:{h.blocks[1]}]" for h in route) if route else "local"

    def _note(self, text: str) -> None:
        if self.console is not None:
            self.console.line(text)

    def _fit(self, tokens: list[int]) -> list[int]:
        """The conversation trimmed so that a whole reply still fits in the model's context (with a note)."""
        context = self.model.head.cfg.max_position_embeddings
        keep = max(1, context - min(self.max_new_tokens, context // 2))
        if len(tokens) <= keep:
            return tokens
        self._note(f"(conversation trimmed to the last {keep} tokens: the model's context is {context})")
        return tokens[-keep:]

    def reply(self, text: str, on_text=None) -> str:
        """Continue the conversation with `text`; streams decoded text to on_text(piece). While the swarm
        cannot carry the reply it waits (a countdown) and continues it where it stopped; Ctrl-C stops
        the reply (or the wait), never the chat."""
        self.history = self._fit(self.history + self.tokenizer.encode(text).ids)
        stream = TextStream(self.tokenizer, on_text)
        t0, batches, shown, waited = time.perf_counter(), [0], [0.0], 0.0

        def on_tokens(tokens: list[int]) -> None:
            stream.add(tokens)
            batches[0] += 1
            now = time.perf_counter()
            if self.console is not None and now - shown[0] >= STATUS_EVERY:
                shown[0] = now
                self.console.status(self._status(len(stream.tokens), now - t0 - waited, batches[0]))

        if self.console is not None:
            self.console.status_on()
        try:
            while len(stream.tokens) < self.max_new_tokens:
                try:
                    self._generate(self.history + stream.tokens, self.max_new_tokens - len(stream.tokens), on_tokens)
                    break
                except Exception as e:
                    if not swarm_lacks_peers(e):
                        raise
                    began = time.perf_counter()
                    try:
                        self._wait_for_swarm(e)
                    finally:
                        waited += time.perf_counter() - began  # (not the reply's time: tokens/s stays true)
        except KeyboardInterrupt:
            if on_text:
                on_text(" [stopped]")
        finally:
            if self.console is not None:
                self.console.status_off()
        self.stats.replies += 1
        self.stats.tokens += len(stream.tokens)
        self.stats.seconds += time.perf_counter() - t0 - waited
        self.history += stream.tokens
        return stream.text

    def _generate(self, prompt: list[int], max_new_tokens: int, on_tokens) -> None:
        """One generation; the round policy it learns in is a copy, kept only if the generation ends
        (one stopped by Ctrl-C may have stopped in the middle of updating it)."""
        res = generate(self.model, prompt, max_new_tokens, self.params, draft=self.draft,
                       spec=self.spec if self.draft is not None else None, seed=self.seed + self.stats.replies,
                       on_tokens=on_tokens, policy=copy.deepcopy(self.policy))
        if self.draft is not None:
            self.policy = res.policy
            self.stats.rounds += res.rounds
            self.stats.drafted += res.drafted
            self.stats.accepted += res.accepted

    def _wait_for_swarm(self, error: Exception) -> None:
        """Count down, look at the swarm again (a fresh route), and again, until a route exists."""
        if self.console is not None:
            self.console.status("waiting for the swarm…")
        replan = getattr(self.model, "replan", None)
        while True:
            if self.console is not None:
                self.console.countdown(why(error), self.retry_seconds, "give up on this reply")
            else:
                time.sleep(self.retry_seconds)
            if replan is None:
                return
            try:
                replan()
            except Exception as e:
                if not swarm_lacks_peers(e):
                    raise
                error = e
                continue
            self._note(f"(the swarm carries the model again, route {self.where}: continuing)")
            return

    def _status(self, tokens: int, seconds: float, batches: int) -> str:
        per_round = f" · {tokens / batches:.2f} tokens/round" if self.draft is not None and batches else ""
        return f"{tokens} tokens · {tokens / max(seconds, 1e-9):.1f} tokens/s{per_round} · route {self.where}"

    def reset(self) -> None:
        self.history = []


def run_interactive(chat: Chat, out=None) -> None:
    """The REPL. Ctrl-C stops a reply; at the prompt it says how to leave, and a second one in a row leaves."""
    try:
        import readline  # noqa: F401 - line editing and history for input(); signals wake it, too
    except ImportError:
        pass
    console = chat.console = Console(out) if out is not None or chat.console is None else chat.console
    console.line(f"specswarm chat — route {chat.where}. Type a prompt (a code model: it continues your text). "
                 "/reset /stats /quit; Ctrl-C stops a reply.")
    leaving = False
    while True:
        try:
            line = input("\n>>> ")
        except EOFError:
            console.write("\n")
            return
        except KeyboardInterrupt:
            console.at_line_start = False
            if leaving:
                console.write("\n")
                return
            leaving = True
            console.line("(Ctrl-C again, Ctrl-D or /quit to leave)")
            continue
        leaving, console.at_line_start = False, True
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            chat.reset()
            console.line("(conversation forgotten)")
            continue
        if line.strip() == "/stats":
            console.line(chat.stats.line())
            continue
        before = chat.stats.tokens, chat.stats.seconds, chat.stats.rounds
        chat.reply(line.replace("\\n", "\n") + "\n", on_text=console.write)
        tokens = chat.stats.tokens - before[0]
        seconds = chat.stats.seconds - before[1]
        rounds = chat.stats.rounds - before[2]
        per_round = f", {tokens / rounds:.2f} tokens/round" if rounds else ""
        console.line(f"[{tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s{per_round}, route {chat.where}]")


def run_scripted(chat: Chat, prompts: list[str], out=None) -> None:
    console = chat.console = Console(out) if out is not None or chat.console is None else chat.console
    for prompt in prompts:
        console.write(f">>> {prompt}\n")
        chat.reply(prompt.replace("\\n", "\n") + "\n", on_text=console.write)  # as if typed, Enter included
        console.line(f"[{chat.stats.line()}, route {chat.where}]")
