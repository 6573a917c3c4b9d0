"""Quantization with a shared, fixed scale: ranges, error bound, unbiasedness, clipping, bad input."""

import math

import pytest
import torch

from hospital_fedlora.he.encoding import (
    contribution_weight,
    dequantize,
    qmax,
    quantize,
    resolve_clips,
    step_size,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits,dtype", [(8, torch.int8), (16, torch.int16)])
def test_integers_stay_in_symmetric_range_and_within_one_step(bits, dtype):
    clip = 0.01
    x = {"a": torch.randn(64, 33, generator=gen(1)) * 0.004, "b": torch.linspace(-0.02, 0.02, 1001)}
    q = quantize(x, clip, bits, gen(2))
    assert q.ints["a"].dtype == dtype and q.ints["a"].shape == (64, 33)
    for t in q.ints.values():
        assert int(t.abs().max()) <= qmax(bits)
    back = dequantize(q.ints, clip, bits)
    for name in x:
        clipped = x[name].clamp(-clip, clip)
        assert float((back[name] - clipped).abs().max()) < step_size(clip, bits)
    assert back["a"].dtype == torch.float32


def test_clipped_values_are_counted_and_saturate():
    x = {"w": torch.tensor([0.5, -0.5, 0.001, 2.0])}
    q = quantize(x, 1.0, 8, gen())
    assert q.n_clipped == 1 and q.n_values == 4
    assert q.ints["w"][3] == 127
    q = quantize({"w": torch.tensor([-3.0, 3.0, 1.0])}, 1.0, 16, gen())
    assert q.n_clipped == 2
    assert q.ints["w"].tolist() == [-32767, 32767, 32767]


def test_stochastic_rounding_is_unbiased():
    clip, bits = 1.0, 8
    step = step_size(clip, bits)
    value = 10.3 * step  # sits 30% of the way between two integers
    x = {"v": torch.full((200_000,), value)}
    q = quantize(x, clip, bits, gen(7)).ints["v"].double()
    assert set(q.unique().tolist()) == {10.0, 11.0}
    # standard error of the mean is sqrt(0.21 / 200000) ~= 0.001; 5 sigma
    assert abs(q.mean().item() - 10.3) < 0.005


def test_pre_weighted_sites_average_to_the_example_weighted_mean_within_the_bound():
    """Weights enter before rounding: the plain sum of integers divided by sum(a) is the weighted mean."""
    clip, bits = 6e-3, 16
    sites = [torch.randn(50_000, generator=gen(s)) * 1e-3 for s in range(3)]
    counts = [1200, 300, 1600]
    a = [contribution_weight(c, full_weight=1600) for c in counts]
    assert a == [0.75, 0.1875, 1.0]
    summed = sum(quantize({"w": s}, clip, bits, gen(100 + i), weight=w).ints["w"].to(torch.int64)
                 for i, (s, w) in enumerate(zip(sites, a)))
    avg = dequantize({"w": summed}, clip, bits, total_weight=sum(a))["w"]
    true = sum(c * s.double() for c, s in zip(counts, sites)) / sum(counts)
    err = float((avg.double() - true).abs().max())
    assert err < step_size(clip, bits) * len(sites) / sum(a)
    # the bound is loose: rounding errors average out
    assert float((avg.double() - true).pow(2).mean().sqrt()) < step_size(clip, bits) / 2


def test_contribution_weight():
    assert contribution_weight(800, full_weight=1600) == 0.5
    assert contribution_weight(5000, full_weight=1600) == 1.0  # clamped
    assert 0 < contribution_weight(0, full_weight=1600) <= 1 / 1600
    with pytest.raises(ValueError, match="full_weight"):
        contribution_weight(10, full_weight=0)
    with pytest.raises(ValueError, match="weight must be in \\(0, 1\\]"):
        quantize({"w": torch.zeros(2)}, 1.0, 8, gen(), weight=2.0)


def test_same_seed_same_integers_and_input_untouched():
    x = {"w": torch.randn(1000, generator=gen(3), dtype=torch.float64) * 0.1}
    before = x["w"].clone()
    a = quantize(x, 0.2, 8, gen(5)).ints["w"]
    b = quantize(x, 0.2, 8, gen(5)).ints["w"]
    c = quantize(x, 0.2, 8, gen(6)).ints["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x["w"], before)


def test_per_tensor_clip_patterns():
    names = ["layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"]
    assert resolve_clips(names, {"lora_A": 0.1, "lora_B": 0.02}) == {names[0]: 0.1, names[1]: 0.02}
    # first matching pattern wins, in the mapping's order
    assert resolve_clips(names, {"lora_B": 0.5, ".*": 1.0}) == {names[0]: 1.0, names[1]: 0.5}
    x = {names[0]: torch.tensor([0.05]), names[1]: torch.tensor([0.05])}
    q = quantize(x, {"lora_A": 0.1, "lora_B": 0.02}, 8, gen())
    assert q.n_clipped == 1 and int(q.ints[names[1]][0]) == 127
    assert int(q.ints[names[0]][0]) in (63, 64)


@pytest.mark.parametrize(
    "clip,match",
    [
        ({"lora_A": 0.1}, "no pattern matches tensor 'x.lora_B'"),
        (0.0, "positive finite"),
        (-1.0, "positive finite"),
        (math.inf, "positive finite"),
        ({}, "empty mapping"),
        ({"lora": "big"}, r"clip\['lora'\]"),
    ],
)
def test_bad_clip_settings_are_named(clip, match):
    with pytest.raises(ValueError, match=match):
        quantize({"x.lora_B": torch.zeros(3)}, clip, 8, gen())


def test_bad_tensors_are_named():
    with pytest.raises(ValueError, match="'w' contains NaN"):
        quantize({"w": torch.tensor([1.0, float("nan")])}, 1.0, 8, gen())
    with pytest.raises(TypeError, match="'w' must be a floating-point"):
        quantize({"w": torch.tensor([1, 2])}, 1.0, 8, gen())
    with pytest.raises(ValueError, match="8 or 16"):
        quantize({"w": torch.zeros(2)}, 1.0, 4, gen())
    with pytest.raises(ValueError, match="total_weight"):
        dequantize({"w": torch.zeros(2, dtype=torch.int64)}, 1.0, 8, total_weight=0)
