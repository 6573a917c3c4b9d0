"""The offline base model: reproducible, atomic, an ordinary HF Llama folder, and not already solving the tasks."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hospital_fedlora.site.prompting import tokenize_record
from hospital_fedlora.site.trainer import collate_batch
from hospital_fedlora_tools.base_model import BUILD_INFO, REQUIRED_FILES, build_base_model, is_complete_model
from hospital_fedlora_tools.synthetic_notes import generate_site_records

# A build small enough for a test: seconds, not minutes.
TINY = dict(corpus_docs=150, vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
            block_size=32, batch_size=4, warmup_steps=1)


def _tiny(path, seed=0, steps=3):
    return build_base_model(path, seed=seed, pretrain_steps=steps, log=None, **TINY)


def test_same_seed_gives_identical_weights_and_tokenizer(tmp_path):
    a, b, c = _tiny(tmp_path / "a"), _tiny(tmp_path / "b"), _tiny(tmp_path / "c", seed=1)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    info_a, info_b = (json.loads((p / BUILD_INFO).read_text()) for p in (a, b))
    assert info_a["final_pretrain_loss"] == info_b["final_pretrain_loss"]


def test_folder_is_a_complete_hf_llama_with_build_info(tmp_path):
    out = _tiny(tmp_path / "model", steps=4)
    assert is_complete_model(out)
    for name in REQUIRED_FILES:
        assert (out / name).is_file()
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok)
    info = json.loads((out / BUILD_INFO).read_text())
    assert info["spec"]["seed"] == 0 and info["spec"]["pretrain_steps"] == 4
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["final_pretrain_loss"] > 0


def test_existing_complete_model_is_kept_unless_overwrite(tmp_path):
    out = _tiny(tmp_path / "model", seed=0)
    before = (out / "model.safetensors").read_bytes()
    _tiny(out, seed=1)  # complete already: untouched
    assert (out / "model.safetensors").read_bytes() == before
    build_base_model(out, seed=1, pretrain_steps=3, overwrite=True, log=None, **TINY)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old folders left


def test_failed_build_leaves_no_half_built_folder(tmp_path):
    # A corpus too small for one block fails after the tokenizer is trained, inside the staging folder.
    with pytest.raises(ValueError, match="corpus too small"):
        build_base_model(tmp_path / "model", pretrain_steps=1, log=None, **{**TINY, "corpus_docs": 1, "block_size": 500})
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_old_model(tmp_path):
    out = _tiny(tmp_path / "model")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError):
        build_base_model(out, pretrain_steps=1, overwrite=True, log=None, **{**TINY, "corpus_docs": 1, "block_size": 500})
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cli_is_a_no_op_on_a_complete_model(tmp_path):
    out = _tiny(tmp_path / "model")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    result = subprocess.run(
        [sys.executable, "-m", "hospital_fedlora_tools.base_model", "--out", str(out)],
        capture_output=True, text=True, check=True,
    )
    assert "already holds a complete base model" in result.stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- the workspace's real model
def test_tokenizer_behaves_like_llamas(base_model_dir):
    tok = AutoTokenizer.from_pretrained(base_model_dir, local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("Obs HR 118 BP 90/60 T 38.2 SpO2 91.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Obs HR 118 BP 90/60 T 38.2 SpO2 91."


def test_pretraining_learned_the_language(base_model_dir):
    info = json.loads((base_model_dir / BUILD_INFO).read_text())
    assert info["final_pretrain_loss"] < info["initial_pretrain_loss"] / 4


def test_lora_has_something_to_learn(base_model_dir):
    """The base model does not solve the tasks, and a few plain peft LoRA steps lower the response loss."""
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(base_model_dir, local_files_only=True)
    records = generate_site_records("hospital-c", 120 + 24, seed=0)
    train = [tokenize_record(r, tok, 256) for r in records[:120]]
    val = collate_batch([tokenize_record(r, tok, 256) for r in records[120:]], tok.pad_token_id)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True)
    with torch.no_grad():
        base_loss = model(**val).loss.item()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(15):
        batch = collate_batch([train[i] for i in torch.randint(len(train), (8,), generator=gen).tolist()], tok.pad_token_id)
        model(**batch).loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    with torch.no_grad():
        tuned_loss = model(**val).loss.item()
    assert base_loss > 3.0  # not already solved by pre-training
    assert tuned_loss < base_loss - 0.3


# ----------------------------------------------------------------------- published shapes, random weights
# The 1B shape scaled down through the same code path: same heads ratio, rope, tied embeddings and vocab
# larger than the tokenizer, but 64 wide and 2 layers deep; small shards so the index has several.
SMALL_1B = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=4096)


def test_real_shape_folder_loads_with_published_config_shards_and_chat_template(tmp_path, base_model_dir):
    from hospital_fedlora_tools.real_shapes import BUILD_INFO as SHAPE_INFO, EOT, INDEX, build_real_shape, is_complete

    out = build_real_shape(tmp_path / "m", "llama-3.2-1b", base_model_dir, shard_bytes=600_000, log=None, **SMALL_1B)
    assert is_complete(out) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["max_position_embeddings"] == 131072
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 32.0
    assert (config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (2, 4096, True)

    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert "lm_head.weight" not in index["weight_map"]  # tied
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert index["metadata"]["total_size"] == 2 * n_params
    assert json.loads((out / SHAPE_INFO).read_text())["parameters"] == n_params

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    text = tok.apply_chat_template([{"role": "user", "content": "Obs HR 118"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|start_header_id|>user<|end_header_id|>\n\nObs HR 118<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "Obs HR 118"}], tokenize=True)["input_ids"]
    assert tok.convert_tokens_to_ids(EOT) in ids and max(ids) < config["vocab_size"]
    assert model(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), 4096)


def test_real_shape_weights_are_seeded_per_tensor_and_8b_is_untied(tmp_path, base_model_dir):
    from hospital_fedlora_tools.real_shapes import SHAPES, build_real_shape, weight_shapes

    small = dict(SMALL_1B, num_hidden_layers=1)
    a = build_real_shape(tmp_path / "a", "llama-3.1-8b", base_model_dir, log=None, **small)
    b = build_real_shape(tmp_path / "b", "llama-3.1-8b", base_model_dir, shard_bytes=300_000, log=None, **small)
    wa = load_file(a / "model-00001-of-00001.safetensors")
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert wa.keys() == wb.keys() and "lm_head.weight" in wa  # 8B does not tie
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the shard layout does not change the weights
    assert json.loads((a / "config.json").read_text())["rope_scaling"]["factor"] == 8.0
    # the published full-size parameter counts
    assert sum(torch.Size(s).numel() for s in weight_shapes(SHAPES["llama-3.2-1b"]).values()) == 1_235_814_400
    assert sum(torch.Size(s).numel() for s in weight_shapes(SHAPES["llama-3.1-8b"]).values()) == 8_030_261_248
