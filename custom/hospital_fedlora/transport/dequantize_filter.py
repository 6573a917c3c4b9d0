"""FLARE filter: restore a payload ``quantize_filter.QuantizeFilter`` quantized (plaintext jobs).

On the server's ``train`` results, before the aggregator's checks (layout, finite values, norm bound), so
they judge the values the average will use; on a hospital's ``train`` task data, before the executor
sets the global adapter. No arguments: every quantized tensor carries what restores it.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from ..protocol import Meta
from .quantization import dequantize_tensors

FILTER = "hospital_fedlora.transport.dequantize_filter.DequantizeFilter"


class DequantizeFilter(DXOFilter):
    """Replaces every quantized entry of a WEIGHTS / WEIGHT_DIFF DXO with its restored tensor.

    A DXO that is not marked quantized passes unchanged (the receiver's checks apply to it as to any).
    A malformed quantized payload raises, naming the tensor and what is wrong: FLARE then answers the
    task (at a site) or records the result (at the server) as a filter error, and nothing is aggregated.
    """

    def __init__(self):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        mode = dxo.get_meta_prop(Meta.QUANTIZATION)
        if not mode:
            return None
        try:
            data = dequantize_tensors(dxo.data)
        except ValueError as err:
            peer = fl_ctx.get_peer_context()
            sender = peer.get_identity_name() if peer else "the sender"
            raise ValueError(f"{dxo.data_kind} from {sender} does not restore from {mode}: {err}") from None
        meta = {k: v for k, v in dxo.meta.items() if k != Meta.QUANTIZATION}
        return DXO(dxo.data_kind, data=data, meta=meta)
