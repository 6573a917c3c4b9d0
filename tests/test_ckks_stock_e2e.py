"""The comparison job on NVFlare's stock CKKS path (HEBuilder contexts from the kits), on real processes.

Our executor and recipe, NVFlare's own ``HEModelEncryptor``, ``HEModelDecryptor``,
``HEInTimeAccumulateWeightedAggregator`` and ``HEModelShareableGenerator``, shortened to 2 rounds of 4 steps
on the shared provisioned federation. Plus the two small pieces of ours the job needs, on their own.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable

from hospital_fedlora.adapter_files import GLOBAL_ADAPTER_DIR, load_peft_adapter
from hospital_fedlora.protocol import ROUND_TEXT, Meta
from hospital_fedlora.server.adapter_persistor import ROUNDS_DIR
from hospital_fedlora.server.stock_he_persistor import StockHEAdapterPersistor
from hospital_fedlora.site.restore_adapter_shapes import RestoreAdapterShapes
from hospital_fedlora_tools.demo import derive_job

from deployment_helpers import REPO, SITES
from flare_harness import Engine, fl_ctx, kit_workspace

pytest_plugins = ["federation_fixtures"]

ROUNDS, STEPS = 2, 4


def ckks_context():
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2**40
    return ctx


def test_shapes_come_back_from_the_plaintext_adapter_the_site_saw_first():
    plain = {"a.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.lora_B.weight": np.ones((4, 2), np.float32)}
    f = RestoreAdapterShapes()
    assert f.process_dxo(DXO(DataKind.WEIGHTS, data=dict(plain)), None, FLContext()) is None
    ctx = ckks_context()
    decrypted = {k: ts.ckks_vector(ctx, v.ravel()).decrypt() for k, v in plain.items()}
    assert all(isinstance(v, list) for v in decrypted.values())  # what HEModelDecryptor hands on
    out = f.process_dxo(DXO(DataKind.WEIGHTS, data=decrypted), None, FLContext())
    for k, v in plain.items():
        assert out.data[k].shape == v.shape and out.data[k].dtype == np.float32
        np.testing.assert_allclose(out.data[k], v, atol=1e-4)


def test_flat_tensors_without_known_shapes_or_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="before any plaintext adapter"):
        RestoreAdapterShapes().process_dxo(DXO(DataKind.WEIGHTS, data={"w": [1.0, 2.0]}), None, FLContext())
    f = RestoreAdapterShapes()
    f.process_dxo(DXO(DataKind.WEIGHTS, data={"w": np.zeros((2, 2), np.float32)}), None, FLContext())
    with pytest.raises(ValueError, match=r"w has 3 values, expected shape \(2, 2\)"):
        f.process_dxo(DXO(DataKind.WEIGHTS, data={"w": [1.0, 2.0, 3.0]}), None, FLContext())


def test_persistor_skips_an_encrypted_global_adapter_and_saves_a_plaintext_one(tmp_path):
    ctx = fl_ctx("server", 0, Engine(workspace=kit_workspace(tmp_path, "server")), "job")
    run = tmp_path / "job"
    persistor = StockHEAdapterPersistor()
    encrypted = make_model_learnable({"w": ts.ckks_vector(ckks_context(), [1.0, 2.0])}, {})
    persistor.save_model(encrypted, ctx)
    assert not run.exists() or not any(run.iterdir())
    plain = make_model_learnable({"w": np.array([1.0, 2.0], np.float32)}, {Meta.ADAPTER_CONFIG: {"r": 8}})
    persistor.save_model(plain, ctx)
    assert sorted(p.name for p in run.iterdir()) == [ROUNDS_DIR, GLOBAL_ADAPTER_DIR]
    np.testing.assert_array_equal(load_peft_adapter(run / GLOBAL_ADAPTER_DIR)[0]["w"], [1.0, 2.0])


def submit(federation, tmp_path_factory, name: str) -> dict:
    job = derive_job(REPO / "jobs" / name, tmp_path_factory.mktemp(name), num_rounds=ROUNDS, local_steps=STEPS)
    job_id = federation.submit(job)
    meta = federation.wait(job_id, on_progress=None)
    result = federation.download(job_id, tmp_path_factory.mktemp(f"results_{name}"))
    return {"job_id": job_id, "meta": meta, "run": result / "workspace"}


@pytest.fixture(scope="module")
def stock_run(federation, tmp_path_factory):
    return submit(federation, tmp_path_factory, "fedlora_ckks_stock")


@pytest.fixture(scope="module")
def plain_run(federation, tmp_path_factory):
    return submit(federation, tmp_path_factory, "fedlora_plain")


def global_val_losses(log: str, site: str) -> list[float]:
    """Per round, the site's validation loss of the global adapter it received (from the executor's log)."""
    return [float(m) for m in re.findall(rf"{site} round \d+ of 0\.\.\d+ done: train loss [\d.]+, validation loss ([\d.]+) ->", log)]


@pytest.mark.e2e
def test_stock_ckks_job_completes_with_every_site_in_every_round(stock_run):
    assert stock_run["meta"]["status"] == "FINISHED:COMPLETED"
    log = (stock_run["run"] / "log.txt").read_text()
    for rnd in range(ROUNDS):
        assert f"aggregating 3 update(s) at round {rnd}" in log, rnd
        assert f"round {rnd}: global adapter not saved" in log and "are encrypted (CKKSVector)" in log, rnd
    assert "Finished ScatterAndGather Training." in log
    assert not (stock_run["run"] / "global_adapter").exists()


@pytest.mark.e2e
def test_sites_trained_every_round_on_decrypted_global_adapters(stock_run, deployed_kits):
    for site in SITES:
        log = (deployed_kits.clients[site] / stock_run["job_id"] / "log.txt").read_text()
        for rnd in range(ROUNDS):
            assert f"{site} {ROUND_TEXT.format(round=rnd, last=ROUNDS - 1)} done: train loss" in log, (site, rnd)
        # Round 0 starts from the plaintext initial adapter; every later round from a decrypted CKKS aggregate.
        assert log.count("Running HE encryption...") == ROUNDS, site
        assert log.count("restored the shapes of") == ROUNDS - 1, site


@pytest.mark.e2e
def test_stock_ckks_aggregate_matches_the_plaintext_aggregate(stock_run, plain_run, deployed_kits):
    """The weighted average survives encryption: round 2 starts from the same global adapter as plaintext."""
    for site in SITES:
        stock, plain = (
            global_val_losses((deployed_kits.clients[site] / r["job_id"] / "log.txt").read_text(), site)
            for r in (stock_run, plain_run)
        )
        assert len(stock) == len(plain) == ROUNDS, site
        assert stock[1] < stock[0], site  # the aggregate helped this site
        assert stock == pytest.approx(plain, rel=1e-3), site
