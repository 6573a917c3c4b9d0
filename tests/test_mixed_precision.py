"""Whatever a site's precision, the adapter trains in float32 and leaves in one format: a site on a bfloat16 base
model and one on float32 average cleanly; gradient checkpointing changes memory, not results. Real transformers
and peft on the tiny model, on CPU (bfloat16 matmuls run there too); the 4-bit QLoRA counterpart is in
``test_gpu_paths.py`` and runs where there is CUDA."""

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from test_fedavg_aggregator import contribution

from hospital_fedlora.config import DataFiles, LoraSettings
from hospital_fedlora.server.fedavg_aggregator import FedAvgAdapterAggregator
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.model_loading import Placement, apply_lora, load_base_model
from hospital_fedlora.site.trainer import LocalTrainer, get_adapter_state, set_adapter_state, subtract

FLOAT32 = Placement(torch.device("cpu"), torch.float32, False)
BFLOAT16 = Placement(torch.device("cpu"), torch.bfloat16, False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def records(data_dir):
    site = data_dir / "hospital-b"
    files = DataFiles(train=site / "train.jsonl", validation=site / "validation.jsonl")
    return load_records(files, "train", "test")[:32], load_records(files, "validation", "test")[:8]


def _site(base_model_dir, records, placement, checkpointing=False):
    model, tok = load_base_model(base_model_dir, placement, gradient_checkpointing=checkpointing)
    model = apply_lora(model, LoraSettings(r=8, dropout=0.0), seed=0)
    trainer = LocalTrainer(model, tok, *records, max_seq_length=96, batch_size=8, micro_batch_size=4,
                           learning_rate=1e-3, weight_decay=0.0, seed=1)
    return model, trainer


def test_lora_trains_in_float32_on_a_bfloat16_base(base_model_dir, records):
    model, trainer = _site(base_model_dir, records, BFLOAT16)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad and p.ndim == 2]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # AdamW keeps its moments in the parameters' dtype: float32 here.
    before = get_adapter_state(model)
    result = trainer.train(2)
    assert np.isfinite(result.last_loss)
    after = get_adapter_state(model)
    assert all(after[k].dtype == np.float32 for k in after)
    assert any(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_a_bfloat16_site_and_a_float32_site_average_cleanly(base_model_dir, records):
    diffs = {}
    for site, placement in (("hospital-a", FLOAT32), ("hospital-b", BFLOAT16)):
        model, trainer = _site(base_model_dir, records, placement)
        start = get_adapter_state(model)
        trainer.train(2)
        diffs[site] = subtract(get_adapter_state(model), start)
    a, b = diffs["hospital-a"], diffs["hospital-b"]
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype == np.float32 for k in a)

    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 0)
    agg = FedAvgAdapterAggregator(min_contributions=2)
    assert agg.accept(contribution("hospital-a", a, 30), ctx) and agg.accept(contribution("hospital-b", b, 10), ctx)
    mean = from_shareable(agg.aggregate(ctx)).data
    for k in a:
        np.testing.assert_allclose(mean[k], (30 * a[k] + 10 * b[k]) / 40, rtol=1e-5, atol=1e-8)
    # The averaged difference applies to either site's model.
    for placement in (FLOAT32, BFLOAT16):
        model, _ = _site(base_model_dir, records, placement)
        state = {k: v + mean[k] for k, v in get_adapter_state(model).items()}
        set_adapter_state(model, state)
        np.testing.assert_array_equal(get_adapter_state(model)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                                      state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_gradient_checkpointing_changes_nothing_but_memory(base_model_dir, records):
    results = []
    for checkpointing in (False, True):
        model, trainer = _site(base_model_dir, records, FLOAT32, checkpointing)
        assert model.base_model.model.is_activation_checkpointing == checkpointing
        start = get_adapter_state(model)
        loss = trainer.train(2).mean_loss
        results.append((loss, subtract(get_adapter_state(model), start)))
    (loss_off, diff_off), (loss_on, diff_on) = results
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for k in diff_off:
        np.testing.assert_allclose(diff_on[k], diff_off[k], rtol=1e-4, atol=1e-7)
