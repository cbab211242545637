"""Scripted chat: answer prompts (arguments, or one per line on stdin) through a swarm or locally.

    python scripts/chat.py --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/ID --prompt "def add(a, b):"
    printf 'def add(a, b):\\nclass Stack:\\n' | python scripts/chat.py --local
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
