"""Server persistor of the plaintext job: the global adapter, every round, in PEFT format."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from safetensors.numpy import load_file, save_file

from ..adapter_files import GLOBAL_ADAPTER_DIR, load_peft_adapter, save_peft_adapter
from ..protocol import Meta
from .earlier_run import earlier_run_dir

ROUNDS_DIR = "adapter_rounds"


class AdapterPersistor(ModelPersistor):
    """Saves the plaintext global adapter after every round, in the job's run folder on the server.

    ``adapter_rounds/round_NNN.safetensors`` keeps each round; ``global_adapter/`` is refreshed as a PEFT
    adapter folder (written atomically), so the job's downloaded result loads with
    ``PeftModel.from_pretrained``. With no ``initial_adapter`` the global adapter starts empty and the job's
    ``InitializeGlobalWeights`` takes the seeded initial adapter from the sites (the server needs no base
    model).

    With ``resume_from`` (the id of an earlier run of this job whose run folder is still on the server, as
    a crashed server leaves it) it starts from that run's last saved round, copies its round files into
    this run and reports ``resumed_rounds``, after which the job's ``RoundsWorkflow`` continues.

    Args:
        initial_adapter: a PEFT adapter folder to continue from (e.g. a previous job's result).
        resume_from: job id of an earlier run this run continues (``deploy/resume_job`` sets it).
    """

    def __init__(self, initial_adapter: str = "", resume_from: str = ""):
        super().__init__()
        if initial_adapter and resume_from:
            raise ValueError("set initial_adapter or resume_from, not both: a resumed run continues its own rounds")
        self.initial_adapter = initial_adapter
        self.resume_from = resume_from
        self.resumed_rounds = 0
        self._adapter_config: dict | None = None
        self._latest: ModelLearnable | None = None
        self._warned_b_only = False

    def _run_dir(self, fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        if self.resume_from:
            return self._resume(fl_ctx)
        if not self.initial_adapter:
            return ModelLearnable()
        weights, self._adapter_config = load_peft_adapter(Path(self.initial_adapter))
        self.log_info(fl_ctx, f"starting from adapter {self.initial_adapter} ({len(weights)} tensors)")
        return make_model_learnable(weights, {Meta.ADAPTER_CONFIG: self._adapter_config})

    def _resume(self, fl_ctx: FLContext) -> ModelLearnable:
        earlier = earlier_run_dir(self._run_dir(fl_ctx), self.resume_from, ROUNDS_DIR)
        files = sorted((earlier / ROUNDS_DIR).glob("round_*.safetensors"))
        rounds = [int(f.stem.removeprefix("round_")) for f in files]
        if rounds != list(range(len(rounds))) or not rounds:
            raise ValueError(f"{earlier / ROUNDS_DIR}: rounds {rounds} are not 0, 1, 2, ...; cannot tell where to resume")
        _, self._adapter_config = load_peft_adapter(earlier / GLOBAL_ADAPTER_DIR)
        (self._run_dir(fl_ctx) / ROUNDS_DIR).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, self._run_dir(fl_ctx) / ROUNDS_DIR / f.name)
        weights = {k: v.copy() for k, v in load_file(str(files[-1])).items()}
        self.resumed_rounds = len(rounds)
        self.log_info(fl_ctx, f"resuming job {self.resume_from} after round {rounds[-1]} ({files[-1]})")
        return make_model_learnable(weights, {Meta.ADAPTER_CONFIG: self._adapter_config})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = model[ModelLearnableKey.WEIGHTS]
        meta = model.get(ModelLearnableKey.META) or {}
        self._adapter_config = meta.get(Meta.ADAPTER_CONFIG) or self._adapter_config
        if not self._adapter_config:
            raise ValueError("no adapter_config reached the server; sites attach it to every contribution")
        run = self._run_dir(fl_ctx)
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        (run / ROUNDS_DIR).mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        tmp = run / ROUNDS_DIR / f".round_{rnd:03d}.tmp"
        save_file(arrays, str(tmp))
        tmp.replace(run / ROUNDS_DIR / f"round_{rnd:03d}.safetensors")
        out = save_peft_adapter(run / GLOBAL_ADAPTER_DIR, arrays, self._adapter_config)
        if not self._warned_b_only and not any(".lora_A." in k for k in arrays):
            self._warned_b_only = True
            # FFA-LoRA: sites send B alone and keep A at its seeded init; PEFT would fill a missing A at random.
            self.log_warning(
                fl_ctx,
                f"the global adapter holds LoRA B alone (lora.variant ffa): {out} does not load by itself; each "
                f"hospital's {GLOBAL_ADAPTER_DIR}/ (written by the final evaluation) holds A and B",
            )
        self._latest = make_model_learnable(arrays, {Meta.ADAPTER_CONFIG: self._adapter_config})
        self.log_info(fl_ctx, f"round {rnd}: global adapter saved to {out}")

    def get_model_from_location(self, location: str, fl_ctx: FLContext) -> ModelLearnable:
        """For FLARE's ``ListModelLocator``: the latest global adapter, for the final evaluation at the sites."""
        if self._latest is None:
            weights, config = load_peft_adapter(self._run_dir(fl_ctx) / location)
            self._latest = make_model_learnable(weights, {Meta.ADAPTER_CONFIG: config})
        return self._latest
