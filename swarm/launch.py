"""Start and stop `swarm peer` processes on this machine (for the demo, benchmarks and tests)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path


class PeerProcess:
    """One `swarm peer` subprocess; `addr` is its first 'listening on' multiaddr."""

    def __init__(self, model: str | Path, blocks: tuple[int, int], *extra: str, threads: int = 1,
                 log_file: str | Path | None = None, timeout: float = 120.0):
        self.blocks = blocks
        span = ["--blocks", f"{blocks[0]}:{blocks[1]}"] if blocks else []
        cmd = [sys.executable, "-m", "swarm.cli", "peer", "--model", str(model), *span,
               "--threads", str(threads), *extra]
        self.log = open(log_file, "a") if log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.addr = self._wait_for_address(timeout)
        self.peer_id = self.addr.rsplit("/p2p/", 1)[1]

    def _wait_for_address(self, timeout: float) -> str:
        lines: queue.Queue = queue.Queue()

        def pump():  # keep reading stdout so the peer never blocks on a full pipe
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("listening on "):
                return line.split()[2]
        self.stop()
        raise RuntimeError(f"peer for blocks {self.blocks} did not start (exit code {self.proc.returncode})")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL: the peer vanishes without a goodbye (failover tests)."""
        self.proc.kill()
        self.proc.wait()


def even_spans(num_blocks: int, n_peers: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_blocks / n_peers) for i in range(n_peers + 1)]
    return list(zip(cuts, cuts[1:]))


def start_peers(model: str | Path, spans: list[tuple[int, int]], *extra: str, threads: int = 1,
                log_dir: str | Path | None = None) -> list[PeerProcess]:
    """One peer per span: the first one, then the others in parallel bootstrapping from it (one swarm,
    one DHT: a client that knows any of them finds all). Stops them all if any fails."""
    def log(i: int):
        return Path(log_dir) / f"peer{i}.log" if log_dir else None

    first = PeerProcess(model, spans[0], *extra, threads=threads, log_file=log(0))
    results: list = [first] + [None] * (len(spans) - 1)

    def launch(i: int) -> None:
        try:
            results[i] = PeerProcess(model, spans[i], *extra, "--initial-peers", first.addr, threads=threads,
                                     log_file=log(i))
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads_ = [threading.Thread(target=launch, args=(i,)) for i in range(1, len(spans))]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        for r in results:
            if isinstance(r, PeerProcess):
                r.stop()
        raise failed[0]
    return results
