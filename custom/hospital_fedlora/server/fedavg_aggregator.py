"""Weighted FedAvg of plaintext adapter differences: the plaintext job's aggregator."""

from __future__ import annotations

import math

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from ..adapter_layout import AdapterLayout, rank_axis
from ..protocol import Meta
from .contribution_aggregator import ContributionAggregator


class FedAvgAdapterAggregator(ContributionAggregator):
    """Averages the sites' adapter differences (``WEIGHT_DIFF``), weighted by their example counts.

    Besides the checks of ``ContributionAggregator``, a difference must be non-empty numpy arrays with the
    layout of the global adapter (names, shapes and dtype; the round's first contribution when the server
    holds no global adapter yet), so it is exactly as many bytes as that layout; finite; and, with
    ``max_update_norm``, no longer than that in L2 norm over all its tensors. The aggregate is a
    ``WEIGHT_DIFF`` for FLARE's ``FullModelShareableGenerator`` to add to the global adapter.
    ``docs/security.md`` says what each check stops and how the job's bound was chosen.

    A site that trains a lower LoRA rank than the job's (its ``Meta.LORA_RANK``; site config ``lora_rank``)
    sends its difference zero-padded to the job's rank; each rank slot of A and B is averaged over the sites
    that train it (HetLoRA-style), a slot no site trains stays unchanged. With every site at the job's rank
    this is the plain weighted average.

    Args:
        min_contributions: accepted contributions needed per round; 0 means every site in the job.
        max_update_norm: largest L2 norm of one site's adapter difference; 0 means no bound. It depends on
            the model and the recipe (about ``local_steps * learning_rate * sqrt(values)`` with Adam), so a
            job sets it.
    """

    expected_kind = DataKind.WEIGHT_DIFF

    def __init__(self, min_contributions: int = 0, max_update_norm: float = 0.0):
        if isinstance(max_update_norm, bool) or not isinstance(max_update_norm, (int, float)) or not max_update_norm >= 0:
            raise ValueError(
                f"FedAvgAdapterAggregator: args 'max_update_norm' must be a number >= 0 (0: no bound), got "
                f"{max_update_norm!r}; set it in the job's config_fed_server.json"
            )
        self.max_update_norm = float(max_update_norm)
        super().__init__(min_contributions)

    def reset(self, fl_ctx: FLContext | None) -> None:
        super().reset(fl_ctx)
        self._sum: dict[str, np.ndarray] = {}
        self._layout: AdapterLayout | None = None
        self._layout_source = ""
        self._total_weight = 0
        self._slot_weights: dict[str, np.ndarray] = {}  # per tensor: summed weight of each rank slot

    def _reference(self, fl_ctx: FLContext) -> tuple[AdapterLayout | None, str]:
        """The layout every contribution must have: the global adapter's, else the round's first one's."""
        if self._layout is not None:
            return self._layout, self._layout_source
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = model.get(ModelLearnableKey.WEIGHTS) if isinstance(model, dict) else None
        if weights:
            self._layout, self._layout_source = AdapterLayout.from_tensors(weights), "the global adapter's layout"
            return self._layout, self._layout_source
        return None, "the round's first contribution's layout"

    def add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        data = dxo.data
        if not data:
            return "empty adapter difference"
        odd = [k for k, v in data.items() if not isinstance(v, np.ndarray) or v.dtype.kind != "f"]
        if odd:
            return f"tensors {odd[:3]} are not floating-point arrays"
        ref, source = self._reference(fl_ctx)
        layout = AdapterLayout.from_tensors(data)
        if ref is not None:
            ref.check(data, source=f"{site}'s adapter difference against {source}")
            got, want = sum(v.nbytes for v in data.values()), _nbytes(ref)
            # Names and shapes match, so only a dtype can change the size; each tensor pairs with its reference.
            other = [f"{s.name} is {s.dtype}, not {r.dtype}" for s, r in zip(layout.tensors, ref.tensors) if s.dtype != r.dtype]
            if got > want:
                return f"oversize: its tensors hold {got:,} bytes, {source} implies {want:,} ({other[0]})"
            if other:
                return f"tensor dtypes differ from {source}: {other[:3]}"
        bad = [k for k, v in data.items() if not np.all(np.isfinite(v))]
        if bad:
            return f"non-finite values (NaN or infinity) in {bad[:3]}"
        norm = math.sqrt(math.fsum(float(np.square(v, dtype=np.float64).sum()) for v in data.values()))
        if self.max_update_norm and norm > self.max_update_norm:
            return (
                f"its adapter difference has L2 norm {norm:.4g}, above the job's max_update_norm {self.max_update_norm:g} "
                "(a diverged or scaled update; if honest sites hit it, the recipe changed and the bound must follow)"
            )
        rank = dxo.get_meta_prop(Meta.LORA_RANK)
        problem = _rank_problem(data, rank)
        if problem:
            return problem
        weight = dxo.get_meta_prop(Meta.EXAMPLE_COUNT)
        for k, v in data.items():
            acc = self._sum.setdefault(k, np.zeros(np.shape(v), dtype=np.float64))
            acc += weight * np.asarray(v, dtype=np.float64)
            axis = rank_axis(k, np.ndim(v))
            slots = self._slot_weights.setdefault(k, np.zeros(() if axis is None else v.shape[axis], dtype=np.float64))
            if axis is None:
                slots += weight
            else:
                slots[: rank or v.shape[axis]] += weight
        self._total_weight += weight
        if self._layout is None:
            self._layout, self._layout_source = layout, f"the round's first contribution's layout ({site})"
        return None

    def result(self, fl_ctx: FLContext) -> DXO:
        average = {}
        for k, v in self._sum.items():
            axis, w = rank_axis(k, v.ndim), self._slot_weights[k]
            if axis is not None:
                w = w.reshape([-1 if i == axis else 1 for i in range(v.ndim)])
            average[k] = np.divide(v, w, out=np.zeros_like(v), where=w > 0).astype(np.float32)
        self.log_info(fl_ctx, f"averaged {len(self.example_counts)} sites, example counts {self.example_counts}")
        return DXO(DataKind.WEIGHT_DIFF, data=average)


def _rank_problem(data: dict[str, np.ndarray], rank) -> str | None:
    """Why a contribution's declared lower rank is not one it can have, or None."""
    if rank is None:
        return None
    ranks = {v.shape[a] for k, v in data.items() if (a := rank_axis(k, np.ndim(v))) is not None}
    if isinstance(rank, bool) or not isinstance(rank, int) or not ranks or not 1 <= rank <= min(ranks):
        return f"meta '{Meta.LORA_RANK}' is {rank!r}; expected a rank from 1 to the job's ({min(ranks, default='?')})"
    for k, v in data.items():
        axis = rank_axis(k, np.ndim(v))
        if axis is not None and np.any(np.take(v, range(rank, v.shape[axis]), axis=axis)):
            return f"tensor {k} changes rank slots from {rank} on, beyond the site's declared rank {rank}"
    return None


def _nbytes(layout: AdapterLayout) -> int:
    return sum(s.numel * np.dtype(s.dtype).itemsize for s in layout.tensors)
