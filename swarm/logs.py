"""What every `swarm` command logs, and where: `setup_logging`, called once by `swarm.cli.main`.

Our own loggers (`specswarm.*`) speak to the user, one line a record: by default a client shows what
the user can act on (WARNING: a peer banned, a failover, discovery failing) and a peer what it does
(INFO); `-v/--verbose` adds INFO to a client and DEBUG to a peer. py-libp2p's loggers (`libp2p.*`)
are quiet below CRITICAL unless -v: a dial to a departed node, a negative-cache hit or a refused
stream is the swarm's normal weather, which discovery and failover handle, and the user can do
nothing about it. With -v they show from WARNING up, under their own names. `LIBP2P_DEBUG` (py-libp2p's
own switch: its handlers, its levels, its log file) is left to py-libp2p.

py-libp2p sets its loggers up when it is first imported (level WARNING, no propagation, so records
reach stderr through Python's last-resort handler, unformatted), undoing whatever was set before:
this module imports it first when the command will use it, then sets its logger.

Knows the logging module and py-libp2p's logger names; nothing of peers, models or the network.
"""

from __future__ import annotations

import logging
import os
import sys

CLIENT_FORMAT = "%(levelname)s %(name)s: %(message)s"
PEER_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False, peer: bool = False, libp2p: bool = True) -> None:
    """Set up logging for one command. `verbose`: -v was given; `peer`: a serving peer (timestamped
    lines, INFO by default) rather than a client; `libp2p`: the command will load py-libp2p (so its
    import-time set-up happens now, before ours, not later over it; False spares a --local run the
    import). Other libraries log from WARNING up. In a process whose root logger already has handlers
    (tests), those stay and only the levels are set."""
    fmt, datefmt = (PEER_FORMAT if peer else CLIENT_FORMAT), "%H:%M:%S"
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt=datefmt)
    if peer:
        ours = logging.DEBUG if verbose else logging.INFO
    else:
        ours = logging.INFO if verbose else logging.WARNING
    logging.getLogger("specswarm").setLevel(ours)
    if libp2p and not os.environ.get("LIBP2P_DEBUG"):
        import libp2p as _  # noqa: F401 - its logging set-up runs on import: it must come before ours

        _route_libp2p(logging.WARNING if verbose else logging.CRITICAL, logging.Formatter(fmt, datefmt))


def _route_libp2p(level: int, formatter: logging.Formatter) -> None:
    """py-libp2p's records go to a handler of their own at `level`: a handler's level also holds for
    the py-libp2p loggers that set a lower level of their own (libp2p.network.auto_connector: INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(formatter)
    root = logging.getLogger("libp2p")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
