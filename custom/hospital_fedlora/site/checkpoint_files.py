"""The checks on a staged checkpoint's weight and tokenizer files that a copy from a hub or a share gets wrong.

Cheap (a few headers and JSON files read, no weights), so the executor runs them before loading anything:
a missing or truncated shard, a Git LFS pointer where the weights should be, a tokenizer with ids past the
model's embedding rows. ``check_causal_lm_folder`` calls them; docs/hospital-it.md lists them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..config import ConfigError

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
LFS_POINTER = b"version https://git-lfs"


def weight_files(path: Path, where: str) -> list[str]:
    """The weight files the folder's index names (or its single weights file); refuses a folder with none."""
    for index_name in INDEX_FILES:
        index_file = path / index_name
        if not index_file.is_file():
            continue
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{where}: {index_name} is not a valid shard index ({type(err).__name__}: {err}); "
                              "copy it again from the checkpoint") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ConfigError(f"{where}: {index_name} names {len(missing)} shard(s) not in the folder: "
                              f"{', '.join(missing)}; copy every shard of the checkpoint")
        return files
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return [name]
    raise ConfigError(f"{where}: no weights (expected model.safetensors, or shards with "
                      "model.safetensors.index.json); stage the checkpoint's weight files with its config")


def check_weight_files(path: Path, where: str) -> None:
    for name in weight_files(path, where):
        file = path / name
        with file.open("rb") as f:
            head = f.read(8)
            if head + f.read(len(LFS_POINTER) - 8) == LFS_POINTER:
                raise ConfigError(f"{where}: {name} is a Git LFS pointer, not the weights; run `git lfs pull` "
                                  "in the clone (or download the file itself) and copy it again")
            if name.endswith(".safetensors"):
                _check_safetensors_size(file, name, head, f, where)


def _check_safetensors_size(file: Path, name: str, head: bytes, f, where: str) -> None:
    """The header says where the last tensor ends; a shorter file is a copy that stopped part way."""
    size = file.stat().st_size
    try:
        header_len = struct.unpack("<Q", head)[0]
        if header_len > size:
            raise ValueError("header length past the end of the file")
        f.seek(8)
        header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise ConfigError(f"{where}: {name} is not a safetensors file ({err}); copy it again") from None
    if 8 + header_len + end > size:
        raise ConfigError(f"{where}: {name} is truncated ({size:,} bytes, its header needs "
                          f"{8 + header_len + end:,}); the copy stopped part way, copy it again")


def tokenizer_size(path: Path) -> int | None:
    """One past the largest token id in ``tokenizer.json`` (vocabulary and added tokens); None without one."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        vocab = data["model"].get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None  # the tokenizer's own loader reports a broken file better than we can
    return max(ids) + 1 if ids else None


def check_tokenizer_fits(path: Path, config: dict, where: str) -> None:
    """Every token id must have an embedding row: a larger tokenizer fails (or reads garbage) mid-training."""
    rows = config.get("vocab_size")
    size = tokenizer_size(path)
    if isinstance(rows, int) and size is not None and size > rows:
        raise ConfigError(f"{where}: the tokenizer has ids up to {size - 1} but the model has {rows} embedding rows "
                          "(config.json vocab_size); the tokenizer is not this checkpoint's: stage the tokenizer "
                          "files that came with these weights")
