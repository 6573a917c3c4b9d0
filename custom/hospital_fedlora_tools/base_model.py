"""An offline, seeded base model: a tiny Llama with its own tokenizer, briefly pre-trained on clinical prose.

Nothing is downloaded. The tokenizer (byte-level BPE) and the model are trained here on
``synthetic_notes.general_corpus``: notes and short knowledge paragraphs, never in instruction format, so the
model knows the notes' language but has not seen the ``### Response:`` tasks, and LoRA fine-tuning has
something real to learn. The folder it writes is an ordinary Hugging Face causal-LM folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load like any downloaded Llama; a hospital with a real model points its site config there
instead.

Usage: ``python -m hospital_fedlora_tools.base_model --out workspace/base_model [--seed 0] [--force]``.
``--shape llama-3.2-1b`` or ``--shape llama-3.1-8b`` writes instead a folder with that published shape and
random weights (``real_shapes.py``), for measuring at true size.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hospital_fedlora.atomic_folder import replace_folder

from .real_shapes import SHAPES, build_real_shape
from .real_shapes import is_complete as is_complete_real_shape
from .synthetic_notes import general_corpus

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
BUILD_INFO = "build_info.json"
# A folder holding all of these was finished by build_base_model (it writes build_info.json last, in the
# temporary folder, before the rename).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", BUILD_INFO)


@dataclass(frozen=True)
class BaseModelSpec:
    """Everything that determines the built model; recorded in ``build_info.json``."""

    seed: int = 0
    corpus_docs: int = 3000
    vocab_size: int = 3000
    # Wide and shallow: as fast to pre-train on two CPU cores as 128 x 4 layers, and LoRA on q/v adapts it
    # about half again as fast (measured: validation loss -33 % vs -21 % after 40 LoRA steps).
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 512
    pretrain_steps: int = 300
    block_size: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    label_smoothing: float = 0.1


def is_complete_model(path: Path) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in REQUIRED_FILES)


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE trained on ``corpus``, wrapped as a transformers fast tokenizer.

    Like Llama's tokenizer it prepends ``<s>`` when asked to add special tokens; it never appends ``</s>``
    (training code appends it after the response).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------------- model
def _new_model(spec: BaseModelSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def _pack(corpus: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Concatenate ``<s> doc </s>`` for every document and cut into full blocks (the tail is dropped)."""
    ids: list[int] = []
    for enc in tokenizer(corpus, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"corpus too small for one block of {block_size} tokens; raise corpus_docs")
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def pretrain(model, blocks: torch.Tensor, spec: BaseModelSpec, log=print) -> list[float]:
    """Causal-LM pre-training on random blocks: AdamW, linear warm-up, cosine decay.

    Returns the per-step plain cross-entropy (without label smoothing), for the record.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return spec.learning_rate * (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.pretrain_steps - spec.warmup_steps)
        return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    vocab = model.config.vocab_size
    losses = []
    for step in range(spec.pretrain_steps):
        batch = blocks[torch.randint(len(blocks), (spec.batch_size,), generator=gen)]
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch).logits[:, :-1].reshape(-1, vocab)
        targets = batch[:, 1:].reshape(-1)
        # Label smoothing keeps the logits moderate: a model that is near-certain about a very regular
        # corpus is slow to adapt (LoRA must first undo its certainty before it can learn the tasks).
        loss = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=spec.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(logits, targets).item())
        if log and (step % 50 == 0 or step == spec.pretrain_steps - 1):
            log(f"  pretrain step {step + 1}/{spec.pretrain_steps}  loss {losses[-1]:.3f}")
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------------- build
def build_base_model(
    out_dir: Path,
    seed: int = 0,
    pretrain_steps: int = BaseModelSpec.pretrain_steps,
    *,
    overwrite: bool = False,
    log=print,
    **spec_overrides,
) -> Path:
    """Build the base model into ``out_dir`` and return it.

    ``spec_overrides`` are ``BaseModelSpec`` fields (sizes, corpus, batch, learning rate). If ``out_dir``
    already holds a complete model it is returned untouched unless ``overwrite``. The model is built in a
    temporary sibling folder and renamed into place, so ``out_dir`` is either absent, the old model or the
    complete new one, never half-written.
    """
    out_dir = Path(out_dir)
    if is_complete_model(out_dir) and not overwrite:
        return out_dir
    spec = BaseModelSpec(seed=seed, pretrain_steps=pretrain_steps, **spec_overrides)
    if spec.pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be >= 0, got {spec.pretrain_steps}")
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}")

    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        corpus = general_corpus(spec.corpus_docs, seed=spec.seed)
        tokenizer = train_tokenizer(corpus, spec.vocab_size)
        model = _new_model(spec, tokenizer)
        blocks = _pack(corpus, tokenizer, spec.block_size)
        n_params = sum(p.numel() for p in model.parameters())
        if log:
            log(f"base model: {n_params:,} parameters, vocab {len(tokenizer)}, "
                f"{blocks.numel():,} corpus tokens, {spec.pretrain_steps} pre-training steps")
        losses = pretrain(model, blocks, spec, log=log)

        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tail = losses[-10:]
        info = {
            "what": "tiny Llama pre-trained offline on synthetic clinical prose (hospital_fedlora_tools.base_model)",
            "spec": asdict(spec),
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "corpus_tokens": blocks.numel(),
            "initial_pretrain_loss": round(losses[0], 4) if losses else None,
            "final_pretrain_loss": round(sum(tail) / len(tail), 4) if tail else None,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the finished model is an ordinary folder
        try:
            replace_folder(staging, out_dir)
        except OSError:
            # Another process finished the same build first; theirs is as good as ours.
            if not is_complete_model(out_dir):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if log:
        log(f"base model written to {out_dir} in {time.monotonic() - started:.1f} s")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hospital_fedlora_tools.base_model", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the Hugging Face model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=BaseModelSpec.pretrain_steps, help="pre-training steps")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a complete model")
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES],
                        help="tiny (pre-trained here) or a published Llama-3.x shape with random weights")
    parser.add_argument("--tokenizer-from", type=Path, default=Path("workspace/base_model"),
                        help="with --shape other than tiny: the tiny model whose tokenizer is copied")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.shape != "tiny":
        if is_complete_real_shape(args.out) and not args.force:
            print(f"{args.out} already holds a complete {args.shape} model; nothing to do (use --force to rebuild)")
            return 0
        build_real_shape(args.out, args.shape, args.tokenizer_from, seed=args.seed, overwrite=True)
        return 0
    if is_complete_model(args.out) and not args.force:
        info = json.loads((args.out / BUILD_INFO).read_text())
        print(f"{args.out} already holds a complete base model (seed {info['spec']['seed']}); "
              f"nothing to do (use --force to rebuild)")
        return 0
    build_base_model(args.out, seed=args.seed, pretrain_steps=args.steps, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
