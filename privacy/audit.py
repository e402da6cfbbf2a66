"""Privacy audit: plant canaries in one data owner's data, train, and test for membership.

Canaries are mislabelled examples whose text is a random secret string of words (so nothing but
memorization links text and label). Half of them (members) join the owner's training data; the other
half (non-members) never do. After training the owner's trainer for the run's rounds (a one-owner
federation: each round starts from the previous round's result, exactly as FedAvg with one client),
each canary is scored by how much the training lowered the loss of its planted label
(loss_after − loss_before; lower = more likely a member).

A threshold test on that score gives a true- and false-positive rate; with Clopper–Pearson bounds at
confidence 1 − α, every threshold t yields an empirical lower bound on ε (Jagielski et al. 2020;
Nasr et al. 2021):  ε ≥ log((TPR_low − δ) / FPR_high)  and  ε ≥ log((1 − FPR_high − δ) / (1 − TPR_low)).
The largest over thresholds is reported (the threshold search makes it slightly optimistic for the
auditor at small sample sizes, which is why the bounds are one-sided at α / number of thresholds,
Bonferroni). A DP run must stay at or below its claimed ε; a non-private run with enough training
shows a bound above 0, which is what "the audit can fail" means. With n canaries per side the bound
cannot exceed about log(n), so it is a sanity check of the implementation, not a tight estimate.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedadapt.data import Example


def make_canaries(n: int, num_labels: int, seed: int, words: int = 12) -> list[Example]:
    """``n`` random secret strings with random labels (the seed only makes the audit reproducible)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for i in range(n):
        text = " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8))) for _ in range(words))
        out.append(Example(text=text, label=rng.randrange(num_labels)))
    return out


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two one-sided (1 − alpha) bounds for a binomial proportion k / n."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(member_scores, nonmember_scores, delta: float, alpha: float = 0.05) -> dict[str, float]:
    """The largest empirical ε lower bound over thresholds "score ≤ t ⇒ member" (lower score = member)."""
    ms, ns = sorted(member_scores), sorted(nonmember_scores)
    thresholds = sorted(set(ms) | set(ns))
    a = alpha / max(len(thresholds), 1)  # Bonferroni over the threshold search
    best = {"epsilon_lower_bound": 0.0, "threshold": float("nan"), "tpr": 0.0, "fpr": 0.0}
    for t in thresholds:
        tp = sum(s <= t for s in ms)
        fp = sum(s <= t for s in ns)
        tpr_lo, tpr_hi = clopper_pearson(tp, len(ms), a)
        fpr_lo, fpr_hi = clopper_pearson(fp, len(ns), a)
        cands = []
        if tpr_lo - delta > 0 and fpr_hi > 0:
            cands.append(math.log((tpr_lo - delta) / fpr_hi))
        if 1 - fpr_hi - delta > 0 and 1 - tpr_lo > 0:  # the complementary test: "score > t ⇒ non-member"
            cands.append(math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
        for c in cands:
            if c > best["epsilon_lower_bound"]:
                best = {"epsilon_lower_bound": c, "threshold": t, "tpr": tp / len(ms), "fpr": fp / len(ns)}
    # membership advantage at the best threshold for the plain accuracy view
    adv = max((sum(s <= t for s in ms) / len(ms) - sum(s <= t for s in ns) / len(ns)) for t in thresholds)
    return {**best, "advantage": adv}


def _canary_losses(model, task, canaries, batch_size: int = 32) -> list[float]:
    out = []
    with torch.no_grad():
        for s in range(0, len(canaries), batch_size):
            inputs, labels = task.batch(canaries[s:s + batch_size])
            out.extend(task.loss(model, inputs, labels, reduction="none").tolist())
    return out


def run_audit(cfg, *, canaries_per_side: int = 32, owner_index: int = 0, alpha: float = 0.05,
              ledger_dir: str | Path | None = None, on_round=None) -> dict[str, Any]:
    """Train data owner ``owner_index`` (with canaries) under ``cfg``'s trainer; return the audit result."""
    from client_node.trainers import TrainContext, TrainerRefused, get_trainer
    from fedadapt.adapters import add_, adapter_state, load_adapter_state
    from fedadapt.models import cached_lora_model
    from fedadapt.partitions import dataset_labels, simulated_client_examples
    from fedadapt.task import VerbalizerTask

    if cfg.trainer not in ("lora", "lora-dp"):
        raise ValueError(f"the audit trains LoRA adapters: trainer must be 'lora' or 'lora-dp', not {cfg.trainer!r}")
    labels = dataset_labels(cfg.data)
    real = list(simulated_client_examples(cfg.data, cfg.federation.num_clients, owner_index, cfg.seed))
    canaries = make_canaries(2 * canaries_per_side, len(labels), seed=cfg.seed + 7919)
    members, nonmembers = canaries[:canaries_per_side], canaries[canaries_per_side:]
    train = real + members
    random.Random(cfg.seed).shuffle(train)

    model, tok = cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed)
    task = VerbalizerTask.from_config(tok, labels, cfg.data)
    initial = adapter_state(model)
    load_adapter_state(model, initial)
    before = _canary_losses(model, task, canaries)

    owner = f"audit-owner-{owner_index}"
    tmp = None
    if ledger_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedadapt-audit-")
        ledger_dir = tmp.name
    global_state = {k: v.clone() for k, v in initial.items()}
    trainer = get_trainer(cfg.trainer)
    last_metrics: dict[str, float] = {}
    rounds_done = 0
    for r in range(1, cfg.rounds + 1):
        ctx = TrainContext(cfg=cfg, round=r, global_state=global_state, examples=train, labels=labels,
                           client_name=owner, ledger_dir=Path(ledger_dir))
        try:
            res = trainer(ctx)
        except TrainerRefused as e:
            raise RuntimeError(f"the audited owner refused round {r}: {e}") from None
        global_state = add_(global_state, res.update)
        last_metrics = res.metrics
        rounds_done = r
        if on_round:
            on_round(r, res.metrics)
    load_adapter_state(model, global_state)
    after = _canary_losses(model, task, canaries)
    load_adapter_state(model, initial)
    if tmp is not None:
        tmp.cleanup()

    scores = [a - b for a, b in zip(after, before)]
    n_local = len(train)
    private = cfg.trainer == "lora-dp"
    delta = last_metrics.get("dp_delta", cfg.privacy.delta or 1.0 / (10 * n_local))
    bound = epsilon_lower_bound(scores[:canaries_per_side], scores[canaries_per_side:], delta, alpha)
    claimed = last_metrics.get("dp_epsilon_total", float("inf")) if private else float("inf")
    return {
        "trainer": cfg.trainer, "model": cfg.model, "rounds": rounds_done, "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size, "n_local": n_local, "canaries_per_side": canaries_per_side,
        "claimed_epsilon": claimed, "delta": delta, "alpha": alpha,
        "member_score_mean": sum(scores[:canaries_per_side]) / canaries_per_side,
        "nonmember_score_mean": sum(scores[canaries_per_side:]) / canaries_per_side,
        **bound,
        "within_claim": bound["epsilon_lower_bound"] <= claimed,
        "leak_detected": bound["epsilon_lower_bound"] > 0,
    }
