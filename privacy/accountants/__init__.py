"""Accountants, keyed by the run config's ``privacy.accountant`` name.

``get_accountant(name)`` returns an :class:`~privacy.accountants.base.Accountant`; ``CROSS_CHECK[name]``
names the independent accountant the ledger records beside it (Opacus ↔ dp-accounting).
"""

from __future__ import annotations

from .base import Accountant, AccountantError, SubsampledGaussian, compact
from .pld import DpAccountingPldAccountant
from .prv import OpacusPrvAccountant
from .rdp import OpacusRdpAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {
    "rdp": OpacusRdpAccountant,
    "prv": OpacusPrvAccountant,
    "pld": DpAccountingPldAccountant,
}

# the accountant from the other library, for the ledger's cross-check column
CROSS_CHECK = {"rdp": "pld", "prv": "pld", "pld": "prv"}


def get_accountant(name: str) -> Accountant:
    if name not in ACCOUNTANTS:
        raise AccountantError(f"unknown accountant {name!r}: choose one of {sorted(ACCOUNTANTS)} (privacy.accountant)")
    return ACCOUNTANTS[name]()


def accountant_names() -> list[str]:
    return sorted(ACCOUNTANTS)


__all__ = ["ACCOUNTANTS", "CROSS_CHECK", "Accountant", "AccountantError", "SubsampledGaussian", "accountant_names",
           "compact", "get_accountant"]
