"""The plaintext aggregator against a hand-computed weighted average, and its refusals."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants

from hospital_fedlora.protocol import Meta
from hospital_fedlora.server.fedavg_aggregator import FedAvgAdapterAggregator


def contribution(site, diff, weight, rnd=0, kind=DataKind.WEIGHT_DIFF, metrics=None, meta=None):
    meta = {Meta.EXAMPLE_COUNT: weight, Meta.METRICS: metrics or {}, **(meta or {})}
    s = DXO(kind, data=diff, meta=meta).to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return s


def test_weighted_average_matches_hand_computation(ctx):
    agg = FedAvgAdapterAggregator(min_contributions=3)
    a = {"x.lora_A.weight": np.array([[1.0, 2.0]], np.float32), "x.lora_B.weight": np.array([3.0], np.float32)}
    b = {"x.lora_A.weight": np.array([[4.0, -2.0]], np.float32), "x.lora_B.weight": np.array([0.0], np.float32)}
    c = {"x.lora_A.weight": np.array([[0.0, 1.0]], np.float32), "x.lora_B.weight": np.array([-6.0], np.float32)}
    for site, d, w in (("hospital-a", a, 240), ("hospital-b", b, 160), ("hospital-c", c, 120)):
        assert agg.accept(contribution(site, d, w, metrics={"train_loss": w / 100}), ctx)
    out = from_shareable(agg.aggregate(ctx))
    # (240*1 + 160*4 + 120*0) / 520 = 880/520 ; (240*2 - 160*2 + 120*1)/520 = 280/520 ; (720 + 0 - 720)/520 = 0
    np.testing.assert_allclose(out.data["x.lora_A.weight"], [[880 / 520, 280 / 520]], rtol=1e-6)
    np.testing.assert_allclose(out.data["x.lora_B.weight"], [0.0], atol=1e-7)
    assert out.data_kind == DataKind.WEIGHT_DIFF
    assert out.meta[Meta.EXAMPLE_COUNTS] == {"hospital-a": 240, "hospital-b": 160, "hospital-c": 120}
    assert out.meta[Meta.SITE_METRICS]["hospital-b"] == {"train_loss": 1.6}


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: contribution("s", {"k": np.ones(2, np.float32)}, 10, rnd=1), "for round 1"),
        (lambda: contribution("s", {"k": np.ones(2, np.float32)}, 0), "positive integer"),
        (lambda: contribution("s", {"k": np.ones(2, np.float32)}, 2.5), "positive integer"),
        (lambda: contribution("s", {"k": np.ones(2, np.float32)}, 10, kind=DataKind.WEIGHTS), "expected DataKind.WEIGHT_DIFF"),
        (lambda: contribution("s", {"k": np.array([np.nan, 1], np.float32)}, 10), "non-finite"),
        (lambda: contribution("s", {"other": np.ones(2, np.float32)}, 10), "do not match"),
        (lambda: contribution("s", {"k": np.ones(3, np.float32)}, 10), "has shape"),
    ],
)
def test_bad_contributions_are_rejected_with_a_reason(ctx, make, reason):
    agg = FedAvgAdapterAggregator(min_contributions=1)
    assert agg.accept(contribution("first", {"k": np.zeros(2, np.float32)}, 5), ctx)
    assert not agg.accept(make(), ctx)
    assert reason in agg.rejected["s"]


def test_duplicate_and_failed_results_are_rejected(ctx):
    agg = FedAvgAdapterAggregator(min_contributions=1)
    assert agg.accept(contribution("a", {"k": np.zeros(2, np.float32)}, 5), ctx)
    assert not agg.accept(contribution("a", {"k": np.zeros(2, np.float32)}, 5), ctx)
    failed = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    failed.set_peer_props({ReservedKey.IDENTITY_NAME: "b"})
    assert not agg.accept(failed, ctx)
    assert "second contribution" in agg.rejected["a"] and "EXECUTION_EXCEPTION" in agg.rejected["b"]


def test_too_few_accepted_contributions_end_the_round_with_names(ctx):
    agg = FedAvgAdapterAggregator(min_contributions=2)
    agg.accept(contribution("hospital-a", {"k": np.zeros(2, np.float32)}, 5), ctx)
    agg.accept(contribution("hospital-b", {"k": np.zeros(2, np.float32)}, -1), ctx)
    with pytest.raises(RuntimeError, match=r"1 accepted contributions, 2 required \(hospital-b: .*positive integer"):
        agg.aggregate(ctx)


def test_reset_starts_a_clean_round(ctx):
    agg = FedAvgAdapterAggregator(min_contributions=1)
    agg.accept(contribution("a", {"k": np.ones(2, np.float32)}, 5), ctx)
    agg.reset(ctx)
    agg.accept(contribution("a", {"k": np.full(2, 3.0, np.float32)}, 1), ctx)
    np.testing.assert_allclose(from_shareable(agg.aggregate(ctx)).data["k"], [3.0, 3.0])
