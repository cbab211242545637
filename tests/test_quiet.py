"""Short-lived clients leave no trace and print only their own output (swarm/logs.py, peer/dht.py client
mode, swarm/client/background.py closing its loop).

Clients used to join the DHT as servers: they stayed in the peers' routing tables after exiting, and
every later client's lookups dialled them, with py-libp2p's log lines on its stderr ("Failed to open
TCP stream", "protocols not supported ... Registry Stats: None", "negative cache").
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from swarm.client.background import BackgroundLoop
from swarm.launch import start_peers

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
NOISE = ("libp2p", "Failed to open", "Task was destroyed", "Registry Stats", "negative cache", "Traceback")


def swarm_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LIBP2P_DEBUG"}
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def noise(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if any(n in line for n in NOISE)]


@pytest.mark.slow  # ten CLI runs against a 2-peer swarm: ~45 s
def test_later_clients_see_no_trace_of_earlier_ones(tiny, tmp_path):
    path = str(tiny("llama2").path)
    peers = start_peers(path, [(0, 4), (4, 8)], log_dir=tmp_path)
    try:
        where = ["--model", path, "--initial-peers", peers[0].addr]
        generate = ["generate", *where, "--prompt", "def f", "--max-new-tokens", "4"]
        runs = [generate if i % 2 == 0 else ["status", *where] for i in range(10)]
        with ThreadPoolExecutor(3) as pool:  # a few at a time, as users would
            earlier = list(pool.map(lambda args: swarm_cli(*args), runs))
        for args, out in zip(runs, earlier):
            assert out.returncode == 0, (args[0], out.stderr)
            assert not noise(out), (args[0], noise(out))

        # py-libp2p's warnings, shown with -v: none, as no departed client is left in a routing table to dial
        verbose = swarm_cli("status", *where, "-v")
        assert verbose.returncode == 0, verbose.stderr
        assert not noise(verbose), noise(verbose)

        last = swarm_cli(*generate, "--ignore-eos", "--json")
        assert last.returncode == 0, last.stderr
        assert last.stderr == "", f"a client's stderr should be empty, got:\n{last.stderr}"
        (line,) = last.stdout.splitlines()  # one JSON object, nothing else
        assert json.loads(line)["new_tokens"] == 4
    finally:
        for p in peers:
            p.stop()


def test_verbose_shows_libp2p_and_info_lines_quiet_does_not():
    """`setup_logging` in a fresh process (it sets process-wide logging): py-libp2p below CRITICAL and
    our INFO only with -v; our warnings always, one line each."""
    script = ("import logging, sys; from swarm.logs import setup_logging; setup_logging(sys.argv[1] == 'v'); "
              "logging.getLogger('libp2p.transport.tcp.tcp').error('lib-error'); "
              "logging.getLogger('libp2p.network.auto_connector').warning('lib-warning'); "  # sets its own level
              "logging.getLogger('libp2p.host').critical('lib-critical'); "
              "logging.getLogger('specswarm.client').info('our-info'); "
              "logging.getLogger('specswarm.client').warning('our-warning')")
    env = {k: v for k, v in os.environ.items() if k != "LIBP2P_DEBUG"}

    def run(mode: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stderr.splitlines()

    assert run("quiet") == ["CRITICAL libp2p.host: lib-critical", "WARNING specswarm.client: our-warning"]
    assert run("v") == ["ERROR libp2p.transport.tcp.tcp: lib-error", "WARNING libp2p.network.auto_connector: lib-warning",
                        "CRITICAL libp2p.host: lib-critical", "INFO specswarm.client: our-info",
                        "WARNING specswarm.client: our-warning"]


def test_closing_the_background_loop_ends_its_tasks():
    """A task still running when a client closes (a step, a probe) is cancelled and awaited, so that
    nothing is left for asyncio to report at exit as "Task was destroyed but it is pending!"."""
    bg = BackgroundLoop()
    stuck = asyncio.run_coroutine_threadsafe(asyncio.Event().wait(), bg.loop)
    bg.run(asyncio.sleep(0))
    bg.close()
    assert stuck.cancelled() and bg.loop.is_closed() and not bg.thread.is_alive()
    bg.close()  # idempotent
