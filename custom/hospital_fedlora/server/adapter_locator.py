"""Hands the final global adapter to FLARE's ``GlobalModelEval``, so every site scores it on its own data."""

from __future__ import annotations

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import model_learnable_to_dxo
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator

from ..adapter_files import GLOBAL_ADAPTER_DIR


class AdapterLocator(ModelLocator):
    """The job's one model, ``global_adapter``, from the persistor, as the DXO the sites evaluate.

    Plaintext job: the persistor's adapter goes out as ``WEIGHTS``. Encrypted job: the server holds only
    the encrypted log, so the DXO is built by a shareable generator (``EncryptedLogGenerator`` with
    ``whole_log``) and every hospital rebuilds the final adapter with its own key.

    Args:
        persistor_id: id of the job's ``ModelPersistor``.
        shareable_generator_id: id of a ``ShareableGenerator`` that turns the persisted model into the DXO;
            empty for the plaintext job.
    """

    def __init__(self, persistor_id: str = "persistor", shareable_generator_id: str = ""):
        super().__init__()
        self.persistor_id = persistor_id
        self.shareable_generator_id = shareable_generator_id
        self.persistor: ModelPersistor | None = None
        self.generator: ShareableGenerator | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            self.persistor = engine.get_component(self.persistor_id)
            if not isinstance(self.persistor, ModelPersistor):
                self.system_panic(f"component {self.persistor_id!r} must be a ModelPersistor", fl_ctx)
            if self.shareable_generator_id:
                self.generator = engine.get_component(self.shareable_generator_id)
                if not isinstance(self.generator, ShareableGenerator):
                    self.system_panic(f"component {self.shareable_generator_id!r} must be a ShareableGenerator", fl_ctx)

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        return [GLOBAL_ADAPTER_DIR]

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO:
        learnable = self.persistor.get_model_from_location(model_name, fl_ctx)
        if self.generator is not None:
            return from_shareable(self.generator.learnable_to_shareable(learnable, fl_ctx))
        return model_learnable_to_dxo(learnable)
