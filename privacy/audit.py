"""Privacy audit: plant canaries in one data owner's data, train, and test for membership.

Canaries are mislabelled examples whose text is a short random secret string of letters (so nothing
but memorization links text and label), with the labels balanced. A random half of them (members)
joins the owner's training data; the other half (non-members) never does. After training the owner's
trainer for the run's rounds (a one-owner federation: each round starts from the previous round's
result, exactly as FedAvg with one client), each canary is scored by the final model's loss on its planted
label, relative to the other canaries carrying the same label:

    score_i = loss_i − median_{j: label_j = label_i} loss_j

Lower means "more likely a member". The per-label median removes the shift every example of a label
gets when training moves the model's label bias (it uses no membership information, so the audit
stays a valid membership test); what is left is what the model learned about that one secret. The
loss change since the start is reported too, for reading.

A threshold test on the score gives a true- and false-positive rate. An (ε, δ)-DP trainer forces every
such test to satisfy TPR ≤ e^ε·FPR + δ and (1 − FPR) ≤ e^ε·(1 − TPR) + δ (Kairouz et al. 2015), so with
one-sided Clopper–Pearson bounds on both rates (Jagielski et al. 2020; Nasr et al. 2021):

    ε ≥ log((TPR_low − δ) / FPR_high)   and   ε ≥ log((1 − FPR_high − δ) / (1 − TPR_low)).

The thresholds come from a small fixed grid of score quantiles (``DEFAULT_THRESHOLDS``), and every
bound is taken at α / (2 · number of thresholds) (Bonferroni over the grid and the two rates), so the
reported maximum holds with confidence 1 − α overall. The canaries of one training run are treated as
independent trials, as is usual for one-run audits; Steinke, Nasr & Jagielski (2023) show that this is
sound when each canary's membership is an independent coin, which the random assignment here mimics.
A DP run must stay at or below its claimed ε; a non-private run with enough training shows a bound
above 0 — that is how the audit can fail. With n canaries per side the bound cannot exceed about
log(n), so it is a check that the implementation is not grossly broken, not a tight estimate of ε.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedadapt.data import Example

DEFAULT_THRESHOLDS = 15  # thresholds at the 1/16 … 15/16 quantiles of all canary scores
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def make_canaries(n: int, num_labels: int, seed: int, words: int = 3) -> list[Example]:
    """``n`` random secret strings of ``words`` random-letter words, labels balanced over ``num_labels``.

    Short secrets are memorized faster: the classifier reads the last position, which attends to every
    earlier token, so a long random text dilutes what is unique to it. The seed only makes the audit
    reproducible: secrecy is not needed against the trainer being audited."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(4, 8))) for _ in range(words))
        out.append(Example(text=text, label=i % num_labels))
    return out


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two one-sided (1 − alpha) bounds for a binomial proportion k / n."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def label_calibrated_scores(loss_changes: list[float], labels: list[int]) -> list[float]:
    """Each loss change minus the median loss change of all canaries with the same planted label."""
    medians = {lab: statistics.median(c for c, l2 in zip(loss_changes, labels) if l2 == lab) for lab in set(labels)}
    return [c - medians[lab] for c, lab in zip(loss_changes, labels)]


def epsilon_lower_bound(member_scores, nonmember_scores, delta: float, alpha: float = 0.05,
                        thresholds: int = DEFAULT_THRESHOLDS) -> dict[str, float]:
    """The largest empirical ε lower bound over the tests "score ≤ t ⇒ member" (lower score = member),
    t on a grid of ``thresholds`` quantiles of all scores; confidence 1 − alpha for the maximum."""
    ms, ns = list(member_scores), list(nonmember_scores)
    if not ms or not ns:
        raise ValueError("the audit needs member and non-member canaries")
    pooled = sorted(ms + ns)
    grid = sorted({pooled[min(len(pooled) - 1, max(0, math.ceil(len(pooled) * k / (thresholds + 1)) - 1))]
                   for k in range(1, thresholds + 1)})
    a = alpha / (2 * len(grid))  # Bonferroni: two one-sided rate bounds per threshold
    best = {"epsilon_lower_bound": 0.0, "threshold": float("nan"), "tpr": 0.0, "fpr": 0.0}
    for t in grid:
        tp = sum(s <= t for s in ms)
        fp = sum(s <= t for s in ns)
        tpr_lo, _ = clopper_pearson(tp, len(ms), a)
        _, fpr_hi = clopper_pearson(fp, len(ns), a)
        cands = []
        if tpr_lo - delta > 0 and fpr_hi > 0:
            cands.append(math.log((tpr_lo - delta) / fpr_hi))
        if 1 - fpr_hi - delta > 0 and 1 - tpr_lo > 0:  # the complementary test: "score > t ⇒ non-member"
            cands.append(math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
        for c in cands:
            if c > best["epsilon_lower_bound"]:
                best = {"epsilon_lower_bound": c, "threshold": t, "tpr": tp / len(ms), "fpr": fp / len(ns)}
    # the plain membership advantage (best TPR − FPR over all thresholds), for reading, not for the bound
    adv = max(sum(s <= t for s in ms) / len(ms) - sum(s <= t for s in ns) / len(ns) for t in pooled)
    return {**best, "advantage": adv}


def _canary_losses(model, task, canaries, batch_size: int = 32) -> list[float]:
    out = []
    with torch.no_grad():
        for s in range(0, len(canaries), batch_size):
            out.extend(task.per_example_loss(model, task.collate(canaries[s:s + batch_size])).tolist())
    return out


def split_members(canaries: list[Example], seed: int) -> tuple[list[int], list[int]]:
    """A random half of each label's canaries become members (indices), the rest non-members."""
    rng = random.Random(seed)
    members, nonmembers = [], []
    for lab in sorted({c.label for c in canaries}):
        idx = [i for i, c in enumerate(canaries) if c.label == lab]
        rng.shuffle(idx)
        members += idx[: len(idx) // 2]
        nonmembers += idx[len(idx) // 2:]
    return sorted(members), sorted(nonmembers)


def run_audit(cfg, *, canaries_per_side: int = 48, owner_index: int = 0, alpha: float = 0.05,
              canary_words: int = 3, ledger_dir: str | Path | None = None, on_round=None) -> dict[str, Any]:
    """Train data owner ``owner_index`` (with canaries) under ``cfg``'s trainer; return the audit result."""
    from fedadapt.partitions import dataset_labels, simulated_client_examples

    if cfg.trainer != "lora" or cfg.task != "classify":
        raise ValueError(f"the audit trains LoRA adapters on a classification task: set trainer = \"lora\" and task = "
                         f"\"classify\", not {cfg.trainer!r} / {cfg.task!r}")
    labels = dataset_labels(cfg)
    real = list(simulated_client_examples(cfg, cfg.federation.num_clients, owner_index))
    if canaries_per_side < 4:
        raise ValueError(f"canaries_per_side={canaries_per_side} is too few to bound anything: use at least 4 (32+ to detect leaks)")
    canaries = make_canaries(2 * canaries_per_side, len(labels), seed=cfg.seed + 7919, words=canary_words)
    member_idx, nonmember_idx = split_members(canaries, seed=cfg.seed + 104729)
    train = real + [canaries[i] for i in member_idx]
    random.Random(cfg.seed).shuffle(train)

    threads_before = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)  # as a node would; restored below
    try:
        return _train_and_score(cfg, labels, train, canaries, member_idx, nonmember_idx, owner_index, alpha,
                                canary_words, ledger_dir, on_round)
    finally:
        torch.set_num_threads(threads_before)


def _train_and_score(cfg, labels, train, canaries, member_idx, nonmember_idx, owner_index, alpha, canary_words,
                     ledger_dir, on_round) -> dict[str, Any]:
    from fedadapt.adapters import add_, adapter_state, load_adapter_state
    from fedadapt.models import cached_lora_model
    from fedadapt.tasks.classify import VerbalizerTask
    from methods import get_trainer  # the method's own client half, exactly as a data owner runs it
    from methods.base import TrainContext, TrainerRefused

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

    changes = [a - b for a, b in zip(after, before)]
    # the final loss, not its change, is the score: the change adds the base model's per-canary noise
    # (measured on tiny-llama: ε lower bound 1.69 from final losses vs 1.45 from changes, same run)
    scores = label_calibrated_scores(after, [c.label for c in canaries])
    n_local = len(train)
    private = cfg.privacy.mode == "dp-sgd"
    delta = last_metrics.get("dp_delta", cfg.privacy.delta or 1.0 / (10 * n_local))
    member_scores = [scores[i] for i in member_idx]
    nonmember_scores = [scores[i] for i in nonmember_idx]
    bound = epsilon_lower_bound(member_scores, nonmember_scores, delta, alpha)
    claimed = last_metrics.get("dp_epsilon_total", float("inf")) if private else float("inf")
    return {
        "trainer": cfg.trainer, "privacy_mode": cfg.privacy.mode, "model": cfg.model, "rounds": rounds_done, "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "n_local": n_local,
        "members": len(member_idx), "nonmembers": len(nonmember_idx), "canary_words": canary_words,
        "claimed_epsilon": claimed, "delta": delta, "alpha": alpha,
        "member_loss_change_mean": statistics.fmean(changes[i] for i in member_idx),
        "nonmember_loss_change_mean": statistics.fmean(changes[i] for i in nonmember_idx),
        "member_score_mean": statistics.fmean(member_scores),
        "nonmember_score_mean": statistics.fmean(nonmember_scores),
        **bound,
        "within_claim": bound["epsilon_lower_bound"] <= claimed,
        "leak_detected": bound["epsilon_lower_bound"] > 0,
    }
