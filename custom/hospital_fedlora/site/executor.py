"""The hospital's FLARE executor: fine-tunes LoRA on the site's own data and returns the adapter difference."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from ..adapter_files import GLOBAL_ADAPTER_DIR, save_peft_adapter
from ..adapter_layout import AdapterLayout
from ..config import ConfigError, SiteConfig, load_site_config, parse_recipe
from ..memory import release_memory
from ..protocol import ERROR_HEADER, INITIAL_ADAPTER, REFUSED_HEADER, ROUND_TEXT, Meta, Metric
from .data_parallel import DataParallelGroup, RoundStopped, training_processes
from .dataset import load_records
from .lora_variants import sent_tensors, site_rank, truncate_rank
from .privacy_gate import check_job_allowed, check_result
from .site_metrics import base_split_scores, split_scores, stream_metrics
from .site_settings import find_site_config
from .trainer import (
    LocalTrainer,
    StepReport,
    adapter_config_dict,
    get_adapter_state,
    set_adapter_state,
    subtract,
)
from .trainer_setup import build_trainer, site_placement, truncation_notes


class _Aborted(Exception):
    pass


class LoraExecutor(Executor):
    """Fine-tunes a LoRA adapter on this hospital's data; one instance per job at each site.

    Tasks: ``get_weights`` (the seeded initial adapter, identical at every site), ``train`` (set the global
    adapter, train ``local_steps``, return the ``WEIGHT_DIFF`` with the example count and metrics),
    ``validate`` (score the final adapter and the base model on the validation split, keep the adapter in
    PEFT format in the site's run folder) and ``submit_model`` (the current adapter). The site's own
    settings come from its site config: ``<kit>/local/site_config.yaml``, or
    ``$HOSPITAL_FEDLORA_SITE_CONFIGS/<site>.yaml`` in the simulator. A site that cannot set up answers
    every task with an error reply whose ``ERROR_HEADER`` names the cause. With the site's
    ``privacy.require_encryption`` on, every result holding adapter values is checked against the job's
    result filters (``privacy_gate.check_result``) and refused unless they encrypt it.

    Args:
        recipe: the job's ``config.TrainingRecipe`` fields that differ from its defaults (the shipped recipe).
        train_task_name, validate_task_name, submit_model_task_name, get_weights_task_name: FLARE task names.
        log_every_n_steps: how often training progress is logged.
        analytics_sender_id: the job's FLARE ``AnalyticsSender`` component; every round's metrics are streamed
            through it to the server's receivers (TensorBoard, ``server/metrics_csv.py``). Scalars only.
    """

    def __init__(
        self,
        recipe: dict | None = None,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
        get_weights_task_name: str = AppConstants.TASK_GET_WEIGHTS,
        log_every_n_steps: int = 5,
        analytics_sender_id: str = "analytic_sender",
    ):
        super().__init__()
        # The recipe is checked as the job is deployed, before any site loads a model.
        self.recipe = parse_recipe(recipe)
        self.train_task = train_task_name
        self.task_names = {
            train_task_name: self._train,
            validate_task_name: self._validate,
            submit_model_task_name: self._submit_model,
            get_weights_task_name: self._get_weights,
        }
        self.log_every_n_steps = log_every_n_steps
        self.analytics_sender_id = analytics_sender_id
        self._last_round = -1  # the last round trained here; final metrics are streamed as the round after it
        self.site: SiteConfig | None = None
        self.trainer: LocalTrainer | None = None
        self.adapter_config: dict | None = None
        self.run_dir: Path | None = None
        self.initial_state: dict | None = None  # the seeded adapter, every tensor (FFA's frozen A included)
        self.layout: AdapterLayout | None = None  # the tensors a site sends: every global adapter must match it
        self.model_layout: AdapterLayout | None = None  # every tensor of the adapter (FFA: A as well as B)
        self.rank: int | None = None  # the site's own lower LoRA rank (site config lora_rank), else None
        self.site_source = ""  # the site config's path, named in refusals
        self.client_config: Path | None = None  # the job's client config as FLARE deployed it (the gate reads it)
        self.group: DataParallelGroup | None = None  # the site's other training processes (data_parallel > 1)
        self._setup_error: str | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except Exception as err:  # reported with every task reply, so the server names this site and cause
                self._setup_error = f"{type(err).__name__}: {err}" if not isinstance(err, ConfigError) else str(err)
                self.log_error(fl_ctx, f"site set-up failed: {self._setup_error}")
        elif event_type == EventType.END_RUN:
            self.trainer = None
            self._stop_workers(fl_ctx)

    def _stop_workers(self, fl_ctx: FLContext | None = None) -> None:
        if self.group is not None:
            exit_codes = self.group.stop()
            self.group = None
            if fl_ctx is not None:
                self.log_info(fl_ctx, f"data-parallel workers stopped (exit codes {exit_codes})")

    def _setup(self, fl_ctx: FLContext) -> None:
        name = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        self.run_dir = Path(workspace.get_run_dir(fl_ctx.get_job_id()))
        config_path = find_site_config(Path(workspace.get_root_dir()), name)
        self.site = site = load_site_config(config_path, expected_site=name)
        self.site_source = source = str(config_path)
        self.client_config = Path(workspace.get_client_app_config_file_path(fl_ctx.get_job_id()))
        check_job_allowed(site.privacy, self.client_config, self.train_task, source)
        self.rank = site_rank(site, self.recipe, self.client_config, self.train_task, source)
        placement = site_placement(site, source)
        processes = training_processes(site.data_parallel, placement, source)
        try:
            if processes > 1:
                # Started first, so the workers load their models while this process loads its own.
                self.group = DataParallelGroup(site, self.recipe, source, processes, placement)
                placement = site_placement(site, source, rank=0)
            trainer = build_trainer(site, self.recipe, source, placement)
            if self.group is not None:
                self.group.attach(trainer)
        except BaseException:
            self._stop_workers()
            raise
        self.trainer, model = trainer, trainer.model
        # The held-out test split, scored with the global adapter every round; optional in a site config.
        self.test_records = load_records(site.data, "test", source, self.recipe.task) if site.data.test else []
        self.adapter_config = adapter_config_dict(model)
        self.initial_state = get_adapter_state(model)
        self.model_layout = AdapterLayout.from_tensors(self.initial_state)
        self.layout = AdapterLayout.from_tensors(sent_tensors(self.initial_state, self.recipe.lora.variant))
        for note in truncation_notes(trainer, self.recipe.max_seq_length):
            self.log_warning(fl_ctx, note)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log_info(
            fl_ctx,
            f"ready: {trainer.num_train_examples} train / {len(trainer.val_examples)} validation examples, "
            f"{trainer.prompt_format} prompts, {placement.device} {str(placement.dtype).removeprefix('torch.')}"
            f"{' 4-bit' if placement.load_in_4bit else ''}, {n_trainable:,} LoRA parameters"
            f"{f', {processes} training processes' if processes > 1 else ''}"
            f"{', gradient checkpointing' if site.gradient_checkpointing else ''}, config {source}",
        )

    # -------------------------------------------------------------------------------------------- tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        handler = self.task_names.get(task_name)
        if handler is None:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self._setup_error or self.trainer is None:
            return self._error_reply(ReturnCode.EXECUTION_EXCEPTION, self._setup_error or "site is not set up")
        try:
            result = handler(shareable, fl_ctx, abort_signal)
            # Whatever the task is called: adapter values leave only through a filter that encrypts them.
            check_result(self.site.privacy, self.client_config, task_name, result, self.site_source)
            return result
        except (_Aborted, RoundStopped):
            return make_reply(ReturnCode.TASK_ABORTED)
        except ConfigError as err:
            self.log_error(fl_ctx, f"task {task_name} refused: {err}")
            return self._error_reply(ReturnCode.EXECUTION_EXCEPTION, str(err))
        except Exception as err:
            self.log_error(fl_ctx, f"task {task_name} failed: {err}\n{traceback.format_exc()}")
            return self._error_reply(ReturnCode.EXECUTION_EXCEPTION, f"{task_name} failed: {type(err).__name__}: {err}")

    def _stream(self, fl_ctx: FLContext, metrics: dict, step: int) -> None:
        sender = fl_ctx.get_engine().get_component(self.analytics_sender_id) if self.analytics_sender_id else None
        stream_metrics(sender, metrics, step)

    def _error_reply(self, rc: str, message: str) -> Shareable:
        reply = make_reply(rc)
        reply.set_header(ERROR_HEADER, message)
        return reply

    def _sent(self, state: dict) -> dict:
        """The tensors that travel (``self.layout``'s): all of them for plain LoRA, the B tensors alone for FFA-LoRA."""
        names = self.layout.names
        return state if len(names) == len(state) else {k: state[k] for k in names}

    def _received_adapter(self, shareable: Shareable, fl_ctx: FLContext) -> dict:
        """Set the global adapter: sent whole (plaintext job), or as the change since the shared initial
        adapter (encrypted job: the server holds no plaintext, the decrypt filter rebuilds the change).
        Tensors that do not travel (FFA-LoRA's A) keep the seeded initial value every site holds. Returns
        the full adapter."""
        refused = shareable.get_header(REFUSED_HEADER)  # the decrypt filter refused the server's aggregate
        if refused:
            raise ValueError(refused)
        dxo = from_shareable(shareable)
        source = "adapter received from the server"
        if dxo.data_kind == DataKind.WEIGHTS:
            self.layout.check(dxo.data, source)
            state = {**self.initial_state, **dxo.data}
        elif dxo.data_kind == DataKind.WEIGHT_DIFF and dxo.get_meta_prop(Meta.RELATIVE_TO) == INITIAL_ADAPTER:
            if dxo.data:
                self.layout.check(dxo.data, source)
            state = {k: v + dxo.data[k] if k in (dxo.data or {}) else v for k, v in self.initial_state.items()}
        else:
            raise ValueError(
                f"expected the global adapter as {DataKind.WEIGHTS} or as a {DataKind.WEIGHT_DIFF} relative to the "
                f"initial adapter, got {dxo.data_kind}"
            )
        if self.rank is not None:  # this site trains its first ranks only; the rest stays zero
            state = truncate_rank(state, self.rank)
        set_adapter_state(self.trainer.model, state, source=source, layout=self.model_layout)
        return get_adapter_state(self.trainer.model)

    def _current_adapter(self) -> Shareable:
        meta = {Meta.ADAPTER_CONFIG: self.adapter_config}
        return DXO(DataKind.WEIGHTS, data=self._sent(get_adapter_state(self.trainer.model)), meta=meta).to_shareable()

    def _get_weights(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        # Before any training this is the seeded initial adapter: the same at every site, no patient data in it.
        return self._current_adapter()

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        # What the last round left (activations, batches, its messages and ciphertexts, which FLARE frees
        # after this task returned) is given back before this round allocates: flat RSS over many rounds.
        release_memory()
        started = time.perf_counter()
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
        total = shareable.get_header(AppConstants.NUM_ROUNDS)
        global_state = self._received_adapter(shareable, fl_ctx)
        r, t = self.recipe, self.trainer
        val_global = t.evaluate(r.max_eval_examples)
        test_global = split_scores(t, self.test_records, r)
        every = max(1, self.log_every_n_steps)
        this_round = ROUND_TEXT.format(round=rnd, last=total - 1) if isinstance(total, int) else f"round {rnd}"

        def progress(s: StepReport) -> None:
            # With several ranks the stop travels with the gradients (RoundStopped), so all stop at one step.
            if abort_signal.triggered and self.group is None:
                raise _Aborted()
            if s.step % every == 0 or s.step == s.steps:
                self.log_info(
                    fl_ctx,
                    f"{self.site.site} {this_round} step {s.step}/{s.steps} loss {s.loss:.4f} ({s.tokens_per_s:,.0f} tok/s)",
                )

        if self.group is None:
            result = t.train(r.local_steps, progress, round=rnd)
        else:
            result = self.group.train(r.local_steps, progress, rnd, stop_requested=lambda: abort_signal.triggered)
        val_local = t.evaluate(r.max_eval_examples)
        metrics = {
            Metric.TRAIN_LOSS: result.mean_loss,
            Metric.VAL_LOSS_GLOBAL: val_global,
            Metric.VAL_LOSS_LOCAL: val_local,
            Metric.TRAIN_TOKENS: result.tokens,
            Metric.TRAIN_SECONDS: result.seconds,
            Metric.TRUNCATED_RECORDS: t.truncated["train"],
            **test_global,
        }
        self.log_info(
            fl_ctx,
            f"{self.site.site} {this_round} done: train loss {result.mean_loss:.4f}, validation loss "
            f"{val_global:.4f} -> {val_local:.4f}",
        )
        self._stream(fl_ctx, metrics, rnd)
        self._last_round = rnd if isinstance(rnd, int) else self._last_round
        diff = subtract(self._sent(get_adapter_state(t.model)), global_state)
        # The rest of a round's wall time is FLARE's (messaging, filters, aggregation, persistence).
        metrics[Metric.TASK_SECONDS] = time.perf_counter() - started
        meta = {
            Meta.EXAMPLE_COUNT: t.num_train_examples,
            Meta.METRICS: metrics,
            Meta.ADAPTER_CONFIG: self.adapter_config,
            **({Meta.LORA_RANK: self.rank} if self.rank is not None else {}),
        }
        return DXO(DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        state = self._received_adapter(shareable, fl_ctx)
        n = self.recipe.max_eval_examples
        metrics = {
            Metric.VAL_LOSS: self.trainer.evaluate(n),
            Metric.BASE_VAL_LOSS: self.trainer.evaluate_base(n),
            Metric.VAL_EXAMPLES: min(n, len(self.trainer.val_examples)),
            **split_scores(self.trainer, self.test_records, self.recipe),
            **base_split_scores(self.trainer, self.test_records, self.recipe),  # what the adapter adds
        }
        self._stream(fl_ctx, metrics, self._last_round + 1)
        out = save_peft_adapter(self.run_dir / GLOBAL_ADAPTER_DIR, state, self.adapter_config)
        self.log_info(
            fl_ctx,
            f"{self.site.site} final validation loss {metrics[Metric.VAL_LOSS]:.4f} "
            f"(base model {metrics[Metric.BASE_VAL_LOSS]:.4f}); adapter saved to {out}",
        )
        return DXO(DataKind.METRICS, data=metrics).to_shareable()

    def _submit_model(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        return self._current_adapter()  # in the clear: the privacy gate refuses it where encryption is required
