"""The committed site configs with the device check's hardware settings, and nothing else changed.

Only ``base_model_path``, ``device``, ``dtype``, ``micro_batch_size`` (and ``load_in_4bit`` for the QLoRA
comparison) differ from ``site_configs/<site>.yaml``; everything else, data files included, is what the
committed file says, read through ``load_site_config`` (relative paths resolved against ``site_configs/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from hospital_fedlora.config import SiteConfig, load_site_config

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "site_configs"


@dataclass(frozen=True)
class Hardware:
    """What the check changes in a hospital's site config."""

    base_model_path: Path
    device: str
    dtype: str
    micro_batch_size: int

    def changes(self) -> dict:
        return {
            "base_model_path": str(Path(self.base_model_path).resolve()),
            "device": self.device,
            "dtype": self.dtype,
            "micro_batch_size": self.micro_batch_size,
        }


def site_config(site: str, hardware: Hardware, **more) -> SiteConfig:
    """``site_configs/<site>.yaml`` with ``hardware`` (and ``more``, e.g. ``load_in_4bit``) set, validated again."""
    committed = load_site_config(COMMITTED / f"{site}.yaml", expected_site=site)
    return SiteConfig.model_validate({**committed.model_dump(), **hardware.changes(), **more})


def write_site_configs(dest: Path, hardware: Hardware) -> Path:
    """Every committed site config, changed as ``site_config`` does, written to ``dest/<site>.yaml``."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(COMMITTED.glob("*.yaml")):
        cfg = site_config(path.stem, hardware)
        header = f"# {path.stem}: {path.relative_to(REPO)} with the device check's hardware settings (paths resolved)\n"
        (dest / path.name).write_text(header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return dest
