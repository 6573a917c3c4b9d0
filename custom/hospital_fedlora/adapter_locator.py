"""Hands the final global adapter to FLARE's ``GlobalModelEval`` so every site scores it on its own data."""

from __future__ import annotations

from nvflare.apis.dxo import DXO
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import model_learnable_to_dxo
from nvflare.app_common.abstract.model_locator import ModelLocator

from .adapter_persistor import GLOBAL_ADAPTER_DIR, AdapterPersistor


class AdapterLocator(ModelLocator):
    def __init__(self, persistor_id: str = "persistor"):
        super().__init__()
        self.persistor_id = persistor_id
        self.persistor: AdapterPersistor | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.persistor = fl_ctx.get_engine().get_component(self.persistor_id)
            if not isinstance(self.persistor, AdapterPersistor):
                self.system_panic(f"component {self.persistor_id!r} must be an AdapterPersistor", fl_ctx)

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        return [GLOBAL_ADAPTER_DIR]

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO:
        return model_learnable_to_dxo(self.persistor.get_model_from_location(model_name, fl_ctx))
