"""What an emulated WAN looks like: one-way links between nodes, named profiles, latency matrices.

Node 0 is the client, nodes 1..n the peers; a `Link` (one direction, as the delay proxy emulates it:
one-way delay, jitter, bandwidth cap) is `swarm.bench.wan.proxy`'s. A matrix file (`--matrix`) gives
every link its delay, jitter and bandwidth; a field a link lacks gets a default, and loading it says
so, one line per missing field (`parse_matrix`). Standard library only; knows nothing of peers, the
client or the protocol.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from swarm.bench.wan.proxy import Link


@dataclass(frozen=True)
class Profile:
    """Where nodes sit: one-way delay between two nodes, by region. Node 0 is the client."""

    name: str
    delay_ms: float  # between nodes of different regions (or all nodes, with one region)
    jitter_ms: float = 0.0
    mbit_s: float | None = None
    regions: tuple[int, ...] = ()  # region of node i (cycled); () = every node apart from every other
    near_ms: float = 0.5  # between nodes of the same region

    def link(self, src: int, dst: int) -> Link:
        if self.regions and self.regions[src % len(self.regions)] == self.regions[dst % len(self.regions)]:
            return Link(self.near_ms, self.jitter_ms * self.near_ms / self.delay_ms, self.mbit_s)
        return Link(self.delay_ms, self.jitter_ms, self.mbit_s)

    def matrix(self, n_peers: int) -> list[list[Link]]:
        return [[self.link(s, d) for d in range(n_peers + 1)] for s in range(n_peers + 1)]


PROFILES = {
    "loopback": Profile("loopback", 0.0),
    "lan": Profile("lan", 0.5, 0.05, 1000.0),
    "metro": Profile("metro", 5.0, 0.5, 500.0),
    "continental": Profile("continental", 25.0, 2.0, 100.0),
    "intercontinental": Profile("intercontinental", 80.0, 5.0, 50.0),
    # client in Europe; peers alternate US, Europe, US, ...: 40 ms across the Atlantic, 5 ms within a continent
    "heterogeneous": Profile("heterogeneous", 40.0, 3.0, 100.0, regions=(0, 1), near_ms=5.0),
}


FIELDS = {"delay_ms": "ms", "jitter_ms": "ms", "mbit_s": "Mbit/s"}  # a link's fields in a matrix file
BUILT_IN = {"delay_ms": 0.0, "jitter_ms": 0.0, "mbit_s": None}  # what a field no one gave is


def _node(i: int) -> str:
    return "client" if i == 0 else f"peer{i}"


def _field(value, name: str, where: str):
    """One field's value, checked: a number >= 0 (mbit_s: > 0, or null for no cap)."""
    if value is None and name == "mbit_s":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "mbit_s" and value == 0):
        rule = "a number > 0 or null (no cap)" if name == "mbit_s" else "a number >= 0"
        raise ValueError(f"{where}: {name} must be {rule}, got {value!r}")
    return float(value)


def _describe(name: str, value) -> str:
    if value is None:
        return "no bandwidth cap"
    return f"{value:g} {FIELDS[name]}" + (" (no jitter)" if name == "jitter_ms" and not value else "")


def parse_matrix(data, source: str = "the matrix", jitter_ms: float = 0.0,
                 mbit_s: float | None = None) -> tuple[list[list[Link]], list[str]]:
    """(links, notes) from a parsed matrix file: `data` is a square list of rows, client first, or
    {"defaults": {field: value}, "links": rows}. A link (off the diagonal) is a number (its one-way
    delay in ms) or an object with any of delay_ms, jitter_ms, mbit_s (null: no cap). Every field a
    link lacks gets the file's default, else the argument's (`jitter_ms`, `mbit_s`; delay 0 ms), and
    `notes` says so: one line per missing field, naming the links and the value used."""
    defaults = {}
    if isinstance(data, dict):
        unknown = set(data) - {"defaults", "links"}
        if unknown or "links" not in data:
            raise ValueError(f"{source}: a matrix object has \"links\" (rows) and optional \"defaults\"; "
                             f"got keys {sorted(data)}")
        given = data.get("defaults") or {}
        _check_keys(given, f"{source}: defaults")
        defaults = {k: _field(v, k, f"{source}: defaults") for k, v in given.items()}
        data = data["links"]
    if not isinstance(data, list) or not data or any(not isinstance(r, list) or len(r) != len(data) for r in data):
        raise ValueError(f"{source}: a latency matrix must be square (client first, then each peer)")
    fallback = {**BUILT_IN, "jitter_ms": jitter_ms, "mbit_s": mbit_s}
    missing: dict[str, list[str]] = {name: [] for name in FIELDS}
    rows = []
    for i, row in enumerate(data):
        out = []
        for j, cell in enumerate(row):
            if i == j:  # a node to itself: never a link
                out.append(Link())
                continue
            where = f"{source}: {_node(i)}->{_node(j)}"
            given = {"delay_ms": cell} if not isinstance(cell, dict) else cell
            _check_keys(given, where)
            values = {}
            for name in FIELDS:
                if name in given:
                    values[name] = _field(given[name], name, where)
                else:
                    missing[name].append(f"{_node(i)}->{_node(j)}")
                    values[name] = defaults.get(name, fallback[name])
            out.append(Link(**values))
        rows.append(out)
    n_links = len(data) * (len(data) - 1)
    notes = []
    for name, links in missing.items():
        if not links:
            continue
        which = f"all {n_links} links" if len(links) == n_links else ", ".join(links)
        value = defaults.get(name, fallback[name])
        origin = "the file's default" if name in defaults else "default"
        notes.append(f"{source}: no {name} for {which}: using {_describe(name, value)} ({origin})")
    return rows, notes


def _check_keys(given: dict, where: str) -> None:
    """A typo (`delay` for `delay_ms`) must not silently become a default."""
    for key in given:
        if key not in FIELDS:
            raise ValueError(f"{where}: unknown field {key!r} (a link has {', '.join(FIELDS)})")


def load_matrix(path: str | Path, jitter_ms: float = 0.0, mbit_s: float | None = None,
                warn=None) -> list[list[Link]]:
    """A JSON latency matrix file (see `parse_matrix`): one-way links, [[client->client, client->p1,
    ...], [p1->client, ...], ...]. Every field a link lacks is said, one line per field, to `warn`
    (default: standard error), with the value used instead."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    links, notes = parse_matrix(data, str(path), jitter_ms, mbit_s)
    for line in notes:
        (warn or (lambda m: print(f"note: {m}", file=sys.stderr)))(line)
    return links


def as_matrix(links: list[list[Link]] | Profile | str, n_peers: int) -> list[list[Link]]:
    """A latency matrix for n peers from a matrix, a profile or a profile's name (checked for size)."""
    if isinstance(links, str):
        links = PROFILES[links]
    if isinstance(links, Profile):
        links = links.matrix(n_peers)
    if len(links) != n_peers + 1:
        raise ValueError(f"the latency matrix has {len(links)} nodes; {n_peers} peers need {n_peers + 1}")
    return links
