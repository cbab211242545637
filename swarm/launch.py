"""Start and stop `swarm peer` processes on this machine (for the demo, benchmarks and tests).

Each peer runs in its own process session, so a Ctrl-C at the terminal (SIGINT to the foreground
process group) reaches the program that started it, never the peers; that program stops them
(`stop_peers`: all at once). On Linux a peer also gets SIGTERM when the thread that started it dies,
however it dies (SIGKILL included), so no peer outlives its owner: start peers from a thread that
lives as long as they should (the main thread, usually). `local_swarm` is the demo's swarm: peers
for as long as a block runs, stopped however it ends (SIGTERM and SIGHUP become SystemExit there,
`exit_on_signals`), their logs in a temporary folder that goes with them.

Knows processes, signals and the `swarm peer` command line; nothing of models, routes or sessions.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from peer.trio_thread import block_stop_signals

PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent (thread) dies


def _die_with_parent():
    """A `preexec_fn` (Linux): SIGTERM to the child when the thread that started it ends; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, in the parent: the child only calls it
    except (OSError, AttributeError):
        return None
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would signal us
            os._exit(1)
    return preexec


class PeerProcess:
    """One `swarm peer` subprocess; `addr` is its first 'listening on' multiaddr.

    `wait=False` returns as soon as the process is spawned; `wait_ready()` then waits for its address.
    `entry`: what python runs instead of `-m swarm.cli` (a test's wrapper around it, e.g. a lying peer).
    Its weights and activations are float32, as the library's `LocalModel` and `SwarmModel` default to (so that
    a launcher's peers compute what an in-process reference does), unless `extra` says `--dtype` (`swarm peer`'s
    own default is auto: bfloat16 on a CPU with bfloat16 instructions)."""

    def __init__(self, model: str | Path, blocks: tuple[int, int], *extra: str, threads: int = 1,
                 log_file: str | Path | None = None, timeout: float = 120.0, wait: bool = True,
                 entry: tuple[str, ...] = ("-m", "swarm.cli")):
        self.blocks = blocks
        self.addr = self.peer_id = None
        span = ["--blocks", f"{blocks[0]}:{blocks[1]}"] if blocks else []
        cmd = [sys.executable, *entry, "peer", "--model", str(model), *span,
               "--threads", str(threads), "--dtype", "float32", *extra]  # (a later --dtype in `extra` wins)
        self.log = open(log_file, "a") if log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                     preexec_fn=_die_with_parent())  # noqa: PLW1509 - one prctl call, nothing else
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise

    def _pump(self) -> None:  # keep reading stdout so the peer never blocks on a full pipe
        block_stop_signals()
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Wait for the peer's 'listening on' line; stop it and raise RuntimeError if it never comes."""
        deadline = time.monotonic() + timeout
        while self.addr is None and time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("listening on "):
                self.addr = line.split()[2]
                self.peer_id = self.addr.rsplit("/p2p/", 1)[1]
        if self.addr is None:
            self.stop()
            raise RuntimeError(f"peer for blocks {self.blocks} did not start (exit code {self.proc.returncode})")
        return self.addr

    def terminate(self) -> None:
        """SIGTERM: the peer announces that it leaves and exits (`wait` for it)."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float = 10.0) -> None:
        """Wait for the process to end (SIGKILL after `timeout` seconds) and close its log."""
        try:
            self.proc.wait(max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.terminate()
        self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the peer vanishes without a goodbye (failover tests)."""
        self.proc.kill()
        self.proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the peer has used so far (Linux /proc; NaN where unknown: gone, not Linux)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")


def stop_peers(peers: list[PeerProcess], timeout: float = 10.0) -> None:
    """Stop peers in parallel: SIGTERM to all, then wait for all (SIGKILL to any still there after `timeout`)."""
    for p in peers:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in peers:
        p.wait(deadline - time.monotonic())


@contextlib.contextmanager
def exit_on_signals(*signums: int):
    """Within the block, SIGTERM and SIGHUP (or `signums`) raise SystemExit(128 + signal) in the main
    thread, once (later ones are ignored, so the clean-up that runs is not cut short): `finally`
    blocks run and stop peers, where the default would end the process on the spot. A no-op off the
    main thread."""
    signums = signums or tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    before = {s: signal.signal(s, leave) for s in signums}
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    old_fd = signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    threading.Thread(target=_forward_to_main, args=(wakeup_r, signums), name="signal-forward", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        os.close(wakeup_w)  # the forwarder reads EOF and ends
        for s, handler in before.items():
            signal.signal(s, handler)


def _forward_to_main(fd: int, signums: tuple[int, ...]) -> None:
    """The kernel may hand a process's SIGTERM to any thread that does not block it (torch's OpenMP
    workers do not); Python then runs the handler only when the main thread next checks, which a
    blocked input() never does. The wakeup fd tells this thread a signal came: it sends it again to
    the main thread itself, which interrupts input() so the handler runs (once: it ignores the rest)."""
    block_stop_signals()
    main = threading.main_thread().ident
    try:
        while data := os.read(fd, 64):
            for signum in set(data) & set(signums):
                if signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL):
                    signal.pthread_kill(main, signum)
            time.sleep(0.05)
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_interrupts():
    """SIGINT is ignored within the block (a second Ctrl-C must not cut a clean-up short). A no-op off
    the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def even_spans(num_blocks: int, n_peers: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_blocks / n_peers) for i in range(n_peers + 1)]
    return list(zip(cuts, cuts[1:]))


def start_peers(model: str | Path, spans: list[tuple[int, int]], *extra: str, threads: int = 1,
                log_dir: str | Path | None = None, timeout: float = 120.0) -> list[PeerProcess]:
    """One peer per span: the first one, then the others together, bootstrapping from it (one swarm,
    one DHT: a client that knows any of them finds all). Stops them all if any fails to start, or if
    the wait is interrupted (Ctrl-C, a signal handler's exception)."""
    def log(i: int):
        return Path(log_dir) / f"peer{i}.log" if log_dir else None

    peers: list[PeerProcess] = []
    try:
        peers.append(PeerProcess(model, spans[0], *extra, threads=threads, log_file=log(0), wait=False))
        peers[0].wait_ready(timeout)
        peers += [PeerProcess(model, spans[i], *extra, "--initial-peers", peers[0].addr, threads=threads,
                              log_file=log(i), wait=False) for i in range(1, len(spans))]
        deadline = time.monotonic() + timeout
        for p in peers[1:]:  # they start side by side: waiting for each in turn costs no extra time
            p.wait_ready(deadline - time.monotonic())
    except BaseException:
        stop_peers(peers)
        raise
    return peers


@contextlib.contextmanager
def local_swarm(model: str | Path, spans: list[tuple[int, int]], *extra: str, grace: float = 1.5):
    """Peers for `spans` (logging to a temporary folder) for as long as the block runs, stopped however
    it ends: normally, by an exception or Ctrl-C, by SIGTERM or SIGHUP (`exit_on_signals`); together,
    SIGKILL after `grace` seconds (a local swarm owes nobody a goodbye). The folder goes with them,
    unless a peer failed to start: then it is named, and kept."""
    logs = tempfile.mkdtemp(prefix="specswarm-demo-")
    peers: list[PeerProcess] = []
    keep = False
    with exit_on_signals():
        try:
            try:
                peers = start_peers(model, spans, *extra, log_dir=logs)
            except RuntimeError:
                keep = True
                print(f"the peers' logs are in {logs}", file=sys.stderr)
                raise
            yield peers
        finally:
            with no_interrupts():  # a second Ctrl-C must not leave peers behind
                stop_peers(peers, grace)
                if not keep:
                    shutil.rmtree(logs, ignore_errors=True)
                if peers:
                    with contextlib.suppress(OSError):  # (a closed terminal: nobody to tell)
                        print("stopped the local peers", file=sys.stderr)
