"""DP-OPT with a fresh Poisson sample of demonstrations for every private token choice (``demos = "per-token"``).

For each token of each candidate prompt (and for each retry of a token):

1. **Sample.** Every record of the owner's pool enters the sample independently with probability ``q``
   (``sampling_rate``, or ``ensemble_size * shots / pool``), from OS entropy. Each sampled record goes to one
   of the ``ensemble_size`` members uniformly at random, and a member keeps at most ``shots`` of its records
   (random priority). One record therefore changes at most one member's demonstrations, hence one vote.
2. **Meta-prompt.** ``backward`` (DLN-1's backward template, seeded with ``init_instruction``): the member's
   demonstrations are split into the seed instruction's successes and errors (the model's own prediction on
   each record: a function of that record alone), and the member is asked for an improved instruction.
   ``forward``: the APE-style "The instruction was to" template. The tokens chosen so far follow.
3. **Vote.** All members run as one left-padded batch (one forward per call); each samples its vote at
   ``temperature`` (Gumbel-max, OS noise). Before ``min_new_tokens`` tokens, end-of-text, special and newline
   tokens are masked (a public rule), so no prompt ends before it starts.
4. **Private choice.** ``limited_domain_top1`` at ``step_epsilon`` with ``delta0`` and ``k_bar``. On failure,
   ``on_failure = "retry"`` draws a new sample and votes again, once per token and at most ``max_retries``
   times per prompt; every retry is a call and is charged. A second failure ends the prompt.
5. **Accounting** (``privacy.mechanisms.subsampled_ld``): every call is a Poisson(q)-subsampled
   limited-domain call; calls compose over tokens, retries and prompts (they share one pool: no parallel
   composition here). Before each call the accountant checks that it still fits the round's (ε, δ).
"""

from __future__ import annotations

import copy
import math
import time

import torch

from fedadapt.data import Example
from privacy.mechanisms.exponential import exponential_over_domain, gumbel, secure_randbelow, secure_uniform
from privacy.mechanisms.limited_domain import limited_domain_top1, vote_histogram
from privacy.mechanisms.subsampled_ld import SubsampledTokenAccountant

from .prompts import default_instruction, predict_labels

BACKWARD_HEAD = (
    "A student is completing a task that requires producing a text output from a text input. The student "
    "receives an instruction that describes how to produce the output given each input. The student has made "
    "some errors. Your task is to improve the instruction such that the student can fix the errors.\n"
    "This was the instruction.\n\nInstruction: {instruction}\n\n# Student successes\n"
)
BACKWARD_SUCCESS = "Input: {text}\nCorrect Output: {label}\n\n"
BACKWARD_ERROR = "Input: {text}\nStudent Output: {pred}\nCorrect Output: {label}\n\n"
BACKWARD_TAIL = "\n# Student errors\n{errors}\nImprove the instruction to fix the student errors. {msg}\nImproved Instruction:"
BACKWARD_MESSAGES = (
    "Clarify the instruction by adding few words or a short sentence. Be concise.",
    "Improve the instruction by providing examples on how to solve the task. Be concise.",
    "Shorten the instruction by removing superfluous words or sentences.",
    "Rewrite the instruction by providing detailed information to avoid ambiguity. Be concise.",
)

_STOP_MASKS: dict[int, torch.Tensor] = {}


def stop_mask(tok, vocab: int) -> torch.Tensor:
    """Boolean (vocab,) mask of tokens that end an instruction: EOS, pad, special ids, anything with a newline."""
    key = id(tok)
    if key not in _STOP_MASKS or _STOP_MASKS[key].numel() != vocab:
        mask = torch.zeros(vocab, dtype=torch.bool)
        for i in range(min(vocab, len(tok))):
            if "\n" in tok.decode([i]):
                mask[i] = True
        for i in {tok.eos_token_id, tok.pad_token_id, *tok.all_special_ids}:
            if i is not None and 0 <= i < vocab:
                mask[i] = True
        if len(tok) < vocab:  # ids past the tokenizer are padding rows of the embedding: never voted for
            mask[len(tok):] = True
        _STOP_MASKS[key] = mask
    return _STOP_MASKS[key]


def _uniform(n: int, generator: torch.Generator | None) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    return secure_uniform((n,)) if generator is None else torch.rand(n, generator=generator, dtype=torch.float64)


def poisson_members(pool_size: int, q: float, members: int, shots: int,
                    generator: torch.Generator | None = None) -> list[list[int]]:
    """A fresh Poisson(q) sample of ``range(pool_size)``, each sampled index handed to a uniform member; a
    member keeps at most ``shots`` (random priority). OS entropy unless a test passes ``generator``."""
    picked = torch.nonzero(_uniform(pool_size, generator) < q).flatten().tolist()
    who = (_uniform(len(picked), generator) * members).long().clamp(max=members - 1).tolist()
    prio = _uniform(len(picked), generator).tolist()
    out: list[list[int]] = [[] for _ in range(members)]
    for _, idx, m in sorted(zip(prio, picked, who)):
        if len(out[m]) < shots:
            out[m].append(idx)
    return out


def _cut(text: str, n: int) -> str:
    return text.strip().replace("\n", " ")[:n]


def backward_meta(instruction: str, demos: list[Example], preds: list[int], labels: list[str], max_chars: int,
                  msg: str) -> str:
    ok = "".join(BACKWARD_SUCCESS.format(text=_cut(d.text, max_chars), label=labels[d.label])
                 for d, p in zip(demos, preds) if p == d.label)
    bad = "".join(BACKWARD_ERROR.format(text=_cut(d.text, max_chars), pred=labels[p], label=labels[d.label])
                  for d, p in zip(demos, preds) if p != d.label)
    return BACKWARD_HEAD.format(instruction=instruction) + ok + BACKWARD_TAIL.format(errors=bad, msg=msg)


@torch.no_grad()
def generate_per_token(model, tok, pool: list[Example], labels: list[str], dp_cfg, *, data_cfg=None,
                       progress=None, generator: torch.Generator | None = None, pred_cache: dict | None = None):
    """Write ``num_prompts`` instructions from ``pool`` (the owner's records, the validation bucket excluded).

    Returns ``GeneratedPrompts`` (from ``client``). ``generator``: None (OS entropy) for every private run.
    ``pred_cache``: record index -> the seed instruction's prediction (kept across calls by benchmarks).
    """
    from protocols.config import DataConfig

    from .client import GeneratedPrompts, clean_instruction, meta_prompt

    t0 = time.perf_counter()
    data_cfg = data_cfg or DataConfig()
    P, E = dp_cfg.num_prompts, dp_cfg.ensemble_size
    n = len(pool)
    q = dp_cfg.sampling_rate if dp_cfg.sampling_rate > 0 else min(1.0, E * dp_cfg.shots / max(n, 1))
    delta0 = dp_cfg.resolved_delta0(dp_cfg.delta)
    kind = "limited-domain" if dp_cfg.mechanism == "limited-domain" else "exponential"
    if math.isinf(dp_cfg.epsilon):
        acct = SubsampledTokenAccountant(math.inf, delta0, q, math.inf, dp_cfg.delta)
    elif dp_cfg.step_epsilon > 0:
        acct = SubsampledTokenAccountant(dp_cfg.step_epsilon, delta0, q, dp_cfg.epsilon, dp_cfg.delta)
        if not acct.allows(kind):  # a small leftover budget: the largest per-call ε that pays for one prompt
            acct = SubsampledTokenAccountant.calibrated(dp_cfg.epsilon, dp_cfg.delta, delta0, q, dp_cfg.max_new_tokens)
    else:
        acct = SubsampledTokenAccountant.calibrated(dp_cfg.epsilon, dp_cfg.delta, delta0, q, dp_cfg.planned_calls())
    step_eps = acct.step_epsilon
    vocab = int(model.get_output_embeddings().weight.shape[0])
    stops = stop_mask(tok, vocab)
    seed = dp_cfg.init_instruction.strip() or default_instruction(labels)
    cache = pred_cache if pred_cache is not None else {}
    prompts: list[str] = []
    members_used: list[int] = []
    failures = retries = forwards = 0
    budget_stopped = False

    from .client import META_HEAD

    prefix_text = BACKWARD_HEAD.format(instruction=seed) if dp_cfg.meta_prompt == "backward" else META_HEAD
    prefix_ids = tok(prefix_text)["input_ids"]
    prefix_cache = model(input_ids=torch.tensor([prefix_ids]), use_cache=True).past_key_values

    def vote(chosen: list[int], position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        nonlocal forwards
        groups = poisson_members(n, q, E, dp_cfg.shots, generator)
        need = sorted({i for g in groups for i in g if i not in cache})
        if dp_cfg.meta_prompt == "backward" and need:
            for i, p in zip(need, predict_labels(model, tok, seed, [pool[i] for i in need], labels, data_cfg)):
                cache[i] = p
        rests = []
        for g in groups:
            demos = [pool[i] for i in g]
            if dp_cfg.meta_prompt == "backward":
                msg = BACKWARD_MESSAGES[secure_randbelow(len(BACKWARD_MESSAGES), generator)]
                text = backward_meta(seed, demos, [cache[i] for i in g], labels, dp_cfg.max_demo_chars, msg)
            else:
                text = meta_prompt(demos, labels, dp_cfg.max_demo_chars)
            assert text.startswith(prefix_text)
            rests.append(tok(text[len(prefix_text):], add_special_tokens=False)["input_ids"] + chosen)
        # the public head is computed once (prefix_cache) and shared; each member's rest is left-padded after it
        width = max(len(r) for r in rests)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rests), width), dtype=torch.long)
        for i, r in enumerate(rests):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        lp = len(prefix_ids)
        positions = lp + (mask.cumsum(-1) - 1).clamp(min=0)
        kv = copy.deepcopy(prefix_cache)
        kv.batch_repeat_interleave(len(rests))
        full_mask = torch.cat([torch.ones((len(rests), lp), dtype=torch.long), mask], dim=1)
        logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=kv,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        del kv
        forwards += 1
        if position < dp_cfg.min_new_tokens:
            logits[:, stops] = -math.inf
        if dp_cfg.temperature > 0:
            votes = (logits / dp_cfg.temperature + gumbel(logits.shape, 1.0, generator).float()).argmax(-1)
        else:
            votes = logits.argmax(-1)
        tokens, counts = vote_histogram(votes)
        return tokens, counts, sum(1 for g in groups if g)

    for _p in range(P):
        chosen: list[int] = []
        retries_left, with_demos, calls_here = dp_cfg.max_retries, 0, 0
        position = 0
        retried_here = False
        while position < dp_cfg.max_new_tokens:
            if not acct.allows(kind):
                budget_stopped = True
                break
            tokens, counts, used = vote(chosen, position)
            acct.record(kind)
            calls_here += 1
            with_demos += used
            if kind == "limited-domain":
                token = limited_domain_top1(tokens, counts, epsilon=step_eps, delta0=delta0, k_bar=dp_cfg.k_bar,
                                            domain_size=vocab, generator=generator)
                if token is None:
                    failures += 1
                    if dp_cfg.on_failure == "retry" and not retried_here and retries_left > 0:
                        retries_left -= 1
                        retries += 1
                        retried_here = True
                        continue  # a fresh sample for the same position, charged as a call
                    if dp_cfg.on_failure == "fallback" and acct.allows("exponential"):
                        acct.record("exponential")
                        token = exponential_over_domain(tokens, counts, vocab, step_eps, generator)
                    else:
                        break
            else:
                token = (int(tokens[0]) if math.isinf(step_eps)
                         else exponential_over_domain(tokens, counts, vocab, step_eps, generator))
            retried_here = False
            position += 1
            if progress:
                progress(1)
            if bool(stops[token]) if token < vocab else True:
                break
            chosen.append(token)
        if progress and position < dp_cfg.max_new_tokens:
            progress(dp_cfg.max_new_tokens - position)
        prompts.append(clean_instruction(tok.decode(chosen)))
        members_used.append(round(with_demos / max(calls_here, 1)))
        if budget_stopped:
            prompts.extend([""] * (P - len(prompts)))
            members_used.extend([0] * (P - len(members_used)))
            if progress:
                progress(dp_cfg.max_new_tokens * (P - _p - 1))
            break
    eps, delta = acct.spent()
    return GeneratedPrompts(
        prompts=prompts, epsilon=eps, delta=delta, step_epsilon=step_eps,
        token_choices=acct.limited_domain_steps + acct.exponential_steps, failures=failures,
        budget_stopped=budget_stopped, members=members_used, seconds=time.perf_counter() - t0, forwards=forwards,
        retries=retries, sampling_rate=q, delta0=delta0,
    )
