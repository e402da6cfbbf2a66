"""Privacy audit in one training run: plant canaries in one data owner's data, train, guess membership.

This is the one-run audit of Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1) Training
Run". ``m`` canaries are mislabelled examples whose text is a short random secret string of letters (so
nothing but memorization links text and label), labels balanced. Each canary joins the owner's training
data on its own fair coin flip drawn from OS entropy (``secrets``): the theorem needs independent,
unpredictable inclusion, which a seeded balanced split is not. After training the owner's trainer for the
run's rounds (a one-owner federation: each round starts from the previous round's result, exactly as
FedAvg with one client), each canary is scored by the final model's loss on its planted label, relative
to the other canaries carrying the same label:

    score_i = loss_i − median_{j: label_j = label_i} loss_j

Lower means "more likely a member". The per-label median removes the shift every example of a label gets
when training moves the model's label bias; it reads only the model and the canaries, never the coins.

The auditor guesses "in" for the k₊ lowest scores, "out" for the k₋ highest, and abstains on the rest
(r = k₊ + k₋ guesses, v of them right). If the trainer is (ε, δ)-DP, Section 5 and Appendix D of the
paper bound the chance of v or more right guesses by

    p(ε) = P[Binomial(r, q) ≥ v] + 2mδ · max_{1≤i≤v} P[v−i ≤ Binomial(r, q) < v] / i,   q = e^ε / (1 + e^ε),

so every ε with p(ε) ≤ α is refuted, and the largest such ε is the certified lower bound. The (k₊, k₋)
pairs come from a fixed grid of fractions of m (``GUESSES``); each is tested at α / len(GUESSES)
(Bonferroni), so the reported maximum holds with confidence 1 − α.

Even perfect guesses on all m canaries certify only about log(m / 3) (less when 2mδ grows), so the
canary count must match the claim: ``plan_audit`` computes the largest certifiable ε before training,
raises the count for ``canaries="auto"`` up to ``MAX_AUTO_CANARIES``, and refuses an audit that could
not fail. The bound is a check that the implementation is not grossly broken, not a tight estimate of ε.
"""

from __future__ import annotations

import math
import random
import secrets
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedadapt.data import Example

# (k₊, k₋) as fractions of m: guess "in" for the k₊ lowest scores, "out" for the k₋ highest. Memorized
# members sit cleanly in the low tail, so one-sided "in" guesses are often the strongest test.
GUESSES = ((1 / 2, 1 / 2), (3 / 8, 3 / 8), (1 / 4, 1 / 4), (1 / 8, 1 / 8),
           (1 / 2, 0.0), (3 / 8, 0.0), (1 / 4, 0.0), (1 / 8, 0.0))
DEFAULT_CANARIES = 96  # where --canaries auto starts
MIN_CANARIES = 16
MAX_AUTO_CANARIES = 2048  # --canaries auto stops here: more dilutes memorization and costs scoring time
_SCAN_LIMIT = 1 << 17  # canary counts searched when sizing to a claim
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class AuditRefused(ValueError):
    """An audit that could not fail (or cannot run): one line, naming the fix."""


def make_canaries(n: int, num_labels: int, seed: int, words: int = 3) -> list[Example]:
    """``n`` random secret strings of ``words`` random-letter words, labels balanced over ``num_labels``.

    Short secrets are memorized faster: the classifier reads the last position, which attends to every
    earlier token, so a long random text dilutes what is unique to it. The seed only makes the texts
    reproducible: secrecy is not needed against the trainer being audited; membership is what is secret."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(4, 8))) for _ in range(words))
        out.append(Example(text=text, label=i % num_labels))
    return out


def draw_inclusion(m: int) -> list[bool]:
    """One independent fair coin per canary from OS entropy (the one-run theorem's assumption)."""
    return [bool(secrets.randbits(1)) for _ in range(m)]


def label_calibrated_scores(loss_changes: list[float], labels: list[int]) -> list[float]:
    """Each loss change minus the median loss change of all canaries with the same planted label."""
    medians = {lab: statistics.median(c for c, l2 in zip(loss_changes, labels) if l2 == lab) for lab in set(labels)}
    return [c - medians[lab] for c, lab in zip(loss_changes, labels)]


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v right out of r guesses] bound for an (ε, δ)-DP trainer, m canaries (Steinke et al. 2023, App. D)."""
    import numpy as np
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps))  # the accuracy of ε-DP randomized response
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v−i ≤ Bin < v], i = 1..v
    return min(1.0, tail + 2 * m * delta * float(np.max(below / np.arange(1, v + 1))))


def epsilon_from_guesses(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """The largest ε that v right out of r guesses refute at level alpha (0 if none)."""
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # unreachable for v ≤ r (the tail tends to 1): a guard, not a case
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= alpha else (lo, mid)
    return lo


def guess_counts(m: int) -> list[tuple[int, int]]:
    """The (k₊, k₋) pairs of ``GUESSES`` for m canaries."""
    return [(math.floor(m * a), math.floor(m * b)) for a, b in GUESSES]


def max_certifiable_epsilon(m: int, delta: float, alpha: float = 0.05) -> float:
    """The largest ε the audit could certify with m canaries even if every one of its m guesses were right."""
    return epsilon_from_guesses(m, m, m, delta, alpha / len(GUESSES))


def certifiable_peak(delta: float, alpha: float = 0.05) -> tuple[float, int]:
    """(the largest ε any canary count certifies, that count): with δ > 0 the 2mδ term caps a one-run audit."""
    best, m = (0.0, MIN_CANARIES), MIN_CANARIES
    while m <= _SCAN_LIMIT:
        top = max_certifiable_epsilon(m, delta, alpha)
        if top < best[0]:
            break  # past the peak: the 2mδ term now grows faster than the guesses help
        best, m = (top, m), math.ceil(m * 1.5 / 8) * 8
    return best


def canaries_needed(claim: float, delta: float, alpha: float = 0.05, start: int = MIN_CANARIES) -> int | None:
    """The fewest canaries (a multiple of 8, ≥ start) whose largest certifiable ε exceeds ``claim``; None if
    no count does (see ``certifiable_peak``)."""
    prev, m, last = None, max(start, MIN_CANARIES), 0.0
    while m <= _SCAN_LIMIT:
        top = max_certifiable_epsilon(m, delta, alpha)
        if top > claim:
            break
        if top < last:
            return None  # past the peak
        prev, m, last = m, math.ceil(m * 1.5 / 8) * 8, top
    else:
        return None
    if prev is None:
        return m
    lo, hi = prev, m  # lo fails, hi certifies: bisect on multiples of 8
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (lo, mid) if max_certifiable_epsilon(mid, delta, alpha) > claim else (mid, hi)
    return hi


def one_run_bound(scores: list[float], member: list[bool], delta: float, alpha: float = 0.05) -> dict[str, float]:
    """The ε lower bound from guessing membership by score (low = in), best over ``GUESSES``, confidence 1 − alpha."""
    m = len(scores)
    if m != len(member) or m < 2:
        raise ValueError("the audit needs one score and one coin per canary, and at least 2 canaries")
    order = sorted(range(m), key=lambda i: scores[i])
    a = alpha / len(GUESSES)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0, "guess_in": 0, "guess_out": 0}
    for k_in, k_out in guess_counts(m):
        if k_in + k_out == 0:
            continue
        v = sum(member[i] for i in order[:k_in]) + sum(not member[i] for i in order[m - k_out:])
        eps = epsilon_from_guesses(m, k_in + k_out, v, delta, a)
        if eps > best["epsilon_lower_bound"] or not best["guesses"]:
            best = {"epsilon_lower_bound": eps, "guesses": k_in + k_out, "correct": v, "guess_in": k_in,
                    "guess_out": k_out}
    # the plain membership advantage (best TPR − FPR over all thresholds), for reading, not for the bound
    ms = [s for s, b in zip(scores, member) if b]
    ns = [s for s, b in zip(scores, member) if not b]
    adv = max(sum(s <= t for s in ms) / len(ms) - sum(s <= t for s in ns) / len(ns) for t in scores) if ms and ns else 0.0
    return {**best, "advantage": adv}


def plan_audit(cfg, *, canaries: int | str = "auto", claim: float | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """Before training: the claim to refute, δ, the canary count, and the largest ε that count can certify.

    Raises ``AuditRefused`` for an audit that could not fail: no finite claim, or too few canaries."""
    if cfg.trainer != "lora" or cfg.task != "classify":
        raise AuditRefused(f"the audit trains LoRA adapters on a classification task: set trainer = \"lora\" and task = "
                           f"\"classify\", not {cfg.trainer!r} / {cfg.task!r}")
    private = cfg.privacy.mode == "dp-sgd"
    if private and claim is not None:
        raise AuditRefused("--claim is for runs without DP: a DP-SGD run is audited against the ε it spends "
                           "(privacy.target_epsilon)")
    if private:
        claim, source = cfg.privacy.target_epsilon, "privacy.target_epsilon"
    elif claim is None:
        raise AuditRefused("a run without DP claims no finite ε, so the audit cannot fail: give --claim EPS "
                           "(the ε to refute) or --set privacy.mode=dp-sgd")
    else:
        source = "--claim"
    if not (0 < claim < math.inf):
        raise AuditRefused(f"the claimed ε must be positive and finite, not {claim}")
    delta = cfg.privacy.delta
    fix = "a smaller privacy.target_epsilon (the same code path)" if private else "a smaller --claim"
    auto = canaries == "auto"
    if auto:
        m = canaries_needed(claim, delta, alpha, start=DEFAULT_CANARIES)
        if m is None:
            peak, at = certifiable_peak(delta, alpha)
            raise AuditRefused(f"no number of canaries can certify ε above {claim:g} at δ={delta:g} in one run (at most "
                               f"{peak:.2f}, with about {at}, every guess right): audit {fix}, or lower privacy.delta")
        if m > MAX_AUTO_CANARIES:
            raise AuditRefused(f"refuting ε = {claim:g} at δ={delta:g} needs at least {m} canaries (--canaries auto "
                               f"stops at {MAX_AUTO_CANARIES}): use --canaries {m}, or audit {fix}")
    else:
        m = int(canaries)
        if m < MIN_CANARIES:
            raise AuditRefused(f"--canaries {m} is too few to bound anything: use at least {MIN_CANARIES} (or auto)")
    top = max_certifiable_epsilon(m, delta, alpha)
    if top <= claim:
        need = canaries_needed(claim, delta, alpha)
        hint = f"use --canaries {need} (or auto)" if need else f"no count can (the 2mδ term caps it): audit {fix}"
        raise AuditRefused(f"{m} canaries certify at most ε = {top:.2f} at δ={delta:g}, not above the claimed "
                           f"ε = {claim:g}, so the audit cannot fail: {hint}")
    return {"canaries": m, "auto": auto, "claim": claim, "claim_source": source, "delta": delta, "alpha": alpha,
            "max_certifiable_epsilon": top, "private": private}


def _canary_losses(model, task, canaries, batch_size: int = 32) -> list[float]:
    out = []
    with torch.no_grad():
        for s in range(0, len(canaries), batch_size):
            out.extend(task.per_example_loss(model, task.collate(canaries[s:s + batch_size])).tolist())
    return out


def run_audit(cfg, *, canaries: int | str = "auto", claim: float | None = None, owner_index: int = 0,
              alpha: float = 0.05, canary_words: int = 3, ledger_dir: str | Path | None = None, on_round=None,
              plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train data owner ``owner_index`` (with canaries) under ``cfg``'s trainer; return the audit result.

    ``plan`` is ``plan_audit``'s answer when the caller already has it (the CLI prints it first)."""
    from fedadapt.partitions import dataset_labels, simulated_client_examples

    plan = plan or plan_audit(cfg, canaries=canaries, claim=claim, alpha=alpha)
    labels = dataset_labels(cfg)
    real = list(simulated_client_examples(cfg, cfg.federation.num_clients, owner_index))
    pool = make_canaries(plan["canaries"], len(labels), seed=cfg.seed + 7919, words=canary_words)
    member = draw_inclusion(len(pool))
    train = real + [c for c, b in zip(pool, member) if b]
    random.Random(cfg.seed).shuffle(train)

    threads_before = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)  # as a node would; restored below
    try:
        return _train_and_score(cfg, plan, labels, train, pool, member, owner_index, canary_words, ledger_dir,
                                on_round)
    finally:
        torch.set_num_threads(threads_before)


def _mean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def _train_and_score(cfg, plan, labels, train, canaries, member, owner_index, canary_words, ledger_dir,
                     on_round) -> dict[str, Any]:
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
    try:
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
    finally:
        load_adapter_state(model, initial)
        if tmp is not None:
            tmp.cleanup()

    changes = [a - b for a, b in zip(after, before)]
    # the final loss, not its change, is the score: the change adds the base model's per-canary noise
    # (measured on tiny-llama: ε lower bound 1.69 from final losses vs 1.45 from changes, same run)
    scores = label_calibrated_scores(after, [c.label for c in canaries])
    delta = last_metrics.get("dp_delta", plan["delta"])
    bound = one_run_bound(scores, member, delta, plan["alpha"])
    # a DP run is held to what its ledger charged (≤ the target); a run without DP to the user's claim
    claimed = last_metrics.get("dp_epsilon_total", plan["claim"]) if plan["private"] else plan["claim"]
    return {
        "trainer": cfg.trainer, "privacy_mode": cfg.privacy.mode, "model": cfg.model, "rounds": rounds_done,
        "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
        "n_local": len(train), "canaries": len(canaries), "members": sum(member),
        "nonmembers": len(member) - sum(member), "canary_words": canary_words,
        "claimed_epsilon": claimed, "claim_source": plan["claim_source"], "delta": delta, "alpha": plan["alpha"],
        "max_certifiable_epsilon": plan["max_certifiable_epsilon"],
        "member_loss_change_mean": _mean(c for c, b in zip(changes, member) if b),
        "nonmember_loss_change_mean": _mean(c for c, b in zip(changes, member) if not b),
        "member_score_mean": _mean(s for s, b in zip(scores, member) if b),
        "nonmember_score_mean": _mean(s for s, b in zip(scores, member) if not b),
        **bound,
        "within_claim": bound["epsilon_lower_bound"] <= claimed,
        "leak_detected": bound["epsilon_lower_bound"] > 0,
    }
