"""Couplers by name: ``get_coupler("exact")`` or ``get_coupler(my_coupler)``."""

from __future__ import annotations

from typing import Any

from otcfm._args import check_options
from otcfm._checks import check_choice
from otcfm.couplers.base import Coupler
from otcfm.couplers.exact import ExactCoupler
from otcfm.couplers.hungarian import HungarianCoupler
from otcfm.couplers.independent import IndependentCoupler, PairedCoupler
from otcfm.couplers.relaxed import PartialCoupler, UnbalancedCoupler
from otcfm.couplers.semidiscrete import SemidiscreteCoupler
from otcfm.couplers.sinkhorn import SinkhornCoupler

__all__ = ["COUPLERS", "get_coupler"]

#: Registered coupler classes by name.
COUPLERS: dict[str, type[Coupler]] = {
    cls.name: cls
    for cls in (
        IndependentCoupler,
        ExactCoupler,
        HungarianCoupler,
        SinkhornCoupler,
        PairedCoupler,
        SemidiscreteCoupler,
        UnbalancedCoupler,
        PartialCoupler,
    )
}


def get_coupler(coupler: str | Coupler, **options: Any) -> Coupler:
    """Return a coupler from a registered name or pass an instance through.

    Args:
        coupler: a name in :data:`COUPLERS` or a :class:`Coupler` instance.
        **options: keyword arguments of the named coupler's constructor
            (``get_coupler("sinkhorn", epsilon=0.1)``).

    Raises:
        ValueError: unknown name (the message lists the valid ones), or options
            given together with an instance.
        TypeError: neither a string nor a Coupler, or an unknown option.
    """
    if isinstance(coupler, Coupler):
        if options:
            raise ValueError(f"coupler: options {sorted(options)} apply to a name, not to an instance")
        return coupler
    if not isinstance(coupler, str):
        raise TypeError(f"coupler: expected a name or a Coupler instance, got {type(coupler).__name__}")
    check_choice(coupler, COUPLERS, "coupler")
    try:
        return COUPLERS[coupler](**options)
    except TypeError:  # an unknown option is named, with the valid ones; other TypeErrors pass as they are
        check_options(COUPLERS[coupler], options, "coupler")
        raise
