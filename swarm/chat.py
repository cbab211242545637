"""Chatting with a model through the swarm: streaming replies, a live status line, a kept conversation.

`Chat` keeps the conversation and generates each reply speculatively (or plainly) through a
`SwarmModel` or `LocalModel`, keeping the round policy it learnt from one reply to the next, and
the n-grams of its replies (`NgramMemory`: drafts recalled from them, also after old turns were trimmed). A model
with a chat template (`swarm.text.ChatTemplate`) gets its conversation as turns (system, user,
assistant), rendered anew for every reply, and its reply ends at the model's end-of-turn token; only
the assistant's text is shown. A model without one (the tiny code model) continues the raw text. The
conversation is trimmed, with a note, to what the model's context holds (the oldest turns first, the
system prompt kept). When the swarm cannot carry a reply (no peer serves some blocks, or the client's
failovers gave up) the chat does not end: it counts down, looks at the swarm again and continues the
reply where it stopped once a route exists. Ctrl-C stops the reply (or the wait) only: the chat and
the swarm stay. `Console` (swarm.console) is where a chat writes: on a terminal a dim status line at
the bottom row (tokens/s, tokens/round, route) while a reply streams and countdowns redrawn in place;
anything else (a pipe, a file) gets plain text. `run_interactive` is the REPL behind `swarm chat` and
`swarm demo` (/system TEXT /reset /stats /quit: `command`); `run_scripted` answers a list of prompts (piped
in, or --prompt), carrying out the same commands among them.

Knows decoding (`swarm.decode`), tokenizers and chat templates (`swarm.text`) and which client errors
mean "the swarm lacks peers right now" (`NoRoute`, failures a failover gave up on); nothing of
sockets, routes' planning or peers.
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tokenizers import Tokenizer

from swarm.client.chain import RemoteError
from swarm.client.route import NoRoute
from swarm.console import Console
from swarm.decode.generate import generate
from swarm.decode.ngram import NgramMemory
from swarm.decode.round_policy import CostModel
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel, Model
from swarm.text import ChatTemplate, TextStream

RETRY_SECONDS = 5.0  # between looks at a swarm that cannot carry a reply
STATUS_EVERY = 0.1  # seconds between redraws of the status line
PERMANENT = {"wrong_model", "unsupported_version", "encryption_required"}  # refusals no wait will change
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


class EndOfTurn(Exception):
    """The reply reached an end-of-turn token that the model's config.json does not stop at: it ends here."""


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
    memory: NgramMemory = field(default_factory=NgramMemory)  # earlier replies' n-grams, drafted from
    seed: int = 0  # reply i samples with seed + i
    console: Console | None = None  # notes, countdowns and the status line (None: silent)
    retry_seconds: float = RETRY_SECONDS
    template: ChatTemplate | None = None  # the model's chat template: a conversation of turns (None: raw text)
    system: str | None = None  # the system prompt (with a template; None: the template's own default, if any)
    turns: list[dict] = field(default_factory=list)  # user and assistant turns, oldest first (with a template)

    @property
    def where(self) -> str:
        route = getattr(self.model, "route", None)
        return " -> ".join(f"…{h.peer_id[-6:]}[{h.blocks[0]}:{h.blocks[1]}]" for h in route) if route else "local"

    def _note(self, text: str) -> None:
        if self.console is not None:
            self.console.line(text)

    def _budget(self) -> tuple[int, int]:
        """(the model's context, the prompt tokens that leave room in it for a whole reply)."""
        context = self.model.head.cfg.max_position_embeddings
        return context, max(1, context - min(self.max_new_tokens, context // 2))

    def _fit(self, tokens: list[int]) -> list[int]:
        """The conversation trimmed so that a whole reply still fits in the model's context (with a note)."""
        context, keep = self._budget()
        if len(tokens) <= keep:
            return tokens
        self._note(f"(conversation trimmed to the last {keep} tokens: the model's context is {context})")
        return tokens[-keep:]

    def _prompt(self, text: str) -> list[int]:
        """The next reply's prompt: the conversation with `text` added, trimmed to the context. With a
        template the turns are rendered anew and the oldest dropped first (the system prompt stays)."""
        if self.template is None:
            self.history = self._fit(self.history + self.tokenizer.encode(text).ids)
            return self.history
        self.turns.append({"role": "user", "content": text.rstrip("\n")})
        context, keep = self._budget()
        trimmed = False
        while len(ids := self._render()) > keep and len(self.turns) > 1:
            del self.turns[0]
            while len(self.turns) > 1 and self.turns[0]["role"] != "user":
                del self.turns[0]
            trimmed = True
        if len(ids) > keep:  # the last message alone is too long: keep its end (and the reply's start)
            ids, trimmed = ids[-keep:], True
        if trimmed:
            self._note(f"(conversation trimmed to the last {len(ids)} tokens: the model's context is {context})")
        return ids

    def _render(self) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        text = self.template.render(system + self.turns, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def reply(self, text: str, on_text=None) -> str:
        """Continue the conversation with `text`; streams decoded text to on_text(piece). While the swarm
        cannot carry the reply it waits (a countdown) and continues it where it stopped; Ctrl-C stops
        the reply (or the wait), never the chat."""
        prompt = self._prompt(text)
        stream = TextStream(self.tokenizer, on_text)
        t0, batches, shown, waited, ended = time.perf_counter(), [0], [0.0], 0.0, []
        stop = set(self.template.stop_ids) if self.template is not None else set()
        beyond = stop - set(self.model.head.cfg.eos_token_ids)  # end-of-turn tokens generate() does not stop at

        def on_tokens(tokens: list[int]) -> None:
            cut = next((i for i, t in enumerate(tokens) if t in stop), None)
            stream.add(tokens if cut is None else tokens[:cut])  # the end-of-turn token itself is not shown
            if cut is not None:
                ended.append(tokens[cut])
                if tokens[cut] in beyond:
                    raise EndOfTurn
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
                    self._generate(prompt + stream.tokens, self.max_new_tokens - len(stream.tokens), on_tokens)
                    break
                except EndOfTurn:
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
        self.stats.tokens += len(stream.tokens) + len(ended)
        self.stats.seconds += time.perf_counter() - t0 - waited
        self.history = prompt + stream.tokens + ended
        if self.template is not None:
            self.turns.append({"role": "assistant", "content": stream.text})
        return stream.text

    def _generate(self, prompt: list[int], max_new_tokens: int, on_tokens) -> None:
        """One generation; the round policy it learns in is a copy, kept only if the generation ends
        (one stopped by Ctrl-C may have stopped in the middle of updating it)."""
        res = generate(self.model, prompt, max_new_tokens, self.params, draft=self.draft,
                       spec=self.spec if self.draft is not None else None, seed=self.seed + self.stats.replies,
                       on_tokens=on_tokens, policy=copy.deepcopy(self.policy), memory=self.memory)
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
        self.history, self.turns = [], []

    def set_system(self, text: str) -> None:
        """A new system prompt (empty: the template's default) and a fresh conversation."""
        self.system = text or None
        self.reset()


def run_interactive(chat: Chat, out=None) -> None:
    """The REPL. Ctrl-C stops a reply; at the prompt it says how to leave, and a second one in a row leaves."""
    try:
        import readline  # noqa: F401 - line editing and history for input(); signals wake it, too
    except ImportError:
        pass
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        # started as a background job of a non-interactive shell (which ignores SIGINT, and Python then
        # keeps it ignored): at a prompt on a terminal, Ctrl-C must still stop a reply
        signal.signal(signal.SIGINT, signal.default_int_handler)
    console = chat.console = Console(out) if out is not None or chat.console is None else chat.console
    kind = "a message" if chat.template is not None else "a prompt (a code model: it continues your text)"
    console.line(f"specswarm chat — route {chat.where}. Type {kind}. /system TEXT /reset /stats /quit; "
                 "Ctrl-C stops a reply.")
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
        done = command(chat, line, console)
        if done == "quit":
            return
        if done:
            continue
        before = chat.stats.tokens, chat.stats.seconds, chat.stats.rounds
        chat.reply(line.replace("\\n", "\n") + "\n", on_text=console.write)
        tokens = chat.stats.tokens - before[0]
        seconds = chat.stats.seconds - before[1]
        rounds = chat.stats.rounds - before[2]
        per_round = f", {tokens / rounds:.2f} tokens/round" if rounds else ""
        console.line(f"[{tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s{per_round}, route {chat.where}]")


def command(chat: Chat, line: str, console: Console) -> str | None:
    """Carry out `line` if it is one of the chat's commands (/system TEXT, /reset, /stats, /quit or /exit):
    "quit" to leave, "done" for the others, None for a prompt (anything else)."""
    text = line.strip()
    head, _, rest = text.partition(" ")
    if text in ("/quit", "/exit"):
        return "quit"
    if text == "/reset":
        chat.reset()
        console.line("(conversation forgotten)")
    elif text == "/stats":
        console.line(chat.stats.line())
    elif head == "/system":
        _system(chat, rest.strip(), console)
    else:
        return None
    return "done"


def _system(chat: Chat, text: str, console: Console) -> None:
    if chat.template is None:
        console.line("(this model has no chat template, so no system prompt: it continues your text)")
        return
    chat.set_system(text)
    console.line(f"(system prompt {'set' if text else 'back to the template default'}; conversation forgotten)")


def run_scripted(chat: Chat, prompts: list[str], out=None) -> None:
    """Answer `prompts` one after the other, as if typed: the chat's commands among them are carried out
    (/quit ends the run there)."""
    console = chat.console = Console(out) if out is not None or chat.console is None else chat.console
    for prompt in prompts:
        console.write(f">>> {prompt}\n")
        done = command(chat, prompt, console)
        if done == "quit":
            return
        if done:
            continue
        chat.reply(prompt.replace("\\n", "\n") + "\n", on_text=console.write)  # as if typed, Enter included
        console.line(f"[{chat.stats.line()}, route {chat.where}]")
