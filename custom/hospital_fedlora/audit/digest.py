"""The one digest of a contribution or aggregate, computed the same way by the hospital that signs it
and by the server that logs it.

Encrypted payloads (``{chunks: [...]}``) are digested as ``he.wire_format.chunks_digest`` does, so a
round's aggregate digest equals the SHA-256 that ``encrypted_log/log.jsonl`` records for that round.
Plaintext payloads (named tensors) are digested over the sorted names with each tensor's dtype, shape
and bytes. No FLARE.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from ..he.wire_format import chunks_digest
from ..protocol import Data


def contribution_digest(data: Mapping) -> str:
    """SHA-256 (hex) of a DXO's data: ciphertext chunks or named tensors."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"cannot digest {type(data).__name__}: expected a DXO's data, a non-empty mapping")
    if set(data) == {Data.CHUNKS}:
        return chunks_digest(data[Data.CHUNKS])
    h = hashlib.sha256()
    for name in sorted(data):
        dtype, array = _as_array(data[name], name)
        header = f"{name}\0{dtype}\0{','.join(map(str, array.shape))}\0{array.nbytes}\0".encode()
        h.update(len(header).to_bytes(4, "big") + header)
        h.update(array.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _as_array(value, name: str) -> tuple[str, np.ndarray]:
    if hasattr(value, "detach"):  # a torch tensor: numpy has no bfloat16, so those are digested as float32
        dtype = str(value.dtype).removeprefix("torch.")
        value = value.detach().cpu()
        value = value.float() if dtype == "bfloat16" else value
        return dtype, np.ascontiguousarray(value.numpy())
    array = np.ascontiguousarray(value)
    if array.dtype == object:
        raise ValueError(f"cannot digest tensor {name!r}: it holds Python objects, not numbers")
    return array.dtype.name, array
