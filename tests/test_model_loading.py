"""Loading a site's base model and putting LoRA on it: folder checks, placement rules, seeded adapters,
and the Llama / Mistral / Qwen2 module naming the executor promises. Real transformers and peft, on CPU."""

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hospital_fedlora.config import ConfigError, LoraSettings
from hospital_fedlora.site.model_loading import (
    apply_lora,
    check_causal_lm_folder,
    choose_placement,
    load_base_model,
)
from hospital_fedlora.site.trainer import get_adapter_state

CPU = choose_placement("cpu", "auto", False)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _copy_tokenizer(base_model_dir, dest):
    for name in TOKENIZER_FILES:
        shutil.copy(base_model_dir / name, dest / name)


def _model_folder(tmp_path, base_model_dir, name="model"):
    """A copy of the project's base model that a test may break."""
    dest = tmp_path / name
    shutil.copytree(base_model_dir, dest)
    return dest


# -------------------------------------------------------------------------------------- folder checks
def test_project_base_model_passes_the_folder_check(base_model_dir):
    check_causal_lm_folder(base_model_dir)


def test_encoder_folder_is_refused_as_not_a_causal_lm(tmp_path, base_model_dir):
    folder = tmp_path / "bert"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(folder)
    _copy_tokenizer(base_model_dir, folder)
    with pytest.raises(ConfigError) as err:
        check_causal_lm_folder(folder, source="site_configs/hospital-a.yaml")
    message = str(err.value)
    assert "site_configs/hospital-a.yaml" in message
    assert "'base_model_path'" in message and str(folder) in message
    assert "'bert'" in message and "not a causal language model" in message


def test_config_json_with_a_non_lm_model_type_is_refused(tmp_path, base_model_dir):
    folder = tmp_path / "vision"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    _copy_tokenizer(base_model_dir, folder)
    with pytest.raises(ConfigError, match=r"'base_model_path'.*model_type 'vit' is not a causal language model"):
        check_causal_lm_folder(folder)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'base_model_path'.*folder not found"):
        load_base_model(tmp_path / "nowhere", CPU)


def test_folder_without_config_json_is_refused(tmp_path, base_model_dir):
    folder = _model_folder(tmp_path, base_model_dir)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"'base_model_path'.*no config.json"):
        load_base_model(folder, CPU)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_config_json_is_refused(tmp_path, base_model_dir, text):
    folder = _model_folder(tmp_path, base_model_dir)
    (folder / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"'base_model_path'.*config.json (is not valid JSON|holds a list)"):
        load_base_model(folder, CPU)


def test_folder_without_tokenizer_is_refused(tmp_path, base_model_dir):
    folder = _model_folder(tmp_path, base_model_dir)
    for name in TOKENIZER_FILES:
        (folder / name).unlink()
    with pytest.raises(ConfigError, match=r"'base_model_path'.*no tokenizer files"):
        load_base_model(folder, CPU)


# ------------------------------------------------------------- a staged real checkpoint's weight files
def _sharded_folder(tmp_path, base_model_dir):
    """The project's model saved as a hub checkpoint is: safetensors shards with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True).save_pretrained(folder, max_shard_size="3MB")
    _copy_tokenizer(base_model_dir, folder)
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    return folder, shards


def test_sharded_checkpoint_passes_and_loads(tmp_path, base_model_dir):
    folder, _ = _sharded_folder(tmp_path, base_model_dir)
    check_causal_lm_folder(folder)
    model, _ = load_base_model(folder, CPU)
    assert sum(p.numel() for p in model.parameters()) == 2119936


def test_shard_named_in_the_index_but_missing_is_refused(tmp_path, base_model_dir):
    folder, shards = _sharded_folder(tmp_path, base_model_dir)
    (folder / shards[-1]).unlink()
    with pytest.raises(ConfigError) as err:
        check_causal_lm_folder(folder, source="site_configs/hospital-a.yaml")
    message = str(err.value)
    assert "site_configs/hospital-a.yaml: field 'base_model_path'" in message
    assert f"model.safetensors.index.json names 1 shard(s) not in the folder: {shards[-1]}" in message


def test_truncated_shard_is_refused(tmp_path, base_model_dir):
    folder, shards = _sharded_folder(tmp_path, base_model_dir)
    data = (folder / shards[0]).read_bytes()
    (folder / shards[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"'base_model_path'.*{shards[0]} is truncated .* the copy stopped part way"):
        check_causal_lm_folder(folder)


def test_git_lfs_pointer_instead_of_weights_is_refused(tmp_path, base_model_dir):
    folder = _model_folder(tmp_path, base_model_dir)
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2147\nsize 8479864\n"
    )
    with pytest.raises(ConfigError, match=r"'base_model_path'.*model.safetensors is a Git LFS pointer.*git lfs pull"):
        check_causal_lm_folder(folder)


def test_folder_without_weights_is_refused(tmp_path, base_model_dir):
    folder = _model_folder(tmp_path, base_model_dir)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"'base_model_path'.*no weights \(expected model.safetensors"):
        check_causal_lm_folder(folder)


def test_unreadable_shard_index_is_refused(tmp_path, base_model_dir):
    folder, _ = _sharded_folder(tmp_path, base_model_dir)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ConfigError, match=r"model.safetensors.index.json is not a valid shard index"):
        check_causal_lm_folder(folder)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, base_model_dir):
    folder = _model_folder(tmp_path, base_model_dir)
    config = json.loads((folder / "config.json").read_text())
    # as when a Llama-3 tokenizer (128,256 ids) is staged next to a model with a smaller vocabulary
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ConfigError) as err:
        check_causal_lm_folder(folder, source="hospital-b.yaml")
    message = str(err.value)
    assert "hospital-b.yaml: field 'base_model_path'" in message
    assert "tokenizer has ids up to 2099 but the model has 1000 embedding rows" in message
    # more rows than tokens is normal (Llama-3, Qwen2 pad their embeddings): accepted
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 4096}))
    check_causal_lm_folder(folder)


# ------------------------------------------------------------------------------------------ placement
@NO_CUDA
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"hospital-a.yaml: field 'device' is 'cuda' but no CUDA GPU"):
        choose_placement("cuda", "auto", False, source="hospital-a.yaml")


@NO_CUDA
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_4bit_without_a_gpu_is_refused(device):
    with pytest.raises(ConfigError, match=r"field 'load_in_4bit' needs a CUDA GPU"):
        choose_placement(device, "auto", True)


@NO_CUDA
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_is_refused(dtype):
    with pytest.raises(ConfigError, match=rf"field 'dtype' is '{dtype}'; on CPU only float32"):
        choose_placement("auto", dtype, False)


@NO_CUDA
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_auto_is_float32_on_cpu(device):
    placement = choose_placement(device, "auto", False)
    assert placement.device == torch.device("cpu")
    assert placement.dtype == torch.float32
    assert not placement.load_in_4bit
    assert choose_placement(device, "float32", False) == placement


def test_base_model_loads_on_cpu_in_float32_with_a_pad_token(base_model_dir):
    model, tokenizer = load_base_model(base_model_dir, CPU)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert tokenizer.pad_token_id is not None


# ----------------------------------------------------------------------------------------------- LoRA
def test_unknown_target_module_is_refused_naming_the_field(base_model_dir):
    model, _ = load_base_model(base_model_dir, CPU)
    settings = LoraSettings(target_modules=("q_proj", "query_key_value"))
    with pytest.raises(ConfigError) as err:
        apply_lora(model, settings, seed=0, source="job recipe")
    message = str(err.value)
    assert "job recipe" in message and "'lora.target_modules'" in message
    assert "query_key_value" in message and "'q_proj'" not in message


def test_same_seed_gives_the_same_initial_adapter_at_every_site(base_model_dir):
    settings = LoraSettings(r=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    states = []
    for seed in (7, 7, 8):
        model, _ = load_base_model(base_model_dir, CPU)
        torch.manual_seed(1234 + len(states))  # whatever the process did before must not matter
        states.append(get_adapter_state(apply_lora(model, settings, seed=seed)))
    same, other = states[0], states[1]
    assert same.keys() == other.keys() and len(same) == 2 * 2 * 4  # A and B, 2 layers, 4 modules
    assert all((same[k] == other[k]).all() for k in same)
    a_keys = [k for k in same if "lora_A" in k]
    assert all(same[k].any() for k in a_keys)  # A is random, B starts at zero
    assert not any(same[k].any() for k in same if "lora_B" in k)
    assert not all((same[k] == states[2][k]).all() for k in a_keys)  # another seed, another start


@pytest.mark.parametrize(
    "config_cls, model_cls", [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)], ids=["mistral", "qwen2"]
)
def test_mistral_and_qwen2_folders_load_and_take_lora_on_q_and_v(tmp_path, base_model_dir, config_cls, model_cls):
    _, tokenizer = load_base_model(base_model_dir, CPU)
    folder = tmp_path / config_cls.model_type
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    model, tok = load_base_model(folder, CPU)
    assert type(model) is model_cls
    peft_model = apply_lora(model, LoraSettings(r=4, target_modules=("q_proj", "v_proj")), seed=0)
    state = get_adapter_state(peft_model)
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            for half in ("lora_A", "lora_B"):
                assert any(f"layers.{layer}.self_attn.{module}.{half}" in k for k in state)
    assert len(state) == 2 * 2 * 2
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = tok(["### Instruction:\nSummarise the note."], return_tensors="pt")
    logits = peft_model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
