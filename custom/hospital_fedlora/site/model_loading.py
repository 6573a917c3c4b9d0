"""Load a site's local causal LM and put LoRA on it.

The same code serves the project's tiny offline model and a hospital's staged Llama / Mistral / Qwen2
checkpoint: anything ``AutoModelForCausalLM`` can read from a local folder. Nothing touches a hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ..config import ConfigError, LoraSettings
from .checkpoint_files import check_tokenizer_fits, check_weight_files
from .lora_variants import freeze


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    load_in_4bit: bool


def choose_placement(device: str, dtype: str, load_in_4bit: bool, source: str = "site config") -> Placement:
    """Map the site's hardware settings to torch; CUDA gets bf16 by default, CPU float32."""
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError(f"{source}: field 'device' is 'cuda' but no CUDA GPU is visible; set it to 'auto' or 'cpu'")
    on_cuda = device == "cuda" or (device == "auto" and has_cuda)
    if load_in_4bit and not on_cuda:
        raise ConfigError(
            f"{source}: field 'load_in_4bit' needs a CUDA GPU (bitsandbytes 4-bit kernels); "
            "set it to false on this machine"
        )
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    if not on_cuda and torch_dtype != torch.float32:
        raise ConfigError(f"{source}: field 'dtype' is {dtype!r}; on CPU only float32 trains reliably, use 'auto'")
    return Placement(torch.device("cuda" if on_cuda else "cpu"), torch_dtype, load_in_4bit)


def check_causal_lm_folder(path: Path, source: str = "site config") -> None:
    """Fail before any work if ``path`` is not a local Hugging Face causal-LM folder."""
    where = f"{source}: field 'base_model_path' ({path})"
    if not path.is_dir():
        raise ConfigError(f"{where}: folder not found; point it at the staged base-model checkpoint")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{where}: no config.json; this is not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json holds a {type(config).__name__}, not a model configuration object")
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not a causal language model "
            "(expected e.g. llama, mistral, qwen2)"
        )
    # BERT-like encoders are in the causal-LM mapping too (a decoder head exists for them), but a checkpoint
    # trained as a masked-LM encoder cannot generate text; only one configured as a decoder is causal.
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder", False):
        raise ConfigError(
            f"{where}: model_type {model_type!r} is an encoder (masked language model), not a causal "
            "language model; point it at a decoder-only checkpoint such as llama, mistral or qwen2"
        )
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ConfigError(f"{where}: no tokenizer files next to the weights; stage the tokenizer with the model")
    check_weight_files(path, where)
    check_tokenizer_fits(path, config, where)


def load_base_model(
    path: Path, placement: Placement, source: str = "site config", gradient_checkpointing: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    check_causal_lm_folder(path, source)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        # Llama checkpoints ship without a pad token; eos is the usual stand-in (labels mask it anyway).
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"local_files_only": True, "dtype": placement.dtype}
    if placement.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=placement.dtype,
        )
        kwargs["device_map"] = {"": placement.device.index or 0}
    AutoConfig.from_pretrained(path, local_files_only=True)  # surfaces a broken config before the weights load
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if placement.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # Casts the norms and the head to float32 for stable 4-bit training; checkpointing is set up below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(placement.device)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works under frozen embeddings.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: PreTrainedModel, settings: LoraSettings, seed: int, source: str = "job recipe") -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; seeded so every hospital starts from the same A matrices."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in settings.target_modules if m not in present]
    if missing:
        raise ConfigError(
            f"{source}: field 'lora.target_modules' names {missing}, which this base model does not have "
            f"(linear layers include e.g. q_proj, k_proj, v_proj, o_proj)"
        )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(settings))
    # The adapter trains and travels in float32 whatever the base model's precision (bf16, 4-bit): the
    # optimizer's moments are float32 and every site's adapter is the same format to average.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    freeze(peft_model, settings.variant)  # FFA-LoRA: A stays at this seeded init at every site
    return peft_model
