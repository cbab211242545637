"""The shape of the code (scripts/check_layout.py): layering, no import circles, module and function sizes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layout_rules_hold():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_layout.py")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checker must be able to fail: a fake tree with a peer -> swarm import and a circle."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_layout
    finally:
        sys.path.pop(0)
    for pkg in ("protocol", "peer", "swarm"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "peer" / "a.py").write_text("from swarm import b\n")
    (tmp_path / "swarm" / "b.py").write_text("def f():\n    from swarm import c\n")
    (tmp_path / "swarm" / "c.py").write_text("import swarm.b\n" + "x = 1\n" * 401)
    monkeypatch.setattr(check_layout, "ROOT", tmp_path)
    problems, _ = check_layout.check()
    text = "\n".join(problems)
    assert "peer.a imports swarm.b" in text
    assert "import circle: swarm.b <-> swarm.c" in text
    assert "swarm/c.py: 402 lines" in text
