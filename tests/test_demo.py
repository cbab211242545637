"""The first ten minutes: the demo and the chat behave the way a newcomer expects.

Ctrl-C at the terminal stops a reply, never the peers (they live in their own sessions), and the next
prompt answers; SIGTERM, a closed terminal (SIGHUP) or even SIGKILL of the demo leaves no peer behind;
a chat whose swarm lacks some blocks counts down and answers once a peer serves them; a closed session
with steps in flight is not mistaken for a failing peer. Real `swarm peer` processes throughout;
interactive runs are driven through a pseudo-terminal, and once through tmux with scripts/demo.sh.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from swarm import bundled
from swarm.chat import Chat, Console
from swarm.client.swarm_model import SwarmModel
from swarm.decode.target import LocalModel, embed_step
from swarm.launch import PeerProcess, start_peers, stop_peers
from swarm.text import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses ptys (Linux)")


# --- processes ----------------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def peers_of(pid: int) -> list[int]:
    """The `swarm peer` processes among pid's descendants."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            kids.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            todo.append(child)
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"swarm.cli" in argv and b"peer" in argv:
                found.append(child)
    return found


def wait_until(check, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Terminal:
    """A program on a pseudo-terminal (its controlling tty: ^C there is SIGINT to its process group)."""

    def __init__(self, argv: list[str], env: dict, rows: int = 40, cols: int = 120):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: straight to exec
            try:
                os.chdir(ROOT)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.output, self.status = "", None

    def read_until(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """Read output until `pattern` (a regex) matches what came after offset `start`."""
        deadline = time.monotonic() + timeout
        while not (found := re.compile(pattern).search(self.output, start)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout:.0f} s; output:\n{self.output[-3000:]}")
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the other side is closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the program ended before {pattern!r}; output:\n{self.output[-3000:]}")
                self.output += chunk.decode("utf-8", "replace")
        return found

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def drain(self) -> None:
        """Read what output there is (a program that restores its terminal waits until it is read)."""
        while self.fd >= 0 and select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.output += chunk.decode("utf-8", "replace")

    def wait(self, timeout: float) -> int:
        def done():
            self.drain()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            return pid != 0
        wait_until(done, timeout, "the program to exit")
        return self.status

    def close(self) -> None:
        if self.status is None and _stat(self.pid) is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def demo_env(tmp_path: Path) -> dict:
    return {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1", "TERM": "xterm"}


def start_demo(tmp_path: Path, *flags: str, peers: int = 3) -> tuple[Terminal, list[int]]:
    """`swarm demo` on the tiny pair, on a terminal, at its first prompt; returns it and its peers' process ids."""
    term = Terminal([sys.executable, "-m", "swarm.cli", "demo", "--model", "tiny", "--peers", str(peers), *flags],
                    demo_env(tmp_path))
    term.read_until(r">>> ", 120)
    found = peers_of(term.pid)
    assert len(found) == peers, f"expected {peers} peer processes, found {found}"
    return term, found


def demo_folders(tmp_path: Path) -> list[str]:
    return [p.name for p in tmp_path.glob("specswarm-demo-*")]


# --- the demo on a terminal ---------------------------------------------------------------------------
@pytest.mark.skipif(not (bundled.TINY_MODEL / "config.json").exists(), reason="needs the bundled model")
def test_ctrl_c_stops_only_the_reply_and_the_next_prompt_answers(tmp_path):
    term, peers = start_demo(tmp_path, "--max-new-tokens", "1000")
    try:
        at = len(term.output)
        term.send("def fibonacci(n):\r")
        term.read_until(r"\d+ tokens · [\d.]+ tokens/s", 30, at)  # streaming: the status line shows
        term.send("\x03")
        term.read_until(r"\[stopped\]", 20, at)
        time.sleep(1.0)  # a spurious failover, or a peer hit by the Ctrl-C, would show by now
        assert all(alive(p) for p in peers), "a peer died from the Ctrl-C meant for the reply"
        at = len(term.output)
        term.send("class Stack:\r")
        summary = term.read_until(r"\[(\d+) tokens, [\d.]+ tokens/s", 60, at)
        assert int(summary[1]) > 0, "the prompt after a Ctrl-C got no answer"
        assert "failing over" not in term.output and "banned" not in term.output, term.output[-3000:]
        assert "\033[1;39r" in term.output, "no status line was fenced off at the terminal's bottom row"
        term.send("/quit\r")
        assert term.wait(20) == 0
        wait_until(lambda: not any(alive(p) for p in peers), 5, "the peers to stop")
        assert demo_folders(tmp_path) == []
    finally:
        term.close()


@pytest.mark.skipif(not (bundled.TINY_MODEL / "config.json").exists(), reason="needs the bundled model")
@pytest.mark.parametrize("how, peers", [("SIGTERM", 2), ("hangup", 1), ("SIGKILL", 1)])
def test_a_stopped_demo_leaves_no_peer(tmp_path, how, peers):
    """SIGTERM, a closed terminal (the kernel's SIGHUP) and SIGKILL: no peer outlives the demo; the
    demo's log folder goes with it (except after SIGKILL, which nothing can clean up after)."""
    term, peers = start_demo(tmp_path, "--max-new-tokens", "8", peers=peers)
    try:
        t0 = time.monotonic()
        if how == "hangup":
            os.close(term.fd)
            term.fd = -1
        else:
            os.kill(term.pid, getattr(signal, how))
        code = term.wait(20)
        if how != "hangup":  # (after a hang-up the exit code is whatever writing to a closed terminal left)
            assert code == {"SIGTERM": 128 + signal.SIGTERM, "SIGKILL": -signal.SIGKILL}[how]
        wait_until(lambda: not any(alive(p) for p in peers), 15, "the peers to stop")
        if how != "SIGKILL":
            assert time.monotonic() - t0 < 6, "the demo took too long to stop its peers"
            assert demo_folders(tmp_path) == []
    finally:
        term.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (CI installs it)")
@pytest.mark.skipif(not (bundled.TINY_MODEL / "config.json").exists(), reason="needs the bundled model")
def test_demo_script_in_tmux(tmp_path):
    """scripts/demo.sh as a newcomer runs it: a prompt, Ctrl-C mid-reply, a second prompt, /quit."""
    tmux = ["tmux", "-L", f"specswarm-test-{os.getpid()}"]
    env = {**demo_env(tmp_path), "TERM": "xterm-256color"}
    env.pop("TMUX", None)

    def screen() -> str:
        return subprocess.run(tmux + ["capture-pane", "-p", "-J", "-S", "-200", "-t", "demo"], env=env, check=False,
                              capture_output=True, text=True).stdout

    def keys(*k: str) -> None:
        subprocess.run(tmux + ["send-keys", "-t", "demo", *k], env=env, check=True)

    command = "bash scripts/demo.sh --model tiny --max-new-tokens 1000; echo \"demo exited $?\"; sleep 60"
    subprocess.run(tmux + ["new-session", "-d", "-s", "demo", "-x", "120", "-y", "40", "-c", str(ROOT), command],
                   env=env, check=True)
    socket = subprocess.run(tmux + ["display", "-p", "#{socket_path}"], env=env, capture_output=True, text=True,
                            check=False).stdout.strip()
    try:
        wait_until(lambda: ">>> " in screen(), 120, "the demo's prompt")
        pane = int(subprocess.run(tmux + ["display", "-p", "-t", "demo", "#{pane_pid}"], env=env, check=True,
                                  capture_output=True, text=True).stdout)
        peers = peers_of(pane)
        assert len(peers) == 3, f"expected 3 peer processes, found {peers}"
        keys("def fibonacci(n):", "Enter")
        shown = wait_until(lambda: (s := screen()).split("fibonacci(n):", 1)[1].strip() and s, 30, "streamed text")
        assert re.search(r"tokens/s .* route", shown.rstrip().splitlines()[-1]), "no live status line:\n" + shown
        keys("C-c")
        wait_until(lambda: "[stopped]" in screen(), 20, "[stopped]")
        keys("class Stack:", "Enter")
        wait_until(lambda: re.search(r"class Stack:\n(.*\n)*\[[1-9]\d* tokens, ", screen()), 60,
                   "an answer to the second prompt:\n" + screen())
        assert all(alive(p) for p in peers)
        keys("/quit", "Enter")
        wait_until(lambda: "demo exited 0" in screen(), 20, "the demo to exit")
        wait_until(lambda: not any(alive(p) for p in peers), 5, "the peers to stop")
        assert demo_folders(tmp_path) == []
    finally:
        subprocess.run(tmux + ["kill-server"], env=env, capture_output=True, check=False)
        if socket:
            Path(socket).unlink(missing_ok=True)


# --- waiting for coverage -----------------------------------------------------------------------------
def test_chat_waits_for_a_missing_span_then_answers(tiny, tmp_path):
    """A chat started on a swarm that serves only blocks [0, 4) counts down (plain text, not on a
    terminal) and answers once a peer for [4, 8) joins."""
    path = tiny("llama2").path
    first = PeerProcess(path, (0, 4), log_file=tmp_path / "first.log")
    second = None
    chat = subprocess.Popen([sys.executable, "-m", "swarm.cli", "chat", "--model", str(path), "--initial-peers",
                             first.addr, "--prompt", "def f(x):", "--max-new-tokens", "8"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(chat.stdout), daemon=True).start()
        wait_until(lambda: any("no peer serves blocks [4, 8) right now; retrying in 5 s" in s for s in lines), 60,
                   "the countdown")
        second = PeerProcess(path, (4, 8), "--initial-peers", first.addr, log_file=tmp_path / "second.log")
        assert chat.wait(60) == 0, "".join(lines)
        out = "".join(lines)
        assert re.search(r">>> def f\(x\):\n(.|\n)*\[1 replies, [1-8] tokens", out), out
        assert "\033" not in out, "escape codes in output that is not a terminal"
    finally:
        if chat.poll() is None:
            chat.kill()
        stop_peers([p for p in (first, second) if p is not None])


@pytest.mark.slow  # ~22 s: a peer leaves mid-reply and another comes (the chat's waiting is also tested fast)
def test_a_reply_waits_when_a_peer_leaves_and_goes_on_when_one_returns(tiny, tmp_path):
    path = tiny("llama2").path
    peers = start_peers(path, [(0, 4), (4, 8)], log_dir=tmp_path)
    model = SwarmModel(path, [peers[0].addr])
    try:
        out = io.StringIO()
        chat = Chat(model, load_tokenizer(path), max_new_tokens=6, console=Console(out, live=False), retry_seconds=1)
        assert chat.reply("def f(x):\n")
        peers[1].stop()
        replies: list[str] = []
        waiting = threading.Thread(target=lambda: replies.append(chat.reply("class A:\n")))
        waiting.start()
        wait_until(lambda: "no peer serves blocks [4, 8) right now" in out.getvalue(), 30, "the countdown")
        peers.append(PeerProcess(path, (4, 8), "--initial-peers", peers[0].addr, log_file=tmp_path / "back.log"))
        waiting.join(60)
        assert not waiting.is_alive() and replies and replies[0], out.getvalue()
        assert "continuing" in out.getvalue()
        assert chat.stats.replies == 2 and chat.stats.tokens > 6
    finally:
        model.close()
        stop_peers(peers)


# --- the chat and the client, in process --------------------------------------------------------------
def test_chat_trims_the_conversation_with_a_note(tiny):
    path = tiny("llama2").path  # a context of 256 tokens
    out = io.StringIO()
    chat = Chat(LocalModel.load(path), load_tokenizer(path), max_new_tokens=16, console=Console(out, live=False))
    chat.reply("for i in range(10):\n    print(i * i)\n" * 40)
    assert "(conversation trimmed to the last 240 tokens: the model's context is 256)" in out.getvalue()
    assert len(chat.history) <= 256


def test_closing_a_session_with_steps_in_flight_is_not_a_failure(tiny, tmp_path):
    """What Ctrl-C did to a reply: the session closed under a running step, the step saw its connection
    go, took it for a dead peer and failed over (a new route, a chain nobody closed)."""
    path = tiny("llama2").path
    peers = start_peers(path, [(0, 4), (4, 8)], log_dir=tmp_path)
    model = SwarmModel(path, [peers[0].addr])
    try:
        for _ in range(5):
            session = model.session(64)
            steps = [session.submit(embed_step(model.head, [3, 4, 5]), layout) for layout in _layouts()]
            session.close()
            assert all(s.done() for s in steps)
        time.sleep(0.5)
        assert model.failovers == 0 and not model.banned
    finally:
        model.close()
        stop_peers(peers)


def _layouts():
    from peer.model import StepLayout

    return [StepLayout(0, 3), StepLayout(3, 3)]
