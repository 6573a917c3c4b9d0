"""Llama-3.x checkpoints at their published shapes with seeded random weights, built offline.

For measuring memory, message bytes and speed at true size where the real weights cannot be downloaded.
``config.json`` holds the published values in the published form (``rope_theta``, ``rope_scaling``), the
weights are bf16, written tensor by tensor into ~2 GB safetensors shards with ``model.safetensors.index.json``
(so the builder never holds the model in memory), and the tokenizer is the tiny model's own with Llama-3's
chat header tokens and a Llama-3-style ``chat_template``. The weights are noise: nothing here generates text.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from hospital_fedlora.atomic_folder import replace_folder

BUILD_INFO = "build_info.json"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 * 10**9
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Llama-3's instruct layout; our tokenizer's bos (<s>) stands where Llama-3 has <|begin_of_text|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class RealShape:
    """A published Llama-3.x configuration (the values of its ``config.json``)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_scaling_factor: float
    tie_word_embeddings: bool
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config_json(self, tokenizer) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            # our tokenizer's ids, not Llama-3's 128000/128001: the rows past it are never indexed
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }


SHAPES = {
    "llama-3.2-1b": RealShape("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, 32.0, tie_word_embeddings=True),
    "llama-3.1-8b": RealShape("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, 8.0, tie_word_embeddings=False),
}


def weight_shapes(shape: RealShape) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes, in LlamaForCausalLM's order (lm_head absent when tied)."""
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.self_attn.q_proj.weight": (shape.num_attention_heads * shape.head_dim, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, shape.num_attention_heads * shape.head_dim),
            f"{p}.mlp.gate_proj.weight": (shape.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": (shape.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": (h, shape.intermediate_size),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def random_tensor(name: str, dims: tuple[int, ...], seed: int, std: float = 0.02) -> torch.Tensor:
    """Seeded by (seed, name), so a tensor does not depend on the shard layout; norms are ones, as at init.
    Drawn in row blocks into the bf16 tensor, so a 2 GB embedding never exists in float32."""
    if len(dims) == 1:
        return torch.ones(dims, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1)
    out = torch.empty(dims, dtype=torch.bfloat16)
    rows = max(1, 2**24 // dims[1])
    for start in range(0, dims[0], rows):
        block = out[start : start + rows]
        block.copy_(torch.randn(block.shape, generator=gen).mul_(std))
    return out


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors, a new shard whenever the next would pass ``shard_bytes`` (bf16: 2 bytes each)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():
        nbytes = 2 * int(torch.Size(dims).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_tokenizer(tokenizer_from: Path, dest: Path):
    """The tiny model's tokenizer plus Llama-3's header/eot tokens and chat template, in ``tokenizer_config.json``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=True)
    tokenizer.add_tokens([START_HEADER, END_HEADER, EOT], special_tokens=True)
    tokenizer.save_pretrained(dest)
    # transformers may write the template to chat_template.jinja; the brief (and older readers) want it here
    config_file = dest / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    return tokenizer


def is_complete(path: Path) -> bool:
    """Built to the end (``build_info.json`` is written last) and every shard in the index present."""
    path = Path(path)
    if not (path / BUILD_INFO).is_file() or not (path / INDEX).is_file():
        return False
    shards = set(json.loads((path / INDEX).read_text())["weight_map"].values())
    return all((path / s).is_file() for s in shards)


def build_real_shape(
    out_dir: Path,
    shape: str | RealShape,
    tokenizer_from: Path,
    seed: int = 0,
    *,
    shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
    log=print,
    **shape_overrides,
) -> Path:
    """Write ``shape`` (a name in ``SHAPES`` or a ``RealShape``) into ``out_dir`` as a HF Llama folder.

    ``shape_overrides`` replace ``RealShape`` fields (tests build a scaled-down shape this way). Built in a
    temporary sibling folder renamed into place at the end, like the tiny builder.
    """
    out_dir, tokenizer_from = Path(out_dir), Path(tokenizer_from)
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    spec = replace(spec, **shape_overrides)
    if spec.hidden_size % spec.num_attention_heads or spec.num_attention_heads % spec.num_key_value_heads:
        raise ValueError(f"{spec.name}: heads do not divide hidden_size / attention heads")
    if is_complete(out_dir) and not overwrite:
        return out_dir
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        tokenizer = write_tokenizer(tokenizer_from, staging)
        if len(tokenizer) > spec.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the shape's {spec.vocab_size} rows")
        (staging / "config.json").write_text(json.dumps(spec.config_json(tokenizer), indent=2) + "\n")
        eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)]
        generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

        shapes = weight_shapes(spec)
        shards = plan_shards(shapes, shard_bytes)
        weight_map, total = {}, 0
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: random_tensor(n, shapes[n], seed) for n in names}
            save_file(tensors, staging / file, metadata={"format": "pt"})
            total += sum(t.numel() * 2 for t in tensors.values())
            weight_map |= {n: file for n in names}
            del tensors  # one shard in memory at a time
            if log:
                log(f"  {file}: {len(names)} tensors")
        (staging / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        n_params = sum(int(torch.Size(d).numel()) for d in shapes.values())
        info = {
            "what": f"{spec.name} shapes with seeded random bf16 weights (hospital_fedlora_tools.real_shapes); not a trained model",
            "shape": asdict(spec),
            "seed": seed,
            "parameters": n_params,
            "weight_bytes": total,
            "shards": len(shards),
            "tokenizer_from": str(tokenizer_from),
            "tokenizer_size": len(tokenizer),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        staging.chmod(0o755)
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if log:
        log(f"{spec.name}: {n_params:,} parameters in {len(shards)} shards written to {out_dir} "
            f"in {time.monotonic() - started:.1f} s")
    return out_dir
