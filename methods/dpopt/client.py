"""`dpopt`: DP-OPT (Hong et al., ICLR 2024) on a data owner: private discrete prompts, only text leaves.

Each of ``num_prompts`` candidate instructions is written token by token by an **ensemble** of
``ensemble_size`` copies of the local LLM, each reading a different, disjoint set of ``shots`` private
demonstrations in a meta-prompt ("...Here are the input-output pairs: ... The instruction was to").
At each step every member votes for its most likely next token (one batched forward for all members,
with a KV cache); the vote histogram goes through the limited-domain top-1 mechanism (or the
exponential mechanism over the vocabulary); the chosen token is appended for every member.

Privacy unit: one training record of this data owner (add/remove). Each record is assigned, on its
own (a keyed hash of the record), to at most one (prompt, member) slot, or to the local validation
bucket used by private selection. So one record changes one vote of one prompt per token: the
prompts are generated on disjoint data (parallel composition), and the data owner's ε is the
composition of ``max_new_tokens`` token choices (``privacy.mechanisms.limited_domain``). Private
selection runs on the disjoint validation bucket (its own ε, parallel again), so the total is the
larger of the two. The ε is charged to the data owner's ledger before any text is returned.

Every member of every prompt votes, with or without demonstrations (an empty slot reads the public
meta-prompt alone), so a prompt is never skipped for lack of data: skipping would release "" with
certainty on one dataset and generated text on its neighbour, at no charge. Every release is charged a
positive (ε, δ) (``TokenAccountant``'s floor). The noise comes from OS entropy (``generator=None``); the
run seed only keys the public slot assignment. Only the prompts and their ε/δ leave the node: the merge
weight is the constant 1 and the statistics (token choices, failures, timings) stay in the local log and
the ledger note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from fedadapt.data import Example
from fedadapt.progress import step_bar
from .prompts import score_prompts
from privacy.mechanisms.exponential import exponential_over_domain, exponential_top1
from privacy.mechanisms.limited_domain import TokenAccountant, limited_domain_top1, vote_histogram

from ..base import TrainContext, TrainerRefused, TrainResult

log = logging.getLogger("fedadapt.client")

META_HEAD = (
    "I gave a friend an instruction and some inputs. The friend read the instruction and wrote an output "
    "for every one of the inputs. Here are the input-output pairs:\n\n"
)
META_DEMO = "Input: {text}\nOutput: {label}\n\n"
META_TAIL = "The instruction was to"


@dataclass
class GeneratedPrompts:
    prompts: list[str]  # finished instructions (may be "" when the first token already failed)
    epsilon: float  # spent on generation (the composed token choices), at ``delta``
    delta: float
    step_epsilon: float
    token_choices: int  # private token choices made (limited-domain + exponential fallbacks)
    failures: int  # limited-domain calls that returned "no token"
    budget_stopped: bool  # generation stopped because one more choice would exceed the budget
    members: list[int] = field(default_factory=list)  # members with demonstrations, per prompt (local only)
    seconds: float = 0.0
    forwards: int = 0
    retries: int = 0  # per-token retries (each one a charged call)
    sampling_rate: float = 1.0  # the per-call Poisson rate ("per-token"); 1.0 for "fixed"
    delta0: float = 0.0


def _record_key(seed_text: str, ex: Example, salt: str) -> int:
    h = hashlib.blake2b(f"{seed_text}\x00{salt}\x00{ex.label}\x00{ex.text}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def assign_slots(examples: list[Example], num_slots: int, shots: int, seed_text: str,
                 validation_fraction: float = 0.0) -> tuple[list[list[Example]], list[Example]]:
    """Per-record assignment: each record, on its own, goes to one slot or to the validation bucket.

    A keyed hash of the record picks its bucket and its priority inside the slot; a slot keeps its
    ``shots`` highest-priority records. Adding or removing a record therefore changes at most one
    slot's demonstrations (or the validation bucket), which is what the mechanism's sensitivity needs.
    """
    slots: list[list[tuple[int, Example]]] = [[] for _ in range(num_slots)]
    validation: list[Example] = []
    for ex in examples:
        u = _record_key(seed_text, ex, "bucket") / 2.0**64
        if u < validation_fraction:
            validation.append(ex)
            continue
        v = (u - validation_fraction) / (1.0 - validation_fraction)
        slot = min(int(v * num_slots), num_slots - 1)
        slots[slot].append((_record_key(seed_text, ex, "priority"), ex))
    chosen = [[ex for _, ex in sorted(s, key=lambda kv: kv[0])[:shots]] for s in slots]
    return chosen, validation


def meta_prompt(demos: list[Example], labels: list[str], max_chars: int) -> str:
    body = "".join(META_DEMO.format(text=d.text.strip()[:max_chars], label=labels[d.label]) for d in demos)
    return META_HEAD + body + META_TAIL


def _is_stop(tok, token_id: int) -> bool:
    if token_id in {tok.eos_token_id, tok.pad_token_id} or token_id in set(tok.all_special_ids):
        return True
    return "\n" in tok.decode([token_id])


@torch.no_grad()
def generate_prompts(model, tok, examples: list[Example], labels: list[str], dp_cfg, *, seed_text: str,
                     progress=None, generator: torch.Generator | None = None, data_cfg=None,
                     pred_cache: dict | None = None) -> tuple[GeneratedPrompts, list[Example]]:
    """DP-OPT generation on one data owner's ``examples``. Returns the prompts and the validation bucket.

    ``progress(n)`` is called once per token step (``num_prompts * max_new_tokens`` in all, at most).
    ``generator``: None (OS entropy) for every private run; a seeded one only in tests and benchmarks.
    ``dp_cfg.demos = "per-token"`` (the default) runs ``pertoken.generate_per_token`` on the records outside
    the validation bucket; ``"fixed"`` the slot assignment below.
    """
    t0 = time.perf_counter()
    P, E = dp_cfg.num_prompts, dp_cfg.ensemble_size
    val_frac = dp_cfg.validation_fraction if dp_cfg.selection == "private" else 0.0
    if dp_cfg.demos == "per-token":
        from .pertoken import generate_per_token

        _, validation = assign_slots(examples, 1, 1, seed_text, val_frac)
        held = {id(ex) for ex in validation}
        pool = [ex for ex in examples if id(ex) not in held]
        return generate_per_token(model, tok, pool, labels, dp_cfg, data_cfg=data_cfg, progress=progress,
                                  generator=generator, pred_cache=pred_cache), validation
    slots, validation = assign_slots(examples, P * E, dp_cfg.shots, seed_text, val_frac)
    acct = TokenAccountant.calibrated(dp_cfg.epsilon, dp_cfg.delta, dp_cfg.max_new_tokens,
                                      step_epsilon=dp_cfg.step_epsilon)
    # prompts use disjoint records, so the accountant counts the token choices of the longest prompt
    per_prompt: list[TokenAccountant] = []
    vocab = int(model.get_output_embeddings().weight.shape[0])
    prompts, members, failures, forwards, budget_stopped = [], [], 0, 0, False
    for p in range(P):
        acc_p = TokenAccountant(acct.step_epsilon, acct.delta0, acct.target_epsilon, acct.target_delta)
        per_prompt.append(acc_p)
        # every member votes, an empty slot included (one record changes one vote; see the module notes)
        demo_sets = slots[p * E:(p + 1) * E]
        members.append(sum(1 for d in demo_sets if d))
        texts = [meta_prompt(d, labels, dp_cfg.max_demo_chars) for d in demo_sets]
        rows = [tok(t)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every member's next token is at position -1
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        forwards += 1
        cache, next_pos = out.past_key_values, positions[:, -1:] + 1
        logits = out.logits[:, -1]
        chosen: list[int] = []
        steps_done = 0
        for _step in range(dp_cfg.max_new_tokens):
            votes = logits.argmax(-1)
            tokens, counts = vote_histogram(votes)
            kind = "limited-domain" if dp_cfg.mechanism == "limited-domain" else "exponential"
            if not acc_p.allows(kind):
                budget_stopped = True
                break
            acc_p.record(kind)
            steps_done += 1
            if kind == "limited-domain":
                token = limited_domain_top1(tokens, counts, epsilon=acct.step_epsilon, delta0=acct.delta0,
                                            k_bar=dp_cfg.k_bar, domain_size=vocab, generator=generator)
                if token is None:
                    failures += 1
                    if dp_cfg.on_failure == "stop" or not acc_p.allows("exponential"):
                        break
                    acc_p.record("exponential")
                    token = exponential_over_domain(tokens, counts, vocab, acct.step_epsilon, generator)
            else:
                token = (int(tokens[0]) if math.isinf(acct.step_epsilon)
                         else exponential_over_domain(tokens, counts, vocab, acct.step_epsilon, generator))
            if progress:
                progress(1)
            if _is_stop(tok, token):
                break
            chosen.append(token)
            step_ids = torch.full((len(rows), 1), token, dtype=torch.long)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            forwards += 1
            cache, next_pos = out.past_key_values, next_pos + 1
            logits = out.logits[:, -1]
        if progress and steps_done < dp_cfg.max_new_tokens:
            progress(dp_cfg.max_new_tokens - steps_done)
        prompts.append(clean_instruction(tok.decode(chosen)))
        if budget_stopped:
            prompts.extend([""] * (P - p - 1))
            members.extend([0] * (P - p - 1))
            break
    # parallel composition over prompts: the owner's cost is the most expensive prompt's
    worst = max(per_prompt, key=lambda a: (a.limited_domain_steps + a.exponential_steps, a.limited_domain_steps))
    eps, delta = worst.spent()
    return GeneratedPrompts(
        prompts=prompts, epsilon=eps, delta=delta, step_epsilon=acct.step_epsilon,
        token_choices=sum(a.limited_domain_steps + a.exponential_steps for a in per_prompt), failures=failures,
        budget_stopped=budget_stopped, members=members, seconds=time.perf_counter() - t0, forwards=forwards,
    ), validation


def clean_instruction(text: str) -> str:
    """The continuation of "The instruction was to" as a stand-alone instruction sentence."""
    text = " ".join(text.split())
    if not text:
        return ""
    return text[0].upper() + text[1:]


def private_select(correct: list[int], epsilon: float, generator: torch.Generator | None = None) -> int:
    """Exponential mechanism over validation accuracies (monotone counts, sensitivity 1): ε-DP, OS noise."""
    return exponential_top1(torch.tensor(correct, dtype=torch.float64), epsilon, generator)


# ------------------------------------------------------------------------------------------- trainer

_MODEL_CACHE: dict[tuple[str, int], tuple] = {}


def _model(name: str, seed: int):
    if (name, seed) not in _MODEL_CACHE:
        from fedadapt.models import load_model

        model, tok, _ = load_model(name, seed=seed)
        _MODEL_CACHE[(name, seed)] = (model, tok)
    return _MODEL_CACHE[(name, seed)]


def _open_ledger(ctx: TrainContext):
    from privacy.ledger import LedgerError, PrivacyLedger

    if ctx.ledger_dir is None:
        raise TrainerRefused("DP-OPT needs a privacy ledger directory on the data owner (node config ledger-dir)")
    dp = ctx.cfg.dpopt
    # a deployed owner's own lifetime budget (client join --epsilon-budget); a simulated one: the run's
    owner_budget = getattr(ctx, "owner_budget", None)
    eps_budget, delta_budget = owner_budget if owner_budget is not None else (dp.epsilon, dp.delta)
    if dp.epsilon > eps_budget or dp.delta > delta_budget:
        raise TrainerRefused(
            f"{ctx.client_name}: the run asks dpopt.epsilon={dp.epsilon:g}, delta={dp.delta:g}, above this data "
            f"owner's budget (ε={eps_budget:g}, δ={delta_budget:g}): the coordinator must lower them"
        )
    try:
        return PrivacyLedger.open(ctx.ledger_dir, ctx.client_name, epsilon_budget=eps_budget, delta=delta_budget,
                                  accountant=ctx.cfg.privacy.accountant)
    except LedgerError as e:
        raise TrainerRefused(str(e)) from None


def round_budget(ctx: TrainContext, ledger) -> tuple[float, float]:
    """(ε, δ) this round may spend: what is left of the run's (dpopt.epsilon, dpopt.delta) and of the ledger.

    ε: all that is left (generation is calibrated to it). δ: the rest split evenly over the run's remaining
    rounds (a public schedule), and at most half the ledger's rest when Gaussian events (DP-SGD) need δ_g > 0.
    """
    dp = ctx.cfg.dpopt
    mine = [e for e in ledger.entries if e["mechanism"].startswith("dpopt/")
            and e.get("note", {}).get("run", ctx.cfg.name) == ctx.cfg.name]
    run_eps = sum(e["epsilon_round"] for e in mine)
    run_delta = sum(a[1] for e in mine for a in e.get("approx", []))
    ledger_delta = ledger.remaining_delta()
    if any(e.get("gaussian") for e in ledger.entries):
        ledger_delta /= 2
    rounds_left = max(1, ctx.cfg.rounds - ctx.round + 1)
    eps = min(dp.epsilon - run_eps, ledger.remaining())
    delta = min(dp.delta - run_delta, ledger_delta) / rounds_left
    return max(eps, 0.0), max(delta, 0.0)


def train(ctx: TrainContext) -> TrainResult:
    from privacy.ledger import BudgetExceeded

    cfg, dp = ctx.cfg, ctx.cfg.dpopt
    ledger = _open_ledger(ctx)
    eps_left, delta_left = round_budget(ctx, ledger)
    if eps_left <= 1e-9 or delta_left <= 0:
        spent_eps, spent_delta = ledger.spent()
        raise TrainerRefused(
            f"{ctx.client_name} has spent its DP-OPT budget (ε={spent_eps:.4g}, δ={spent_delta:.3g} of "
            f"ε={dp.epsilon:g}, δ={dp.delta:g}): no more prompts; raise dpopt.epsilon/delta with a new ledger "
            "directory or stop this data owner"
        )
    round_dp = dp.model_copy(update={"epsilon": min(dp.epsilon, eps_left), "delta": min(dp.delta, delta_left)})
    model, tok = _model(cfg.model, cfg.seed)
    # the run seed keys only the public slot assignment; every noise draw comes from OS entropy
    seed_text = f"{cfg.seed}/{ctx.round}/{ctx.client_name}"
    bar, advance = step_bar(dp.num_prompts * dp.max_new_tokens, f"DP-OPT {ctx.client_name}: tokens")
    try:
        with bar:
            result, validation = generate_prompts(model, tok, ctx.examples, ctx.labels, round_dp, seed_text=seed_text,
                                                  progress=advance, data_cfg=cfg.data)
    except ValueError as e:  # e.g. a remaining budget too small for even one token choice
        raise TrainerRefused(f"{ctx.client_name}: {e}") from None
    if result.token_choices == 0:  # data-independent: the first choice never fitted
        raise TrainerRefused(f"{ctx.client_name}: not one private token choice fits the round's budget "
                             f"(ε={round_dp.epsilon:.4g}, δ={round_dp.delta:.3g}); raise dpopt.epsilon")
    released = list(result.prompts)
    epsilon, delta = result.epsilon, result.delta
    note: dict = {"run": cfg.name, "selection": dp.selection, "prompts": len(released),
                  "token_choices": result.token_choices, "step_epsilon": result.step_epsilon,
                  "ld_failures": result.failures, "budget_stopped": result.budget_stopped,
                  "members_with_demos": result.members, "round_epsilon": round_dp.epsilon,
                  "round_delta": round_dp.delta, "demos": dp.demos, "retries": result.retries,
                  "sampling_rate": result.sampling_rate, "delta0": result.delta0}
    if dp.selection == "private":
        if "" not in released:  # the empty instruction (zero-shot) is a candidate: a pick is never worse on the bucket
            released.append("")
        if validation:
            correct = score_prompts(model, tok, released, validation, ctx.labels, cfg.data,
                                    batch_size=cfg.train.eval_batch_size)
        else:  # all scores 0: a uniform, still private, pick (a refusal would tell the coordinator n is small)
            log.warning("%s round %d: no local validation rows for private selection (kept on this node); "
                        "raise dpopt.validation_fraction", ctx.client_name, ctx.round)
            correct = [0] * len(released)
        pick = private_select(correct, round_dp.epsilon)
        released = [released[pick]]
        # validation rows are disjoint from every demonstration: parallel composition, the max counts
        epsilon = max(epsilon, round_dp.epsilon)
        note.update(validation_rows=len(validation), selection_epsilon=round_dp.epsilon)
    try:  # every release is charged, and on disk BEFORE the text is returned
        entry = ledger.charge(round=ctx.round, mechanism=f"dpopt/{dp.mechanism}", approx=[(epsilon, delta)],
                              note=note)
    except BudgetExceeded as e:
        raise TrainerRefused(str(e)) from None
    log.info("%s round %d DP-OPT (kept on this node): %s", ctx.client_name, ctx.round,
             {**note, "forwards": result.forwards, "generate_seconds": round(result.seconds, 2),
              "epsilon_total": entry["epsilon_total"]})
    # only the text and its ε/δ leave; the merge weight is a public constant, never the local count
    return TrainResult(
        update={},
        num_examples=1,
        metrics={"epsilon": float(epsilon), "delta": float(delta)},
        extra={"prompts_json": json.dumps(released), "epsilon": float(epsilon), "delta": float(delta),
               "selection": dp.selection},
    )
