"""One standalone checkpoint: the final adapter merged into the base weights, saved with the tokenizer.

    python -m hospital_fedlora.inference.merge --base-model DIR --adapter DIR --out DIR [--force]

The result loads with ``AutoModelForCausalLM.from_pretrained(out)`` alone (no peft) and answers exactly as the
base model with the adapter does. It is written in a staging folder next to ``--out`` and swapped in whole;
an existing ``--out`` is kept unless ``--force`` is given, and never may it be the base model's or the
adapter's own folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ..atomic_folder import replace_folder
from ..config import ConfigError
from ..site.model_loading import choose_placement
from .adapted_model import load_adapted_model


def merge_adapter(base_model: Path, adapter: Path, out: Path, force: bool = False) -> Path:
    """Merge ``adapter`` into ``base_model`` and save the checkpoint (model + tokenizer) at ``out`` atomically."""
    out = Path(out)
    resolved = out.resolve()
    for what, folder in (("--base-model", base_model), ("--adapter", adapter)):
        if resolved == Path(folder).resolve():
            raise ConfigError(f"--out {out}: is the {what} folder itself; write the merged checkpoint elsewhere")
    if out.exists() and not force:
        raise ConfigError(f"--out {out}: already exists; choose a new folder, or pass --force to replace it")
    # Merged on the CPU in float32: merging into bf16 or 4-bit weights would round the adapter away.
    model, tokenizer = load_adapted_model(base_model, adapter, choose_placement("cpu", "auto", False, "--base-model"))
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging.chmod(0o755)
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", required=True, type=Path, help="the base checkpoint the federation trained on")
    ap.add_argument("--adapter", required=True, type=Path, help="a PEFT adapter folder (a run's global_adapter/)")
    ap.add_argument("--out", required=True, type=Path, help="the folder to write the merged checkpoint to")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    try:
        out = merge_adapter(args.base_model, args.adapter, args.out, args.force)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base_model}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
