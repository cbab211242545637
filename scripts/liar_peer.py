"""A peer that lies, for tests and benchmarks only: `swarm peer` whose blocks add noise to what they compute.

    python scripts/liar_peer.py [--lie-scale S] [--lie-from P] peer --model DIR --blocks A:B ...

Patches `BlockRange` in this process only (its `forward_batch` where the engine batches sessions, else its
`forward`): the output of every step whose first position is >= P (0: every step) gets Gaussian noise of S
times each row's RMS (default 0.5); then runs `swarm.cli.main` with the rest of the arguments. The peer itself
has no switch to lie. `swarm.launch.PeerProcess(model, span, "--lie-scale", "0.5", entry=LIAR_ENTRY)` starts it
like any other peer (tests/test_integrity.py, scripts/bench_integrity.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
LIAR_ENTRY = (str(Path(__file__).resolve()),)  # what python runs instead of `-m swarm.cli`


def lie(scale: float, start_from: int) -> None:
    """Make every BlockRange in this process add noise to the outputs of steps that start at `start_from` or later."""
    import torch

    from peer.model.blocks import BlockRange

    def noisy(out: torch.Tensor, layout) -> torch.Tensor:
        if layout.start < start_from:
            return out
        x = out.float()
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        return (x + scale * rms * torch.randn_like(x)).to(out.dtype)

    if hasattr(BlockRange, "forward_batch"):  # the batching engine: forward() goes through it too
        honest_batch = BlockRange.forward_batch

        @torch.inference_mode()
        def forward_batch(self, steps):
            outs = honest_batch(self, steps)
            return [noisy(o, lay) if isinstance(o, torch.Tensor) else o for o, (_, _, lay) in zip(outs, steps)]

        BlockRange.forward_batch = forward_batch
    else:
        honest = BlockRange.forward

        @torch.inference_mode()
        def forward(self, hidden, cache, layout):
            return noisy(honest(self, hidden, cache, layout), layout)

        BlockRange.forward = forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--lie-scale", type=float, default=0.5, help="noise, times each output row's RMS")
    ap.add_argument("--lie-from", type=int, default=0, help="lie on steps that start at this position or later")
    args, rest = ap.parse_known_args(argv)
    lie(args.lie_scale, args.lie_from)
    from swarm.cli import main as swarm_main

    return swarm_main(rest)


if __name__ == "__main__":
    sys.exit(main())
