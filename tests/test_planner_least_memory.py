"""The planner's least-memory search inside plan(): every budget at or above the least peak its own searches reach
plans, whatever else the question measured first, and the error's "smallest peak reachable" is that least.

At the benchmark size (UNet 256^3 batch 2, fake tensors). Block times are a stand-in (proportional to each block's
bytes): real ones cost seconds, and what is tested is that the least-memory search does not depend on them.
"""

import json
import re

import pytest

import monai_ckpt.planner.profile as profile
from monai_ckpt.networks.presets import network_factory
from monai_ckpt.planner.search import Planner

GiB = 2**30
SHAPE = (2, 1, 256, 256, 256)


@pytest.fixture
def stand_in_times(monkeypatch):
    """Block times from bytes (a block's recompute time grows with what it reads and writes), the same every run."""
    real = profile.block_costs

    def block_costs(factory, input_shape, *, estimate=False, amp=False, **kwargs):
        costs = real(factory, input_shape, estimate=True, amp=amp)
        if not estimate:
            for c in costs:
                c.forward_s = 1e-9 * (c.kept_bytes + c.output_bytes)
                c.cheap_recompute_s, c.tail_s, c.cheap_tail_s = 0.4 * c.forward_s, 0.25 * c.forward_s, 0.1 * c.forward_s
        return costs

    monkeypatch.setattr(profile, "block_costs", block_costs)
    monkeypatch.setattr(profile, "step_seconds", lambda *args, **kwargs: 0.05)


def test_plan_reaches_the_least_its_nested_search_finds_at_the_benchmark_size(stand_in_times):
    """The issue's budgets, 2.412 and 2.347 GiB (36-37% of the 6.52 GiB plain peak), used to be refused with "the
    smallest peak reachable is 2.49 GiB" while smallest(nested=True) reaches 2.30 GiB (35.3%, docs/benchmarks/unet.md):
    the least-memory search inside plan() skipped neighbours the plan's bracketing had measured and chose its
    start by the timed model. Now both plan; the search's least is the nested least; a budget at it plans, one
    below it is refused with exactly that least; a budget the least policy without nesting fits gets no nesting.
    (This replaces test_nested's small-UNet test of the same rules.)"""
    planner = Planner(network_factory("unet", 3, 1)(), SHAPE, False, "adam")
    for budget_gb in (2.412, 2.347):
        p = planner.plan(int(budget_gb * GiB))
        assert p.fits and p.predicted_peak_bytes <= budget_gb * GiB and '"nested"' in str(p.policy).replace("'", '"')
    least_policy, least = planner.smallest(nested=True)
    assert least <= 0.354 * planner.peak("none")  # the documented 35.3%
    assert planner.plan(least).predicted_peak_bytes == least
    flat_policy, flat = planner.smallest()
    assert least < flat and '"nested"' not in json.dumps(flat_policy)
    assert '"nested"' not in json.dumps(planner.plan(flat).policy)  # something without nesting fits: no nesting
    assert p.predicted_time_ratio >= planner.time_ratio(flat_policy)  # its inner runs are recomputed twice
    with pytest.raises(ValueError, match="smallest peak reachable") as refused:
        planner.plan(least - 1)
    reported = float(re.search(r"reachable is ([\d.]+) GiB", str(refused.value)).group(1))
    assert reported == round(least / GiB, 2) and "'mode': 'nested'" in str(refused.value)
    assert '"nested"' in str(least_policy).replace("'", '"')
