"""The adapter's layout (tensor names, shapes, dtypes): the one check that two adapters match, and the
flat vector form encryption works on.

Names are sorted, so insertion order never matters. The manifest travels in the clear with encrypted
contributions; it is the LoRA configuration, public anyway.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

Array = torch.Tensor | np.ndarray


def rank_axis(name: str, ndim: int = 2) -> int | None:
    """The rank axis of a PEFT LoRA weight (``ndim`` 2): A is (r, in), B is (out, r); None for any other tensor."""
    if ndim != 2:
        return None
    return 0 if ".lora_A." in name else 1 if ".lora_B." in name else None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class AdapterLayout:
    tensors: tuple[TensorSpec, ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Array]) -> "AdapterLayout":
        """The layout of named torch tensors or numpy arrays."""
        if not tensors:
            raise ValueError("adapter layout: no tensors given; the adapter has no LoRA weights")
        specs = []
        for name in sorted(tensors):
            t = tensors[name]
            if not isinstance(t, (torch.Tensor, np.ndarray)):
                raise TypeError(f"adapter layout: tensor {name!r} is {type(t).__name__}, expected an array")
            specs.append(TensorSpec(name, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch.")))
        return cls(tuple(specs))

    @property
    def n_values(self) -> int:
        return sum(s.numel for s in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.tensors)

    def flatten(self, tensors: Mapping[str, torch.Tensor], source: str = "adapter") -> torch.Tensor:
        """One 1-D tensor (the inputs' common dtype) in layout order; refuses anything that does not match."""
        self.check(tensors, source)
        return torch.cat([tensors[s.name].reshape(-1) for s in self.tensors])

    def unflatten(self, flat: torch.Tensor, source: str = "flat vector") -> dict[str, torch.Tensor]:
        """Views into ``flat`` with the recorded shapes; dtype is ``flat``'s (sums stay int64, say)."""
        if flat.dim() != 1 or flat.numel() != self.n_values:
            raise ValueError(
                f"{source}: has shape {tuple(flat.shape)}, expected a 1-D vector of {self.n_values} values "
                f"for {len(self.tensors)} tensors"
            )
        out, offset = {}, 0
        for s in self.tensors:
            out[s.name] = flat[offset : offset + s.numel].view(s.shape)
            offset += s.numel
        return out

    def check(self, tensors: Mapping[str, Array], source: str = "adapter") -> None:
        """Raise ``ValueError`` naming ``source`` unless ``tensors`` has exactly these names and shapes."""
        missing = [n for n in self.names if n not in tensors]
        extra = sorted(set(tensors) - set(self.names))
        if missing or extra:
            raise ValueError(
                f"{source}: tensors do not match the agreed adapter layout (missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); "
                "every site must use the same base model and the job's LoRA settings"
            )
        for s in self.tensors:
            got = tuple(np.shape(tensors[s.name]))
            if got != s.shape:
                raise ValueError(f"{source}: tensor {s.name!r} has shape {got}, the agreed layout says {s.shape}")

    def to_manifest(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.tensors]

    @classmethod
    def from_manifest(cls, manifest: Any, source: str = "layout manifest") -> "AdapterLayout":
        try:
            specs = tuple(
                TensorSpec(str(m["name"]), tuple(int(d) for d in m["shape"]), str(m["dtype"])) for m in manifest
            )
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(
                f"{source}: not a layout manifest (expected a list of {{name, shape, dtype}}): {err!r}"
            ) from None
        if not specs:
            raise ValueError(f"{source}: layout manifest is empty")
        if [s.name for s in specs] != sorted(s.name for s in specs) or len({s.name for s in specs}) != len(specs):
            raise ValueError(f"{source}: layout manifest names must be unique and sorted")
        return cls(specs)

    def fingerprint(self) -> str:
        """Short hash of the manifest: two sites with the same fingerprint flatten identically."""
        text = json.dumps(self.to_manifest(), separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
