"""The privacy ledger: one append-only file per data owner; ε is charged BEFORE anything is released.

Stable API (the DP-SGD trainer, client-level DP at the coordinator, and DP-OPT build on it)::

    from privacy.ledger import PrivacyLedger, BudgetExceeded, LedgerError
    from privacy.accountants import SubsampledGaussian

    ledger = PrivacyLedger.open(ledger_dir, owner="client-0", epsilon_budget=3.0, delta=1e-5, accountant="rdp")
    ledger.preview([SubsampledGaussian(0.9, 0.01, 8)])        # -> (ε_total, δ_total) if charged; no write
    entry = ledger.charge(round=3, mechanism="dp-sgd",
                          gaussian=[SubsampledGaussian(0.9, 0.01, 8)])  # raises BudgetExceeded, else fsynced
    entry = ledger.charge(round=1, mechanism="limited-domain", approx=[(0.5, 1e-7)])  # a pure/approx-DP release
    ledger.spent()      # (ε, δ) of everything charged so far
    ledger.remaining()  # ε left under the budget
    ledger.remaining_delta()  # δ the approx releases may still use
    ledger.entries      # list of dicts, oldest first (see _entry below for the fields)

Composition: all ``SubsampledGaussian`` events ever charged are composed by the ledger's accountant at
δ_g = δ_budget − Σδ_approx; ``approx`` releases (ε_i, δ_i) add by basic composition. The reported total
is ε_accountant(δ_g) + Σε_i at δ_budget. Every entry also records the total under the independent
accountant (``CROSS_CHECK``); if that is more than 1 % above the primary value, the larger is charged.
Both budgets are enforced: a charge is refused (BudgetExceeded) when the ε total would pass the ε budget,
when Σδ_i would pass the δ budget, or when Gaussian events are left no δ_g > 0. An approx release of
(0, 0) is refused: anything computed from the data costs something.

Durability: the file (``<ledger_dir>/<owner>.ledger.json``) is rewritten whole through a temp file,
fsync and rename under an exclusive lock, so a crash at any moment leaves the old or the new ledger,
never a torn one; ``charge`` returns only after the new ledger is on disk, and the caller releases
the update only after ``charge`` returned. A crash between charge and release therefore leaves the
charge in place (the ledger is never optimistic). Entries carry a SHA-256 hash chain; a ledger whose
chain does not verify is refused (``LedgerError``) rather than read as "nothing spent".
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

from fedadapt.paths import atomic_write_json, file_lock

from .accountants import CROSS_CHECK, AccountantError, SubsampledGaussian, get_accountant

LEDGER_VERSION = 1
CROSS_CHECK_TOLERANCE = 0.01  # the cross-check may exceed the primary ε by this fraction before it is charged


class LedgerError(RuntimeError):
    """A ledger that cannot be trusted or does not match the run (one line: which file, what to do)."""


class BudgetExceeded(RuntimeError):
    """Charging this release would exceed the data owner's budget; nothing was charged or released."""


def _safe_owner(owner: str) -> str:
    if not owner or not re.fullmatch(r"[A-Za-z0-9._@+-]+", owner) or owner in {".", ".."}:
        raise LedgerError(f"data owner name {owner!r} cannot name a ledger file: use letters, digits, '.', '_', '-'")
    return owner


def _hash(prev: str, entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256((prev + json.dumps(body, sort_keys=True)).encode()).hexdigest()


class PrivacyLedger:
    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self._data = data

    # ------------------------------------------------------------------ opening
    @staticmethod
    def path_for(ledger_dir: str | Path, owner: str) -> Path:
        return Path(ledger_dir) / f"{_safe_owner(owner)}.ledger.json"

    @classmethod
    def open(cls, ledger_dir: str | Path, owner: str, *, epsilon_budget: float, delta: float,
             accountant: str = "rdp") -> "PrivacyLedger":
        """Open ``owner``'s ledger, creating it (with this budget) when absent.

        An existing ledger keeps the budget, δ and accountant it was created with; asking for different
        ones is refused, since changing them mid-way would make the recorded totals meaningless.
        """
        get_accountant(accountant)  # fail early on a bad name
        if not 0 < delta < 1:
            raise LedgerError(f"delta {delta} is not in (0, 1): set privacy.delta")
        if not epsilon_budget > 0:
            raise LedgerError(f"epsilon budget {epsilon_budget} must be > 0: set privacy.target_epsilon")
        path = cls.path_for(ledger_dir, owner)
        with file_lock(path.with_name(path.name + ".lock")):
            if path.is_file():
                ledger = cls.load(path)
                b = ledger._data["budget"]
                if (abs(b["epsilon"] - epsilon_budget) > 1e-12 or abs(b["delta"] - delta) > 1e-18
                        or ledger._data["accountant"] != accountant):
                    raise LedgerError(
                        f"{path} was created with ε={b['epsilon']}, δ={b['delta']}, accountant={ledger._data['accountant']}; "
                        f"this run asks ε={epsilon_budget}, δ={delta}, accountant={accountant}: use the same privacy "
                        "settings or another ledger directory"
                    )
                return ledger
            data = {
                "version": LEDGER_VERSION, "owner": owner, "created": time.time(),
                "budget": {"epsilon": float(epsilon_budget), "delta": float(delta)},
                "accountant": accountant, "cross_check_accountant": CROSS_CHECK[accountant], "entries": [],
            }
            atomic_write_json(path, data)
            return cls(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        """Read and verify a ledger file (for reports). Raises LedgerError if it is unreadable or altered."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LedgerError(f"cannot read privacy ledger {path} ({e}): restore it from the data owner's copy") from None
        if data.get("version") != LEDGER_VERSION or "entries" not in data:
            raise LedgerError(f"{path} is not a fedadapt privacy ledger (version {data.get('version')!r})")
        prev = ""
        for i, e in enumerate(data["entries"]):
            if e.get("index") != i or e.get("sha256") != _hash(prev, e):
                raise LedgerError(f"{path}: entry {i} fails its hash chain (edited or reordered): restore the ledger")
            prev = e["sha256"]
        return cls(path, data)

    # ------------------------------------------------------------------ reading
    @property
    def owner(self) -> str:
        return self._data["owner"]

    @property
    def budget(self) -> tuple[float, float]:
        return self._data["budget"]["epsilon"], self._data["budget"]["delta"]

    @property
    def accountant_name(self) -> str:
        return self._data["accountant"]

    @property
    def cross_check_name(self) -> str:
        return self._data["cross_check_accountant"]

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._data["entries"]]

    def spent(self) -> tuple[float, float]:
        if not self._data["entries"]:
            return 0.0, 0.0
        last = self._data["entries"][-1]
        return last["epsilon_total"], last["delta_total"]

    def remaining(self) -> float:
        return max(0.0, self.budget[0] - self.spent()[0])

    def remaining_delta(self) -> float:
        """δ_budget − Σδ_i of the approx releases (with Gaussian events some of it must stay for δ_g)."""
        _, approx = self._events(self._data["entries"])
        return max(0.0, self.budget[1] - sum(a[1] for a in approx))

    # ------------------------------------------------------------------ composing
    def _events(self, entries) -> tuple[list[SubsampledGaussian], list[tuple[float, float]]]:
        gauss = [SubsampledGaussian(**g) for e in entries for g in e.get("gaussian", [])]
        approx = [tuple(a) for e in entries for a in e.get("approx", [])]
        return gauss, approx

    def _totals(self, gauss, approx) -> dict[str, float]:
        eps_budget, delta = self.budget
        eps_a = sum(a[0] for a in approx)
        delta_a = sum(a[1] for a in approx)
        if not gauss:
            return {"epsilon_total": eps_a, "delta_total": delta_a, "epsilon_primary": eps_a, "epsilon_cross_check": eps_a}
        delta_g = delta - delta_a
        if delta_g <= 0:
            return {"epsilon_total": float("inf"), "delta_total": delta, "epsilon_primary": float("inf"),
                    "epsilon_cross_check": float("inf")}
        primary = get_accountant(self.accountant_name).epsilon(gauss, delta_g) + eps_a
        cross = get_accountant(self.cross_check_name).epsilon(gauss, delta_g) + eps_a
        charged = cross if cross > primary * (1 + CROSS_CHECK_TOLERANCE) else primary
        return {"epsilon_total": charged, "delta_total": delta, "epsilon_primary": primary, "epsilon_cross_check": cross}

    def preview(self, gaussian: Sequence[SubsampledGaussian] = (), approx: Sequence[tuple[float, float]] = ()) -> tuple[float, float]:
        """(ε, δ) in total if these events were charged now; writes nothing."""
        g, a = self._events(self._data["entries"])
        t = self._totals(g + list(gaussian), a + [tuple(x) for x in approx])
        return t["epsilon_total"], t["delta_total"]

    # ------------------------------------------------------------------ charging
    def charge(self, *, round: int, mechanism: str, gaussian: Sequence[SubsampledGaussian] = (),
               approx: Sequence[tuple[float, float]] = (), note: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record a release and return its entry, durably, BEFORE the caller releases anything.

        Raises BudgetExceeded (nothing written) if the new total would exceed the budget.
        """
        if not gaussian and not approx:
            raise LedgerError("a charge needs at least one mechanism event (gaussian=... or approx=...)")
        for eps_i, delta_i in approx:
            if eps_i < 0 or not 0 <= delta_i < 1:
                raise AccountantError(f"approx-DP release ({eps_i}, {delta_i}) is not a valid (ε, δ) pair")
            if eps_i == 0 and delta_i == 0:
                raise AccountantError("approx-DP release charged (0, 0): a release computed from the data costs "
                                      "something; charge its (ε, δ), with a positive floor when an accountant says 0")
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            # re-read under the lock: another process (a retried round) may have charged meanwhile
            current = self.load(self.path) if self.path.is_file() else self
            self._data = current._data
            g, a = self._events(self._data["entries"])
            before = self.spent()[0]
            totals = self._totals(g + list(gaussian), a + [tuple(x) for x in approx])
            eps_budget, delta = self.budget
            delta_a = sum(x[1] for x in a) + sum(float(x[1]) for x in approx)
            if delta_a > delta * (1 + 1e-9) or (delta_a >= delta and (g or gaussian)):
                raise BudgetExceeded(
                    f"{self.owner}: round {round} would spend δ={delta_a:.4g} in approx-DP releases, "
                    + ("over the δ budget" if delta_a > delta * (1 + 1e-9) else "leaving no δ for the Gaussian events of")
                    + f" δ={delta:g} (ε spent {before:.4g} of {eps_budget:g}); not releasing — lower the release's δ, "
                    "raise the δ budget for a new ledger or stop this data owner"
                )
            if totals["epsilon_total"] > eps_budget:
                raise BudgetExceeded(
                    f"{self.owner}: round {round} would spend ε={totals['epsilon_total']:.4g} in total, over the budget "
                    f"ε={eps_budget:g} (δ={delta:g}; spent {before:.4g} so far); not training — raise "
                    "privacy.target_epsilon for a new ledger or stop this data owner"
                )
            entries = self._data["entries"]
            entry: dict[str, Any] = {
                "index": len(entries), "round": int(round), "mechanism": mechanism, "time": time.time(),
                "gaussian": [x.to_dict() for x in gaussian], "approx": [list(map(float, x)) for x in approx],
                "epsilon_round": totals["epsilon_total"] - before, **totals,
                "accountant": self.accountant_name, "cross_check_accountant": self.cross_check_name,
                "note": dict(note or {}),
            }
            entry["sha256"] = _hash(entries[-1]["sha256"] if entries else "", entry)
            new = {**self._data, "entries": entries + [entry]}
            atomic_write_json(self.path, new)  # on disk (fsynced, renamed) before we return
            self._data = new
            return dict(entry)


def read_ledgers(ledger_dir: str | Path) -> list[PrivacyLedger]:
    """Every ledger in a folder (a run's ``privacy/``), sorted by owner."""
    folder = Path(ledger_dir)
    if not folder.is_dir():
        return []
    return sorted((PrivacyLedger.load(p) for p in folder.glob("*.ledger.json")), key=lambda lg: lg.owner)
