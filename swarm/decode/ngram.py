"""Drafting from the text itself: an n-gram index over the prompt and everything generated so far.

Code and chat repeat themselves (names, signatures, the prompt's own lines), so the continuation of the
longest suffix of the text that occurred before is often the target's next tokens (prompt lookup
decoding; SuffixDecoding, REST). `NgramIndex` keeps, for every n-gram of order n_min..n_max in the
sequence, the tokens that followed it (how often each, and where last); `extend` indexes committed
tokens as they come, O(n_max^2) work per token and never a rescan of the sequence. `propose` walks
from the end of a context: it matches the longest suffix that has a recorded continuation, takes the
continuation (the most recent one, or the most frequent), appends it and matches again, up to k
tokens. Each token comes with its `Score` (the order matched, how often that continuation followed,
out of how many) for the round policy to calibrate. `branch` is the walk the proposal did not take:
at its first token whose n-gram was followed by others too, the runner-up and what continues it (a
sibling branch). `graft` fuses such a proposal into a draft tree: the part that agrees with the
tree's first tokens is shared, only the rest becomes a new branch.

`NgramMemory` is the same index over earlier generations (their prompts and outputs, each a document of
its own), shared by a client's generations (SuffixDecoding's global tree): answers to similar requests
repeat each other's phrases. An index given a memory takes, token by token, the longer of its own match
and the memory's (its own on a tie), and marks the memory's as `recalled`. The memory keeps the newest
`max_tokens` tokens of documents; a lock makes it safe to share between generations running at once.

Knows token ids only: nothing of models, tensors, peers or tokenizers.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

MODES = ("recent", "frequent")
SEPARATOR = -1  # between the memory's documents: no n-gram runs across two of them


@dataclass(frozen=True, slots=True)
class Score:
    """Why the index proposed a token: the n-gram order it matched (the longest with a recorded
    continuation), and how often this token followed that n-gram out of all its continuations."""

    order: int
    count: int
    total: int
    recalled: bool = False  # from earlier generations (`NgramMemory`), not from this text

    @property
    def share(self) -> float:
        return self.count / self.total


@dataclass
class Proposal:
    """Up to k tokens continuing a context, each with its score."""

    tokens: list[int] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


class NgramIndex:
    """Every n-gram (n_min <= n <= n_max) of a growing sequence -> {next token: [count, last position]}."""

    def __init__(self, tokens: list[int] = (), n_max: int = 4, n_min: int = 1, mode: str = "recent",
                 memory: NgramMemory | None = None):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"want 1 <= n_min <= n_max, got {n_min} and {n_max}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.n_max, self.n_min, self.mode, self.memory = n_max, n_min, mode, memory
        self.tokens: list[int] = []
        self.follow: dict[tuple[int, ...], dict[int, list[int]]] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens) -> None:
        """Index tokens appended to the sequence: each becomes the continuation of the n-grams before it."""
        s, follow = self.tokens, self.follow
        for x in tokens:
            i = len(s)
            tail = tuple(s[max(0, i - self.n_max):i])
            for n in range(self.n_min, len(tail) + 1):
                nexts = follow.setdefault(tail[-n:], {})
                seen = nexts.get(x)
                if seen is None:
                    nexts[x] = [1, i]
                else:
                    seen[0] += 1
                    seen[1] = i
            s.append(x)

    def sync(self, seq: list[int]) -> None:
        """Catch up with `seq`, a continuation of the indexed sequence (the loop's committed tokens): index
        only what is new. A sequence that is not a continuation (checked at its last indexed token) is
        indexed afresh."""
        n = len(self.tokens)
        if len(seq) < n or (n and seq[n - 1] != self.tokens[-1]):
            self.tokens, self.follow = [], {}
            n = 0
        self.extend(seq[n:])

    def _next(self, context: list[int]) -> tuple[int, Score] | None:
        """The token that continues the longest suffix of `context` with a recorded continuation."""
        for n in range(min(self.n_max, len(context)), self.n_min - 1, -1):
            nexts = self.follow.get(tuple(context[-n:]))
            if nexts:
                token, (count, _) = self._best(nexts.items())
                return token, Score(n, count, sum(c for c, _ in nexts.values()))
        return None

    def _best(self, continuations):
        """Of (token, [count, last position]) pairs: the most recent one, or the most frequent (ties: the most recent)."""
        if self.mode == "recent":
            return max(continuations, key=lambda kv: kv[1][1])
        return max(continuations, key=lambda kv: (kv[1][0], kv[1][1]))

    def propose(self, context: list[int], k: int) -> Proposal:
        """Up to k tokens continuing `context` (the indexed sequence, maybe followed by tokens not indexed
        yet, such as drafts in flight): the walk stops where no suffix has a recorded continuation."""
        out = Proposal()
        reach = max(self.n_max, self.memory.n_max if self.memory is not None else 0)
        tail = list(context[-reach:])
        for _ in range(k):
            found = self._next(tail)
            if self.memory is not None:
                recalled = self.memory.next(tail)
                if recalled is not None and (found is None or recalled[1].order > found[1].order):
                    found = recalled
            if found is None:
                break
            token, score = found
            out.tokens.append(token)
            out.scores.append(score)
            tail = tail[1:] + [token] if len(tail) >= reach else tail + [token]
        return out

    def branch(self, context: list[int], proposal: Proposal, within: int, k: int) -> tuple[int, Proposal] | None:
        """Where `proposal` (this index's for `context`) had a choice among its first `within` tokens: the first
        one whose matched n-gram was followed by other tokens too in this text (not one recalled from the
        memory). Returns (its position i, the walk that takes the runner-up there instead: up to k - i tokens,
        the first scored by how often the runner-up followed), or None where every step was the only choice."""
        reach = max(self.n_max, self.memory.n_max if self.memory is not None else 0)
        for i, score in enumerate(proposal.scores[:min(within, k)]):
            if score.recalled or score.count == score.total:
                continue
            tail = (list(context) + proposal.tokens[:i])[-reach:]
            others = [kv for kv in self.follow.get(tuple(tail[-score.order:]), {}).items() if kv[0] != proposal.tokens[i]]
            if not others:
                continue
            token, (count, _) = self._best(others)
            rest = self.propose(tail + [token], k - i - 1)
            return i, Proposal([token] + rest.tokens, [Score(score.order, count, score.total)] + rest.scores)
        return None


class NgramMemory:
    """An n-gram index over earlier generations: each `remember`ed text (a prompt and its output) is a
    document of its own, and the newest documents up to `max_tokens` tokens are kept (older ones are
    dropped and the index rebuilt from the rest, down to three quarters of the cap). Thread-safe."""

    def __init__(self, n_max: int = 8, max_tokens: int = 32768):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        self.n_max, self.max_tokens = n_max, max_tokens
        self._docs: deque[list[int]] = deque()
        self._index = NgramIndex((), n_max)
        self._lock = threading.Lock()  # the live index: held by readers and for an append or a swap
        self._writing = threading.Lock()  # one writer at a time

    def __len__(self) -> int:
        """Tokens held (documents and their separators)."""
        return len(self._index)

    @property
    def documents(self) -> int:
        return len(self._docs)

    def remember(self, tokens: list[int]) -> None:
        """Index one more document (a generation's prompt and output); drop the oldest beyond the cap.
        A rebuild is done beside the live index, which readers keep using until the swap."""
        doc = list(tokens)[-(self.max_tokens - 1):]
        if not doc:
            return
        with self._writing:
            if len(self._index) + len(doc) + 1 <= self.max_tokens:
                with self._lock:
                    self._docs.append(doc)
                    _add(self._index, doc)
                return
            kept, size = deque([doc]), len(doc) + 1
            for old in reversed(self._docs):
                if size + len(old) + 1 > self.max_tokens * 3 // 4:
                    break
                kept.appendleft(old)
                size += len(old) + 1
            fresh = NgramIndex((), self.n_max)
            for d in kept:
                _add(fresh, d)
            with self._lock:
                self._docs, self._index = kept, fresh

    def next(self, tail: list[int]) -> tuple[int, Score] | None:
        """The token that continued the longest suffix of `tail` in earlier generations (`recalled`)."""
        with self._lock:
            found = self._index._next(tail)
        if found is None:
            return None
        token, score = found
        return token, Score(score.order, score.count, score.total, recalled=True)


def _add(index: NgramIndex, doc: list[int]) -> None:
    """A memory's document: the separator enters the n-grams (none runs across it), never as a continuation."""
    index.tokens.append(SEPARATOR)
    index.extend(doc)


def shared_path(drafts: list[int], parents: list[int], branch: list[int]) -> list[int]:
    """The nodes of a draft tree (`drafts` with `parents`, -1 the root) that spell the longest prefix of
    `branch` (tokens continuing the root), from the root down."""
    children: dict[int, dict[int, int]] = {}
    for i, (token, parent) in enumerate(zip(drafts, parents)):
        children.setdefault(parent, {}).setdefault(token, i)
    path: list[int] = []
    while len(path) < len(branch) and branch[len(path)] in children.get(path[-1] if path else -1, {}):
        path.append(children[path[-1] if path else -1][branch[len(path)]])
    return path


def graft(drafts: list[int], parents: list[int], branch: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Fuse `branch` into a draft tree: follow the tree while it agrees with the branch (`shared_path`),
    hang the rest below the last agreeing node. Returns the fused tree's drafts and parents (the old
    nodes first, in their order) and the shared path."""
    path = shared_path(drafts, parents, branch)
    drafts, parents = list(drafts), list(parents)
    node = path[-1] if path else -1
    for token in branch[len(path):]:
        drafts.append(token)
        parents.append(node)
        node = len(drafts) - 1
    return drafts, parents, path


def is_chain(parents: list[int]) -> bool:
    """Whether a tree's nodes form one chain in order (node i's parent is node i - 1)."""
    return all(p == i - 1 for i, p in enumerate(parents))
