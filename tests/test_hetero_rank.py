"""Heterogeneous LoRA rank in plaintext jobs: a site trains its first ``lora_rank`` ranks and sends them
zero-padded; the plaintext aggregator averages each rank slot over the sites that train it; an encrypted
job refuses a lower rank."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from nvflare.apis.dxo import from_shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.decomposers import common_decomposers
from test_fedavg_aggregator import contribution as fedavg_contribution

from hospital_fedlora.config import ConfigError, SiteConfig, parse_recipe, validate
from hospital_fedlora.protocol import Meta
from hospital_fedlora.server.fedavg_aggregator import FedAvgAdapterAggregator
from hospital_fedlora.site.lora_variants import site_rank, truncate_rank
from hospital_fedlora.site.trainer import get_adapter_state
from hospital_fedlora.transport.quantization import max_abs_error
from hospital_fedlora.transport.quantize_filter import QuantizeFilter

from deployment_helpers import write_site_configs
from job_in_process import REPO, JobInProcess

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def contribution(site, diff, weight, rank=None):
    return fedavg_contribution(site, diff, weight, meta={Meta.LORA_RANK: rank} if rank is not None else None)


def test_truncation_zeroes_a_rows_and_b_columns_from_the_rank_on():
    state = {A: np.ones((4, 3), np.float32), B: np.ones((5, 4), np.float32), "other": np.ones((4, 4), np.float32)}
    out = truncate_rank(state, 2)
    assert out[A][:2].all() and not out[A][2:].any()
    assert out[B][:, :2].all() and not out[B][:, 2:].any()
    np.testing.assert_array_equal(out["other"], state["other"])
    assert state[A].all()  # the input is left as it was


def test_each_rank_slot_is_averaged_over_the_sites_that_train_it(ctx):
    g = np.random.default_rng(0)
    full = {A: g.standard_normal((4, 3)).astype(np.float32), B: g.standard_normal((5, 4)).astype(np.float32)}
    low = truncate_rank({A: g.standard_normal((4, 3)), B: g.standard_normal((5, 4))}, 2)
    agg = FedAvgAdapterAggregator(min_contributions=2)
    assert agg.accept(contribution("hospital-a", full, 300), ctx)
    assert agg.accept(contribution("hospital-b", low, 100, rank=2), ctx)
    out = from_shareable(agg.aggregate(ctx)).data
    np.testing.assert_allclose(out[A][:2], (300 * full[A][:2] + 100 * low[A][:2]) / 400, rtol=1e-6)
    np.testing.assert_allclose(out[A][2:], full[A][2:], rtol=1e-6)  # only hospital-a trains slots 2, 3
    np.testing.assert_allclose(out[B][:, :2], (300 * full[B][:, :2] + 100 * low[B][:, :2]) / 400, rtol=1e-6)
    np.testing.assert_allclose(out[B][:, 2:], full[B][:, 2:], rtol=1e-6)


@pytest.mark.parametrize(
    "rank, diff, reason",
    [
        (2, {A: np.ones((4, 3), np.float32), B: np.zeros((5, 4), np.float32)}, "beyond the site's declared rank 2"),
        (5, {A: np.zeros((4, 3), np.float32), B: np.zeros((5, 4), np.float32)}, "expected a rank from 1 to the job's (4)"),
        ("2", {A: np.zeros((4, 3), np.float32), B: np.zeros((5, 4), np.float32)}, "expected a rank"),
    ],
)
def test_a_declared_rank_that_does_not_fit_is_rejected(ctx, rank, diff, reason):
    agg = FedAvgAdapterAggregator(min_contributions=1)
    assert not agg.accept(contribution("hospital-b", diff, 10, rank=rank), ctx)
    assert reason in agg.rejected["hospital-b"]


def _site(**fields):
    raw = yaml.safe_load((REPO / "site_configs" / "hospital-a.yaml").read_text())
    return validate(SiteConfig, {**raw, **fields}, "hospital-a.yaml", "docs/hospital-it.md")


def test_site_rank_is_checked_against_the_job():
    recipe = parse_recipe({"lora": {"r": 8}})
    plain = REPO / "jobs/fedlora_plain/app/config/config_fed_client.json"
    he = REPO / "jobs/fedlora_he/app/config/config_fed_client.json"
    assert site_rank(_site(lora_rank=4), recipe, plain, "train", "hospital-a.yaml") == 4
    assert site_rank(_site(lora_rank=8), recipe, he, "train", "hospital-a.yaml") is None  # the job's own rank
    assert site_rank(_site(), recipe, he, "train", "hospital-a.yaml") is None
    with pytest.raises(ConfigError, match=r"hospital-a.yaml: field 'lora_rank' is 9, above the job's LoRA rank"):
        site_rank(_site(lora_rank=9), recipe, plain, "train", "hospital-a.yaml")
    with pytest.raises(ConfigError, match=r"field 'lora_rank' \(4, below the job's 8\) works in plaintext jobs only"):
        site_rank(_site(lora_rank=4), recipe, he, "train", "hospital-a.yaml")


def test_a_low_rank_site_trains_its_first_ranks_in_a_plaintext_round(tmp_path, base_model_dir, data_dir):
    common_decomposers.register()
    sites = ["hospital-a", "hospital-b"]
    configs = write_site_configs(tmp_path / "site_configs", base_model_dir, data_dir, sites, privacy={"require_encryption": False})
    raw = yaml.safe_load((configs / "hospital-b.yaml").read_text())
    (configs / "hospital-b.yaml").write_text(yaml.safe_dump({**raw, "lora_rank": 3}))
    recipe = {"local_steps": 2, "max_eval_examples": 2, "batch_size": 4, "max_seq_length": 128}
    fed = JobInProcess(REPO / "jobs" / "fedlora_plain", tmp_path, sites, {}, site_configs=configs,
                       client_args={"lora_executor": {"recipe": recipe}})  # fmt: skip
    a = fed.sites["hospital-a"].executor
    reply = a.execute("get_weights", None, fed.sites["hospital-a"].ctx(), None)
    start = from_shareable(reply).data
    fed.global_model = make_model_learnable({k: v.copy() for k, v in start.items()}, {})
    task = fed.task_data(0)
    diffs, counts, uploads = {}, {}, {}
    for site in sites:
        result = fed.train(site, fed.receive(site, task, 0), 0)
        dxo = from_shareable(result)
        diffs[site], counts[site] = dxo.data, dxo.get_meta_prop(Meta.EXAMPLE_COUNT)
        assert dxo.get_meta_prop(Meta.LORA_RANK) == (3 if site == "hospital-b" else None)
        uploads[site] = fed.send(site, result, 0)
    low = diffs["hospital-b"]
    assert all(low[k].shape == diffs["hospital-a"][k].shape for k in low)  # zero-padded to the job's rank
    for k, v in low.items():
        assert not (v[3:] if ".lora_A." in k else v[:, 3:]).any(), k
    assert any(np.abs(v[:, :3]).max() > 0 for k, v in low.items() if ".lora_B." in k)
    fed.aggregate(0, uploads)
    weights = fed.global_model["weights"]
    # the job's quantized transport: each upload's values restore within the mode's bound; zeros stay zero,
    # so padding is still told apart exactly (tail slots below average hospital-a's values alone)
    q = next(f for f in fed.sites["hospital-a"].result_filters if isinstance(f, QuantizeFilter)).settings
    for k, v in start.items():
        atol = max_abs_error(q.mode, q.rounding, max(float(np.abs(d[k]).max()) for d in diffs.values())) + 1e-7
        ax = 0 if ".lora_A." in k else 1
        da, db = diffs["hospital-a"][k], low[k]
        n = da.shape[ax]
        head = [slice(None)] * 2
        head[ax] = slice(0, 3)
        tail = [slice(None)] * 2
        tail[ax] = slice(3, n)
        wa, wb = counts["hospital-a"], counts["hospital-b"]
        expected_head = v[tuple(head)] + (wa * da[tuple(head)] + wb * db[tuple(head)]) / (wa + wb)
        np.testing.assert_allclose(weights[k][tuple(head)], expected_head, rtol=1e-5, atol=atol)
        np.testing.assert_allclose(weights[k][tuple(tail)], v[tuple(tail)] + da[tuple(tail)], rtol=1e-5, atol=atol)
    # next round the low-rank site again holds the global adapter (as it arrives) truncated to its rank
    received = fed.receive("hospital-b", fed.task_data(1), 1)
    arrived = from_shareable(received).data
    fed.sites["hospital-b"].executor._received_adapter(received, None)
    b_state = get_adapter_state(fed.sites["hospital-b"].executor.trainer.model)
    for k, v in b_state.items():
        assert not (v[3:] if ".lora_A." in k else v[:, 3:]).any(), k
        np.testing.assert_array_equal(v[:3] if ".lora_A." in k else v[:, :3], (arrived[k][:3] if ".lora_A." in k else arrived[k][:, :3]))
        down = fed.server_data_filters[0].settings  # the global adapter's transport, server to sites
        assert np.abs(arrived[k] - weights[k]).max() <= max_abs_error(down.mode, down.rounding, float(np.abs(weights[k]).max())), k
