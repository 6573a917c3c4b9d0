"""The GPU paths a hospital with a CUDA card takes: bf16 on the GPU, and 4-bit QLoRA through bitsandbytes.
Each loads the project's base model, applies LoRA, runs a real training step and reads the adapter back.
Skipped on machines without CUDA."""

import math

import numpy as np
import pytest
import torch

from hospital_fedlora.config import DataFiles, LoraSettings
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.trainer import LocalTrainer, get_adapter_state, set_adapter_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def records(data_dir):
    site = data_dir / "hospital-b"
    files = DataFiles(train=site / "train.jsonl", validation=site / "validation.jsonl")
    return load_records(files, "train", "test")[:32], load_records(files, "validation", "test")[:8]


def _train_one_step(model, tokenizer, records):
    train, val = records
    trainer = LocalTrainer(
        model, tokenizer, train, val, max_seq_length=128, batch_size=8, micro_batch_size=4,
        learning_rate=1e-3, weight_decay=0.0, seed=0,
    )
    before = get_adapter_state(model)
    result = trainer.train(1)
    after = get_adapter_state(model)
    assert math.isfinite(result.last_loss) and result.tokens > 0
    assert math.isfinite(trainer.evaluate(8)) and math.isfinite(trainer.evaluate_base(8))
    return before, after


def _assert_float32_and_trained(before, after):
    assert before.keys() == after.keys() and len(after) == 2 * 2 * 2
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in after.values())
    assert not any(before[k].any() for k in before if "lora_B" in k)
    assert all(after[k].any() for k in after if "lora_B" in k)  # B left zero: the step reached the adapter


def test_bf16_on_cuda_trains_a_step(base_model_dir, records):
    placement = choose_placement("cuda", "auto", False)
    assert placement.device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert placement.dtype == expected
    model, tokenizer = load_base_model(base_model_dir, placement)
    assert all(p.device.type == "cuda" and p.dtype == expected for p in model.parameters())
    model = apply_lora(model, LoraSettings(r=8, dropout=0.0), seed=0)
    before, after = _train_one_step(model, tokenizer, records)
    _assert_float32_and_trained(before, after)
    set_adapter_state(model, before)  # a float32 global adapter loads into the GPU model
    restored = get_adapter_state(model)
    assert all(np.array_equal(restored[k], before[k]) for k in before)


def test_4bit_qlora_trains_a_step_and_returns_float32(base_model_dir, records):
    import bitsandbytes as bnb

    placement = choose_placement("auto", "auto", True)
    assert placement.load_in_4bit and placement.device.type == "cuda"
    model, tokenizer = load_base_model(base_model_dir, placement)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # q, k, v, o, gate, up, down in each of the 2 layers; the tied output head stays unquantized
    assert len(four_bit) == 2 * 7
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    assert all(m.weight.device.type == "cuda" for m in four_bit)

    model = apply_lora(model, LoraSettings(r=8, dropout=0.0), seed=0)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)  # LoRA sits on the quantized layer
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())

    before, after = _train_one_step(model, tokenizer, records)
    _assert_float32_and_trained(before, after)


def test_a_qlora_site_and_a_cpu_site_average_cleanly(base_model_dir, records):
    """The adapter leaves a 4-bit GPU site in the same float32 format as a CPU site's, and their average
    loads back into both (the plaintext aggregator does the averaging)."""
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants
    from test_fedavg_aggregator import contribution

    from hospital_fedlora.server.fedavg_aggregator import FedAvgAdapterAggregator
    from hospital_fedlora.site.trainer import subtract

    models, diffs = {}, {}
    for site, placement, checkpointing in (
        ("hospital-a", choose_placement("cpu", "auto", False), False),
        ("hospital-b", choose_placement("cuda", "auto", True), True),
    ):
        model, tokenizer = load_base_model(base_model_dir, placement, gradient_checkpointing=checkpointing)
        model = apply_lora(model, LoraSettings(r=8, dropout=0.0), seed=0)
        before, after = _train_one_step(model, tokenizer, records)
        models[site], diffs[site] = model, subtract(after, before)
    a, b = diffs["hospital-a"], diffs["hospital-b"]
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype == np.float32 for k in a)
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 0)
    agg = FedAvgAdapterAggregator(min_contributions=2)
    assert agg.accept(contribution("hospital-a", a, 30), ctx) and agg.accept(contribution("hospital-b", b, 10), ctx)
    mean = from_shareable(agg.aggregate(ctx)).data
    for model in models.values():
        state = {k: v + mean[k] for k, v in get_adapter_state(model).items()}
        set_adapter_state(model, state)
        assert all(np.array_equal(get_adapter_state(model)[k], state[k]) for k in state)
