"""LoRA variants that fit encrypted aggregation: FedProx's proximal term and FFA-LoRA (A frozen, only B sent).

Training checks run on the project's tiny base model; the federation checks drive the committed plaintext
and encrypted jobs' real components in one process (``job_in_process.JobInProcess``) and measure what each
hospital uploads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.decomposers import common_decomposers

from hospital_fedlora.config import ConfigError, DataFiles, LoraSettings, parse_recipe
from hospital_fedlora.he.bfv_context import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, BFVParams, make_context, serialize_context
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.lora_variants import add_proximal_gradient, is_frozen, sent_tensors
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.trainer import LocalTrainer, get_adapter_state, set_adapter_state

from deployment_helpers import write_site_configs
from job_in_process import REPO, JobInProcess

CPU = choose_placement("cpu", "auto", False)
SITES = ["hospital-a", "hospital-b"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores; results do not depend on it
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def records(data_dir):
    site = data_dir / "hospital-a"
    files = DataFiles(train=site / "train.jsonl", validation=site / "validation.jsonl")
    return load_records(files, "train", "test")[:32], load_records(files, "validation", "test")[:4]


def _model(base_model_dir, variant="lora"):
    """The shipped recipe's LoRA (the jobs' adapter shapes), without dropout."""
    model, tokenizer = load_base_model(base_model_dir, CPU)
    return apply_lora(model, LoraSettings(dropout=0.0, variant=variant), seed=0), tokenizer


def _train(model, tokenizer, records, steps=4, **kwargs):
    train, val = records
    trainer = LocalTrainer(
        model, tokenizer, train, val, max_seq_length=128, batch_size=4, micro_batch_size=4,
        learning_rate=1e-2, weight_decay=0.0, seed=0, **kwargs,
    )  # fmt: skip
    trainer.train(steps)
    return get_adapter_state(model)


# ------------------------------------------------------------------------------------------- the recipe
def test_recipe_takes_the_variant_and_mu_and_names_a_wrong_one():
    recipe = parse_recipe({"lora": {"variant": "ffa"}, "fedprox_mu": 0.01})
    assert recipe.lora.variant == "ffa" and recipe.fedprox_mu == 0.01
    assert parse_recipe({}).lora.variant == "lora" and parse_recipe({}).fedprox_mu == 0.0
    with pytest.raises(ConfigError, match=r"lora\.variant"):
        parse_recipe({"lora": {"variant": "flora"}})
    with pytest.raises(ConfigError, match="fedprox_mu"):
        parse_recipe({"fedprox_mu": -1})


# --------------------------------------------------------------------------------------------- FedProx
def test_proximal_gradient_is_mu_times_the_distance_to_the_anchor():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3, 4, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    anchor = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    data_grad = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    for p, d in zip(w, data_grad):
        p.grad = d.clone()
    add_proximal_gradient(w, anchor, mu=0.3)
    for p, a, d in zip(w, anchor, data_grad):
        torch.testing.assert_close(p.grad, d + 0.3 * (p.detach() - a))  # by hand: d/dw (mu/2)||w - a||^2
    # ... and it is what autograd makes of the term itself
    for p in w:
        p.grad = None
    (0.3 / 2 * sum(((p - a) ** 2).sum() for p, a in zip(w, anchor))).backward()
    autograd = [p.grad.clone() for p in w]
    for p in w:
        p.grad = None
    add_proximal_gradient(w, anchor, mu=0.3)
    for p, expected in zip(w, autograd):
        torch.testing.assert_close(p.grad, expected)


def test_fedprox_with_mu_zero_trains_bit_identically_and_mu_pulls_the_update_towards_the_global_adapter(
    base_model_dir, records
):
    model, tokenizer = _model(base_model_dir)
    start = get_adapter_state(model)
    runs = {}
    for name, kwargs in {"fedavg": {}, "mu0": {"fedprox_mu": 0.0}, "mu": {"fedprox_mu": 50.0}}.items():
        set_adapter_state(model, start)
        runs[name] = _train(model, tokenizer, records, **kwargs)
    for k in start:
        np.testing.assert_array_equal(runs["mu0"][k], runs["fedavg"][k])

    def update_norm(state):
        return float(np.sqrt(sum(((state[k] - start[k]) ** 2).sum() for k in start)))

    plain, prox = update_norm(runs["fedavg"]), update_norm(runs["mu"])
    assert 0 < prox < 0.8 * plain, (prox, plain)


# --------------------------------------------------------------------------------------------- FFA-LoRA
def test_ffa_freezes_a_at_its_seeded_init_and_trains_b(base_model_dir, records):
    model, tokenizer = _model(base_model_dir, "ffa")
    seeded = get_adapter_state(_model(base_model_dir, "lora")[0])  # the same seed: the same A everywhere
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    after = _train(model, tokenizer, records)
    a_keys = [k for k in after if ".lora_A." in k]
    b_keys = [k for k in after if ".lora_B." in k]
    assert a_keys and len(a_keys) == len(b_keys)
    for k in a_keys:
        np.testing.assert_array_equal(after[k], seeded[k])
    assert all(np.abs(after[k]).max() > 0 for k in b_keys)  # B starts at 0 and moved
    assert sorted(sent_tensors(after, "ffa")) == sorted(b_keys)
    assert sent_tensors(after, "lora") == after
    assert is_frozen("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "ffa")


def test_the_average_of_b_is_exact_for_the_product_when_a_is_shared():
    g = np.random.default_rng(0)
    a = g.standard_normal((8, 64))  # r x in, shared by every site
    bs = [g.standard_normal((32, 8)) for _ in range(3)]  # out x r, one per site
    weights = np.array([10.0, 30.0, 60.0]) / 100
    average_of_products = sum(w * b @ a for w, b in zip(weights, bs))
    product_of_average = sum(w * b for w, b in zip(weights, bs)) @ a
    np.testing.assert_allclose(product_of_average, average_of_products, rtol=1e-12, atol=1e-12)
    # Plain LoRA averages A too: the product of averages is not the average of products.
    a_s = [g.standard_normal((8, 64)) for _ in range(3)]
    mixed = sum(w * b for w, b in zip(weights, bs)) @ sum(w * x for w, x in zip(weights, a_s))
    assert not np.allclose(mixed, sum(w * b @ x for w, b, x in zip(weights, bs, a_s)))


# ----------------------------------------------------------------------------- one round of each job
def _federation(root, base_model_dir, data_dir, job, variant):
    encrypted = job == "fedlora_he"
    configs = write_site_configs(
        root / "site_configs", base_model_dir, data_dir, SITES, privacy={"require_encryption": encrypted}
    )
    files = {}
    if encrypted:
        made = make_context(BFVParams(), n_threads=1)
        files = {
            "client": {CLIENT_CONTEXT_FILE: serialize_context(made, secret=True)},
            "server": {SERVER_CONTEXT_FILE: serialize_context(made, secret=False)},
        }
    recipe = {"local_steps": 2, "max_eval_examples": 2, "batch_size": 4, "max_seq_length": 128, "lora": {"variant": variant}}
    return JobInProcess(REPO / "jobs" / job, root, SITES, files, site_configs=configs, client_args={"lora_executor": {"recipe": recipe}})


def _one_round(fed, rnd=0):
    """A round with every site; returns each site's upload (bytes) and the train result before its filters."""
    task = fed.task_data(rnd)
    uploads, results = {}, {}
    for site in SITES:
        results[site] = fed.train(site, fed.receive(site, task, rnd), rnd)
        plain = from_shareable(results[site]).data
        uploads[site] = fed.send(site, results[site], rnd)
        results[site] = plain
    fed.aggregate(rnd, uploads)
    return uploads, results


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, base_model_dir, data_dir):
    common_decomposers.register()  # numpy arrays in Shareables, as every FLARE process registers them
    out = {}
    for job in ("fedlora_plain", "fedlora_he"):
        for variant in ("lora", "ffa"):
            fed = _federation(tmp_path_factory.mktemp(f"{job}_{variant}"), base_model_dir, data_dir, job, variant)
            if job == "fedlora_plain":  # InitializeGlobalWeights: the seeded adapter from a site
                reply = fed.sites[SITES[0]].executor.execute("get_weights", None, fed.sites[SITES[0]].ctx(), None)
                fed.global_model = make_model_learnable(from_shareable(reply).data, {})
            uploads, results = _one_round(fed, 0)
            uploads2, _ = _one_round(fed, 1)  # the round that applies round 0's aggregate
            out[job, variant] = fed, uploads, results, uploads2
    return out


@pytest.mark.parametrize("job", ["fedlora_plain", "fedlora_he"])
def test_ffa_sends_only_b_and_about_half_the_bytes(rounds, job):
    _, lora_up, lora_results, _ = rounds[job, "lora"]
    _, ffa_up, ffa_results, _ = rounds[job, "ffa"]
    for site in SITES:
        sent = ffa_results[site]
        assert sent and all(".lora_B." in k for k in sent)
        assert sorted(sent) == sorted(k for k in lora_results[site] if ".lora_B." in k)
        ratio = len(ffa_up[site]) / len(lora_up[site])
        assert 0.4 < ratio < 0.6, (job, site, len(ffa_up[site]), len(lora_up[site]))
        if job == "fedlora_he":  # nothing of the adapter in the clear
            assert not any(isinstance(v, np.ndarray) and v.size > 1 for v in from_shareable(Shareable.from_bytes(ffa_up[site])).data.values())


@pytest.mark.parametrize("job", ["fedlora_plain", "fedlora_he"])
def test_ffa_keeps_a_at_its_seeded_value_at_every_site_and_all_sites_agree(rounds, job, base_model_dir):
    fed, *_ = rounds[job, "ffa"]
    seeded = get_adapter_state(_model(base_model_dir, "lora")[0])
    states = {site: get_adapter_state(fed.sites[site].executor.trainer.model) for site in SITES}
    for site, state in states.items():
        for k in (k for k in state if ".lora_A." in k):
            np.testing.assert_array_equal(state[k], seeded[k], err_msg=f"{site} {k}")
        assert any(np.abs(state[k]).max() > 0 for k in state if ".lora_B." in k), site


def test_ffa_adapter_saved_by_validate_holds_a_and_b_and_loads_with_peft(rounds, base_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hospital_fedlora.adapter_files import GLOBAL_ADAPTER_DIR, load_peft_adapter

    fed, *_ = rounds["fedlora_plain", "ffa"]
    site = fed.sites[SITES[0]]
    task = fed.task_data(2)
    reply = site.executor.execute("validate", fed.receive(SITES[0], task, 2), site.ctx(2), None)
    assert reply.get_return_code() == "OK"
    folder = site.executor.run_dir / GLOBAL_ADAPTER_DIR
    state, _ = load_peft_adapter(folder)
    expected = get_adapter_state(site.executor.trainer.model)
    assert sorted(state) == sorted(expected) and any(".lora_A." in k for k in state)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True)
    loaded = get_adapter_state(PeftModel.from_pretrained(base, folder))
    for k in expected:
        np.testing.assert_array_equal(loaded[k], expected[k])


# ------------------------------------------------------------------------------------ the simulator
@pytest.mark.e2e
def test_plaintext_job_with_ffa_in_the_simulator(tmp_path, base_model_dir):
    import json

    from safetensors.numpy import load_file

    from hospital_fedlora_tools.demo import derive_job, run_simulator

    job = derive_job(REPO / "jobs" / "fedlora_plain", tmp_path, num_rounds=1, local_steps=2)
    client = job / "app/config/config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["executors"][0]["executor"]["args"]["recipe"]["lora"] = {"variant": "ffa"}
    client.write_text(json.dumps(cfg, indent=2))
    sites = ("hospital-a", "hospital-b", "hospital-c")
    run = run_simulator(job, tmp_path / "ws", REPO / "site_configs", show=lambda s: None, plaintext_demo=True)

    server_round = load_file(str(run / "adapter_rounds" / "round_000.safetensors"))
    assert server_round and all(".lora_B." in k for k in server_round)  # the server never held A
    assert "holds LoRA B alone (lora.variant ffa)" in (tmp_path / "ws.log").read_text()
    seeded = get_adapter_state(_model(base_model_dir, "lora")[0])
    finals = [load_file(str(run.parents[1] / s / "simulate_job" / "global_adapter" / "adapter_model.safetensors")) for s in sites]
    for final in finals:
        assert sorted(final) == sorted(seeded)
        for k in final:
            expected = seeded[k] if ".lora_A." in k else server_round[k]
            np.testing.assert_array_equal(final[k], expected, err_msg=k)
