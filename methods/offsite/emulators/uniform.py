"""`uniform`: Offsite-Tuning's layer drop: keep ``keep`` evenly spaced middle layers, drop the rest.

The emulator is shallower (``bottom + keep + top`` layers); ``share`` is accepted for a uniform
builder signature and ignored (sharing is CRaSh's step).
"""

from __future__ import annotations

from methods.offsite.emulator import EmulatorError, EmulatorPlan, middle_layers


def plan_uniform(full_layers: int, bottom: int, top: int, keep: int, similarity=None, share: bool = False) -> EmulatorPlan:
    middle = middle_layers(full_layers, bottom, top)
    if not 1 <= keep <= len(middle):
        raise EmulatorError(f"offsite.keep={keep} must be between 1 and the {len(middle)} middle layers")
    # group g covers middle[starts[g]:starts[g+1]]; its kept layer is the group's centre
    starts = [round(g * len(middle) / keep) for g in range(keep + 1)]
    clusters = [middle[starts[g] : starts[g + 1]] for g in range(keep)]
    kept = [c[(len(c) - 1) // 2] for c in clusters]
    return EmulatorPlan("uniform", full_layers, bottom, top, kept, clusters, share=False)
