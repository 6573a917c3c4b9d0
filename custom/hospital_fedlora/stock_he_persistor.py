"""Server persistor for the comparison job that aggregates with NVFlare's stock CKKS components.

With ``HEModelShareableGenerator`` the server's global adapter is CKKS ciphertexts from the first
aggregation on: there is nothing the server could write as a PEFT adapter. Plaintext adapters (none in
that job, but an ``initial_adapter`` would be one) are saved exactly as ``AdapterPersistor`` saves them;
an encrypted global adapter is skipped with a log line instead of failing the round.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from .adapter_persistor import AdapterPersistor


class StockHEAdapterPersistor(AdapterPersistor):
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
