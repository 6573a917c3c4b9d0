"""Task-data filter for the comparison job on NVFlare's stock CKKS components: decrypted tensors get their shapes back."""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


class RestoreAdapterShapes(DXOFilter):
    """Runs after NVFlare's ``HEModelDecryptor``, which hands back flat lists of floats.

    The plaintext initial adapter every site receives first has the right shapes; the filter remembers them
    and reshapes every later, flat adapter to them (our executor loads only exactly shaped tensors). State
    lives for one job in this process. No arguments.
    """

    def __init__(self):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        # HEModelDecryptor returns python lists (CKKSVector.decrypt); plaintext tensors stay numpy arrays.
        flat = sorted(k for k, v in dxo.data.items() if isinstance(v, list))
        if not flat:
            self.shapes = {k: tuple(np.shape(v)) for k, v in dxo.data.items()}
            return None
        unknown = [k for k in flat if k not in self.shapes]
        if unknown:
            raise ValueError(
                f"received flat (decrypted) tensors {unknown[:3]} before any plaintext adapter told this site their "
                "shapes; the stock CKKS job needs every site from its first round"
            )
        for k in flat:
            values = np.asarray(dxo.data[k], dtype=np.float32)
            if values.size != int(np.prod(self.shapes[k])):
                raise ValueError(f"decrypted tensor {k} has {values.size} values, expected shape {self.shapes[k]}")
            dxo.data[k] = values.reshape(self.shapes[k])
        self.log_info(fl_ctx, f"restored the shapes of {len(flat)} decrypted tensors")
        return dxo
