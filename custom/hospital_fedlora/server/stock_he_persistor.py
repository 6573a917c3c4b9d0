"""Server persistor of the comparison job on NVFlare's stock CKKS components (``jobs/fedlora_ckks_stock``)."""

from __future__ import annotations

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from .adapter_persistor import AdapterPersistor


class StockHEAdapterPersistor(AdapterPersistor):
    """``AdapterPersistor`` that skips a global adapter held as CKKS ciphertexts, with a log line.

    With ``HEModelShareableGenerator`` the server's global adapter is encrypted from the first aggregation
    on, so there is nothing to write as a PEFT adapter; plaintext adapters are saved as the base class
    saves them.

    Args:
        initial_adapter: as for ``AdapterPersistor``.
    """

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = model[ModelLearnableKey.WEIGHTS]
        encrypted = sorted(k for k, v in weights.items() if not isinstance(v, np.ndarray))
        if encrypted:
            kinds = sorted({type(weights[k]).__name__ for k in encrypted})
            self.log_info(
                fl_ctx,
                f"round {fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}: global adapter not saved, "
                f"{len(encrypted)} of {len(weights)} tensors are encrypted ({', '.join(kinds)})",
            )
            return
        super().save_model(model, fl_ctx)
