"""The checks every aggregator of ours makes before a contribution may count, whatever it carries."""

from __future__ import annotations

from typing import Container

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants


def check_contribution(
    site: str, shareable: Shareable, fl_ctx: FLContext, seen: Container[str], kind: str, hint: str = ""
) -> tuple[str | None, DXO | None]:
    """(reason to reject, None) or (None, the contribution's DXO): the site's own verdict, the round it
    was made for, one contribution per site and round, a readable DXO of ``kind``."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return f"site reported {shareable.get_return_code()}", None
    current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
    contributed = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
    if current is not None and contributed != current:
        return f"result is for round {contributed}, the current round is {current}", None
    if site in seen:
        return "a second contribution in the same round", None
    try:
        dxo = from_shareable(shareable)
    except Exception as err:
        return f"not a DXO ({err})", None
    if dxo.data_kind != kind:
        return f"expected {kind}{hint}, got {dxo.data_kind}", None
    return None, dxo
