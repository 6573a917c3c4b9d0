"""Several training processes at one site (``data_parallel`` in the site config), one per GPU.

The executor's process is rank 0: it keeps everything FLARE sees and returns the one adapter difference.
Ranks 1..N-1 are worker processes it starts at set-up; each trains on its share of every optimizer step,
and the LoRA gradients are summed across ranks before the step. Design: docs/architecture.md, "Several
GPUs at one site".
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ConfigError, SiteConfig, TrainingRecipe
from .model_loading import Placement
from .trainer import LocalTrainer, StepReport, TrainResult

LOOPBACK = "127.0.0.1"
SETUP_TIMEOUT_S = 3600.0  # loading a large base model from a slow disk takes minutes
STOP_TIMEOUT_S = 15.0


class RoundStopped(Exception):
    """Every rank stopped the round at the same step (rank 0 was asked to abort)."""


def training_processes(setting: int | str, placement: Placement, source: str) -> int:
    """How many ranks train at this site; on CPU a number above 1 runs gloo processes (tests, no GPU)."""
    if placement.device.type != "cuda":
        return 1 if setting == "all" else int(setting)
    visible = torch.cuda.device_count()
    if setting == "all":
        return visible
    if setting > visible:
        raise ConfigError(
            f"{source}: field 'data_parallel' is {setting} but only {visible} CUDA GPU(s) are visible here; "
            f"set it to 'all' or at most {visible} (CUDA_VISIBLE_DEVICES decides which GPUs the site sees)"
        )
    return int(setting)


class SumGradients:
    """The trainer's ``gradient_sync``: one all-reduce (SUM) of every LoRA gradient and the step's loss and
    token counts. Each rank's loss is already divided by the step's global token count, so the sum is the
    single-process gradient: no rescaling. Rank 0 also puts its stop request in the buffer, so every rank
    sees it at the same step."""

    def __init__(self) -> None:
        self.stop_requested: Callable[[], bool] = lambda: False

    def __call__(self, params: list[torch.Tensor], loss_sum: float, tokens: int) -> tuple[float, int]:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # a rank with no share
        extra = torch.tensor([loss_sum, tokens, float(self.stop_requested())], device=params[0].device)
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads] + [extra])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view(p.shape).to(p.dtype)
            offset += n
        loss_total, tokens_total, stop = flat[offset:].tolist()
        if stop > 0:
            raise RoundStopped()
        return loss_total, int(round(tokens_total))


def _join(trainer: LocalTrainer, rank: int, world: int, backend: str, store: dist.Store) -> SumGradients:
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    sync = SumGradients()
    trainer.rank, trainer.world_size, trainer.gradient_sync = rank, world, sync
    return sync


def _broadcast_adapter(trainer: LocalTrainer) -> None:
    # Frozen LoRA tensors too: FFA-LoRA's A is seeded alike everywhere, but a site's lower rank (lora_rank)
    # zeroes some of its rows on rank 0 only.
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad or ".lora_" in name:
                dist.broadcast(p.data, src=0)


class DataParallelGroup:
    """Rank 0's handle on the site's worker processes: start, train a round on all ranks, stop."""

    def __init__(self, site: SiteConfig, recipe: TrainingRecipe, source: str, processes: int, placement: Placement):
        self.world = processes
        self.backend = "nccl" if placement.device.type == "cuda" else "gloo"
        # Port 0: the OS picks a free loopback port, so two sites or jobs on one machine never collide.
        self._store = dist.TCPStore(LOOPBACK, 0, processes, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=SETUP_TIMEOUT_S))
        ctx = mp.get_context("spawn")  # a fork would copy FLARE's threads and sockets, and CUDA cannot be forked
        self._conns, self.workers = [], []
        for rank in range(1, processes):
            ours, theirs = ctx.Pipe()
            args = (rank, processes, self.backend, self._store.port, site, recipe, source, theirs, os.getpid())
            proc = ctx.Process(target=_worker_main, args=args, name=f"fedlora-rank{rank}", daemon=True)
            proc.start()
            theirs.close()  # only the worker holds its end: the pipe breaks when either side dies
            self._conns.append(ours)
            self.workers.append(proc)
        self.sync: SumGradients | None = None
        self.trainer: LocalTrainer | None = None
        self._broken: str | None = None

    def attach(self, trainer: LocalTrainer) -> None:
        """Wait until every worker has loaded its model, then form the process group with rank 0's trainer."""
        for rank, reply in self._replies(SETUP_TIMEOUT_S, "set-up"):
            if reply[0] != "ready":
                raise RuntimeError(f"data-parallel rank {rank} failed to set up: {reply[1]}")
        self.sync = _join(trainer, 0, self.world, self.backend, self._store)
        self.trainer = trainer

    def train(self, steps: int, progress: Callable[[StepReport], None] | None, round: int,
              stop_requested: Callable[[], bool] = lambda: False) -> TrainResult:
        """Round ``round`` on every rank from rank 0's adapter; rank 0's result counts every rank's tokens."""
        if self._broken:
            raise RuntimeError(f"data-parallel training stopped earlier ({self._broken}); restart the job")
        try:
            for conn in self._conns:
                conn.send(("train", round, steps))
            _broadcast_adapter(self.trainer)
            self.sync.stop_requested = stop_requested
            try:
                result = self.trainer.train(steps, progress, round=round)
            except RoundStopped:
                self._collect(f"round {round}")
                raise
            self._collect(f"round {round}")
            return result
        except RoundStopped:
            raise
        except BaseException as err:
            # Ranks left inside a collective cannot be resynchronised: stop them, fail loudly from now on.
            self._broken = f"round {round}: {type(err).__name__}: {err}"
            self.stop()
            raise

    def _collect(self, what: str) -> None:
        for rank, reply in self._replies(None, what):
            if reply[0] == "error":
                raise RuntimeError(f"data-parallel rank {rank} failed in {what}: {reply[1]}")

    def _replies(self, timeout_s: float | None, what: str):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for rank, (conn, proc) in enumerate(zip(self._conns, self.workers), start=1):
            while not conn.poll(1.0):
                if not proc.is_alive():
                    raise RuntimeError(f"data-parallel rank {rank} exited (code {proc.exitcode}) during {what}")
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"data-parallel rank {rank} did not answer within {timeout_s:.0f} s ({what})")
            try:
                yield rank, conn.recv()
            except EOFError:
                raise RuntimeError(f"data-parallel rank {rank} exited during {what}") from None

    def stop(self) -> list[int | None]:
        """Ask every worker to exit, then make sure: none may outlive the job. Returns their exit codes."""
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass  # already gone
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()
        exit_codes = [proc.exitcode for proc in self.workers]
        self._conns, self.workers = [], []
        if self.sync is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.sync = None
        return exit_codes


# ------------------------------------------------------------------------------------------- workers
def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose executor process died (even by SIGKILL) exits within a second: it is re-parented."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_main(rank: int, world: int, backend: str, port: int, site: SiteConfig, recipe: TrainingRecipe,
                 source: str, conn, parent_pid: int) -> None:
    _exit_with_parent(parent_pid)
    from .trainer_setup import build_trainer, site_placement

    try:
        placement = site_placement(site, source, rank)
        if placement.device.type == "cuda":
            torch.cuda.set_device(placement.device)  # nccl and object collectives use the current device
        trainer = build_trainer(site, recipe, source, placement)
        conn.send(("ready",))
        store = dist.TCPStore(LOOPBACK, port, world, is_master=False, timeout=timedelta(seconds=SETUP_TIMEOUT_S))
        _join(trainer, rank, world, backend, store)
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    while True:
        try:
            command = conn.recv()  # between rounds: no collective is pending, so no collective timeout applies
        except EOFError:
            break  # rank 0 is gone
        if command[0] != "train":
            break
        _, rnd, steps = command
        try:
            _broadcast_adapter(trainer)
            trainer.train(steps, round=rnd)
            conn.send(("done",))
        except RoundStopped:
            conn.send(("stopped",))
        except BaseException as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))
            # Exit rather than wait: rank 0 blocked in a collective with this rank then fails instead of hanging.
            os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
