"""Run node.py roles in a nat_lab: relay (pub), NATed listener (vol, behind A), dialer (cli, behind B).

usage: drive.py [--hard-nat] [--mode reserve|discovery] [--punch] [--seconds N]"""
import argparse
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
import nat_lab  # noqa: E402

PY = sys.executable
NODE = str(HERE / "node.py")


def pump(name, proc, q, logf):
    for line in proc.stdout:
        if line.startswith("RESULT "):
            q.put((name, json.loads(line[7:])))
    q.put((name, None))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hard-nat", action="store_true")
    ap.add_argument("--mode", default="reserve")
    ap.add_argument("--punch", action="store_true")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--loglevel", default="WARNING")
    args = ap.parse_args()
    q = queue.Queue()
    env = {"PYTHONUNBUFFERED": "1", "LOGLEVEL": args.loglevel, "PATH": "/usr/bin:/bin",
           "PER_PEER": __import__("os").environ.get("PER_PEER", "1"), "CLOSE": __import__("os").environ.get("CLOSE", "first")}
    with nat_lab.Lab(hard_nat=args.hard_nat) as lab:
        logs = {}

        def start(node, name, *argv):
            logs[name] = open(f"/tmp/natexp-{name}.log", "w")
            p = lab.popen(node, [PY, NODE, *argv], stdout=subprocess.PIPE, stderr=logs[name], text=True, env=env)
            threading.Thread(target=pump, args=(name, p, q, logs[name]), daemon=True).start()
            return p

        def wait(name, what, timeout=30):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                try:
                    who, r = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if r is None:
                    print(f"{who}: exited")
                    continue
                if who != "listener" or r["what"] != "listener_conns":
                    print(f"{who:8} {json.dumps(r)}")
                if who == name and r["what"] == what:
                    return r
            raise SystemExit(f"timeout waiting for {name} {what}")

        start(lab.pub, "relay", "relay", "4001")
        relay = wait("relay", "relay_up")
        raddr = next(a for a in relay["addrs"] if "/203.0.113." in a)
        if args.mode == "public":
            start(lab.pub, "pubctl", "public_autonat", raddr, "4002")
            wait("pubctl", "public_autonat")
            return
        start(lab.vol, "listener", "listener", raddr, "4001", args.mode)
        ready = wait("listener", "listener_ready", 60)
        start(lab.cli, "dialer", "dialer", raddr, ready["circuit"], "punch" if args.punch else "nopunch")
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            try:
                who, r = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if r is None:
                print(f"{who}: exited")
                if who == "dialer":
                    break
                continue
            if who == "listener" and r["what"] == "listener_conns":
                last = r
                continue
            print(f"{who:8} {json.dumps(r)}")
        print("listener's last view:", json.dumps(locals().get("last")))
    print("namespaces left:", [n for n in nat_lab.list_namespaces() if n.startswith(lab.tag)])


if __name__ == "__main__":
    main()
