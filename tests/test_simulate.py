"""The simulator's view of probes: cost tables keep what was measured (no line through small steps)."""

import pytest

from swarm.bench.probe import STEP_SIZES, timings_from
from swarm.bench.simulate import plain_ms_per_token

# A CPU's step cost by tokens (ms): one token a matrix-vector product, two or three about that many,
# four or more a blocked matrix product (the shape probes of SmolLM2 on lan measured)
CHAIN = {1: 62.0, 2: 97.0, 3: 117.0, 4: 90.0, 5: 97.0, 9: 106.0, 17: 128.0, 33: 190.0, 128: 470.0}
HEAD = {1: 11.0, 2: 23.0, 3: 34.0, 4: 18.0, 5: 20.0, 9: 22.0, 17: 27.0, 33: 40.0}


def _net() -> dict:
    return dict(client_rtt=[1.0, 1.0], links=[(1.0, "emulated link")], compute=[CHAIN, CHAIN], head=HEAD,
                draft=(0.0, 0.0), draft_prefill={1: 0.0}, chain={"push": CHAIN, "client-mediated": CHAIN})


def test_probes_measure_the_step_where_the_cpu_changes_kernels():
    assert {1, 2, 3, 4, 5} <= set(STEP_SIZES)


def test_timings_keep_the_measured_small_steps():
    t = timings_from(_net())
    for n in (1, 2, 3, 4, 5, 9):  # not a line through them: a 1-token step costs what it was measured at
        assert t.compute_ms(n) == pytest.approx(CHAIN[n])
        assert t.head(n) == pytest.approx(HEAD[n])
    assert t.compute_ms(7) == pytest.approx((CHAIN[5] + CHAIN[9]) / 2)  # between sizes: interpolated


def test_plain_prediction_pays_the_one_token_step_as_measured():
    t = timings_from(_net())
    trip = 1.5  # three one-way hops of 0.5 ms
    step1 = trip + CHAIN[1] + HEAD[1]
    prefill = trip + CHAIN[128] + HEAD[1]
    assert plain_ms_per_token(t, 32, 128) == pytest.approx((prefill + 31 * step1) / 32)
