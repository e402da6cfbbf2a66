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
"""

from __future__ import annotations

import hashlib
import json
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
    members: list[int] = field(default_factory=list)  # ensemble members with demonstrations, per prompt
    seconds: float = 0.0
    forwards: int = 0


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
                     progress=None, generator: torch.Generator | None = None) -> tuple[GeneratedPrompts, list[Example]]:
    """DP-OPT generation on one data owner's ``examples``. Returns the prompts and the validation bucket.

    ``progress(n)`` is called once per token step (``num_prompts * max_new_tokens`` in all, at most).
    """
    t0 = time.perf_counter()
    P, E = dp_cfg.num_prompts, dp_cfg.ensemble_size
    val_frac = dp_cfg.validation_fraction if dp_cfg.selection == "private" else 0.0
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
        demo_sets = [s for s in slots[p * E:(p + 1) * E] if s]
        members.append(len(demo_sets))
        if not demo_sets:
            prompts.append("")
            if progress:
                progress(dp_cfg.max_new_tokens)
            continue
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


def private_select(correct: list[int], epsilon: float, generator: torch.Generator | None) -> int:
    """Exponential mechanism over validation accuracies (monotone counts, sensitivity 1): ε-DP."""
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
    try:
        # the data owner's budget for the whole run is dpopt.epsilon; each round spends what it uses
        return PrivacyLedger.open(ctx.ledger_dir, ctx.client_name, epsilon_budget=dp.epsilon, delta=dp.delta,
                                  accountant=ctx.cfg.privacy.accountant)
    except LedgerError as e:
        raise TrainerRefused(str(e)) from None


def train(ctx: TrainContext) -> TrainResult:
    from privacy.ledger import BudgetExceeded

    cfg, dp = ctx.cfg, ctx.cfg.dpopt
    ledger = _open_ledger(ctx)
    remaining = ledger.remaining()
    if remaining <= 1e-9:
        spent = ledger.spent()[0]
        raise TrainerRefused(
            f"{ctx.client_name} has spent its DP-OPT budget (ε={spent:.4g} of {dp.epsilon:g}): no more prompts; "
            "raise dpopt.epsilon with a new ledger directory or stop this data owner"
        )
    # this round may spend at most what is left of the owner's budget
    round_dp = dp.model_copy(update={"epsilon": min(dp.epsilon, remaining)})
    model, tok = _model(cfg.model, cfg.seed)
    seed_text = f"{cfg.seed}/{ctx.round}/{ctx.client_name}"
    gen = torch.Generator().manual_seed(int(hashlib.sha256(seed_text.encode()).hexdigest()[:15], 16))
    bar, advance = step_bar(dp.num_prompts * dp.max_new_tokens, f"DP-OPT {ctx.client_name}: tokens")
    try:
        with bar:
            result, validation = generate_prompts(model, tok, ctx.examples, ctx.labels, round_dp, seed_text=seed_text,
                                                  progress=advance, generator=gen)
    except ValueError as e:  # e.g. a remaining budget too small for even one token choice
        raise TrainerRefused(f"{ctx.client_name}: {e}") from None
    released = list(result.prompts)
    epsilon, delta = result.epsilon, result.delta
    note: dict = {"selection": dp.selection, "prompts": len(released), "token_choices": result.token_choices,
                  "step_epsilon": result.step_epsilon, "ld_failures": result.failures,
                  "budget_stopped": result.budget_stopped}
    if dp.selection == "private":
        if not validation:
            raise TrainerRefused(
                f"{ctx.client_name} has no local validation rows for private selection: raise "
                "dpopt.validation_fraction or use dpopt.selection = \"public\""
            )
        correct = score_prompts(model, tok, released, validation, ctx.labels, cfg.data,
                                batch_size=cfg.train.eval_batch_size)
        pick = private_select(correct, round_dp.epsilon, gen)
        released = [released[pick]]
        # validation rows are disjoint from every demonstration: parallel composition, the max counts
        epsilon = max(epsilon, round_dp.epsilon)
        note.update(validation_rows=len(validation), selection_epsilon=round_dp.epsilon)
    if epsilon > 0:
        try:  # charged and on disk BEFORE the text is returned
            ledger.charge(round=ctx.round, mechanism=f"dpopt/{dp.mechanism}", approx=[(epsilon, delta)], note=note)
        except BudgetExceeded as e:
            raise TrainerRefused(str(e)) from None
    return TrainResult(
        update={},
        num_examples=len(ctx.examples),
        metrics={
            "epsilon": float(epsilon), "delta": float(delta), "step_epsilon": float(result.step_epsilon),
            "token_choices": float(result.token_choices), "ld_failures": float(result.failures),
            "budget_stopped": float(result.budget_stopped), "generate_seconds": result.seconds,
            "forwards": float(result.forwards), "ensemble_members": float(sum(result.members) / max(len(result.members), 1)),
        },
        extra={"prompts_json": json.dumps(released), "epsilon": float(epsilon), "delta": float(delta),
               "selection": dp.selection},
    )
