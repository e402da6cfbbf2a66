"""Differential privacy for fedadapt: accountants, the per-data-owner ledger, mechanisms, report, audit.

Dependency direction: ``privacy`` depends on ``protocols`` and ``fedadapt`` only; the coordinator and
the client node depend on it.
"""
