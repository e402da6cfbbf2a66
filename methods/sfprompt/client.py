"""`sfprompt`: split federated prompt tuning (SFPrompt, Cao et al. 2024) — the data owner's half.

The data owner holds the head (embeddings, the first ``head_layers`` blocks, the soft prompt) and the
tail (the last ``tail_layers`` blocks, the final norm, the label rows of the LM head); the coordinator
holds the body. A round, as in the paper:

1. local-loss updates: ``local_loss_steps`` AdamW steps of prompt + tail on head → tail directly
   (no body, no traffic), with their own optimizer (``local_prompt_lr``, ``local_tail_lr``);
2. dataset pruning: the local model (head → tail) scores every local example by EL2N
   (‖softmax − one-hot‖₂) or loss; the top ``prune_keep`` fraction is kept;
3. split training over the kept examples: smashed activations go up the gRPC stream, the body's
   output comes down, the loss is computed here, the gradient w.r.t. the body output goes up and the
   gradient w.r.t. the activations comes down to reach the prompt; a second, fresh AdamW
   (``prompt_lr``, ``tail_lr``). Tokens and labels never leave.

The update is the change of prompt and tail against the round's global state (aggregated by the
run's merger). A broken stream ends the round for this client with status "error" and a one-line
reason; the coordinator goes on without it.
"""

from __future__ import annotations

import math
import queue
import time

import grpc
import torch
import torch.nn.functional as F

from fedadapt.models import load_model
from .split_model import (
    PROMPT_KEY, SplitError, SplitModel, client_step_flops, full_finetune_step_flops,
)
from fedadapt.tasks.classify import VerbalizerTask
from fedadapt.train import batches
from protocols import split_pb2, split_pb2_grpc
from protocols.split_wire import (
    BODY_ADDRESS_KEY, BODY_CA_KEY, BODY_NAME_KEY, SPLIT_PROTOCOL_VERSION, SplitWireError, check_size,
    grpc_message_options, pack_tensors, unpack_tensors,
)

from ..base import TrainContext, TrainResult, local_generator


class BodyStreamError(RuntimeError):
    """The body service could not be reached, refused a message, or broke off mid-round."""


# ---------------------------------------------------------------------------- the gRPC stream


class BodyStream:
    """One session with the body service: ``open`` → (``forward`` → ``backward``)* → ``close``.

    Counts the serialized bytes of every message each way (gRPC's 5-byte frame prefix and HTTP/2
    overhead not included).
    """

    def __init__(self, address: str, *, max_bytes: int, timeout_s: float, ca_pem: bytes = b"", server_name: str = ""):
        self.address = address
        self.max_bytes = max_bytes
        options = grpc_message_options(max_bytes)
        if ca_pem:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._outbox: queue.Queue = queue.Queue()
        stub = split_pb2_grpc.SplitBodyStub(self._channel)
        self._replies = stub.Session(iter(self._outbox.get, None), timeout=timeout_s, wait_for_ready=False)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.session_id = ""

    def _exchange(self, msg: split_pb2.ClientMessage, expect: str) -> split_pb2.BodyMessage:
        size = msg.ByteSize()
        check_size(size, self.max_bytes, f"{msg.WhichOneof('kind')} message")
        self._outbox.put(msg)
        self.bytes_sent += size
        try:
            reply = next(self._replies)
        except StopIteration:
            raise BodyStreamError(f"the body service at {self.address} ended the session without answering") from None
        except grpc.RpcError as e:
            code = e.code().name if e.code() else "UNKNOWN"
            raise BodyStreamError(
                f"the SFPrompt body service at {self.address} is unreachable or broke off mid-round ({code}: {e.details()}); "
                "this client skips the round — check that the coordinator is running"
            ) from None
        self.bytes_received += reply.ByteSize()
        kind = reply.WhichOneof("kind")
        if kind == "error":
            raise BodyStreamError(f"the body service refused the session: {reply.error.reason}")
        if kind != expect:
            raise BodyStreamError(f"the body service answered {kind} where {expect} was due: client and body versions differ")
        return reply

    def open(self, cfg, client: str, round_no: int) -> None:
        s = cfg.sfprompt
        reply = self._exchange(split_pb2.ClientMessage(open=split_pb2.Open(
            protocol_version=SPLIT_PROTOCOL_VERSION, run_name=cfg.name, client=client, round=round_no,
            model=cfg.model, head_layers=s.head_layers, tail_layers=s.tail_layers, prompt_tokens=s.prompt_tokens,
        )), "opened")
        self.session_id = reply.opened.session_id

    def forward(self, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        payload = pack_tensors({"hidden": hidden, "attention_mask": attention_mask})
        reply = self._exchange(split_pb2.ClientMessage(forward=split_pb2.Forward(step=step, tensors=payload)), "output")
        out = self._unpack(reply.output.tensors, "hidden")
        if out.shape != hidden.shape:
            raise BodyStreamError(f"the body returned activations of shape {tuple(out.shape)} for {tuple(hidden.shape)}")
        return out

    def backward(self, step: int, grad: torch.Tensor) -> torch.Tensor:
        reply = self._exchange(split_pb2.ClientMessage(backward=split_pb2.Backward(
            step=step, tensors=pack_tensors({"grad": grad}))), "grad")
        return self._unpack(reply.grad.tensors, "grad")

    def close(self) -> split_pb2.Closed:
        return self._exchange(split_pb2.ClientMessage(close=split_pb2.Close()), "closed").closed

    def _unpack(self, payload: bytes, name: str) -> torch.Tensor:
        try:
            return unpack_tensors(payload, ranks={name: 3}, max_bytes=self.max_bytes)[name]
        except SplitWireError as e:
            raise BodyStreamError(str(e)) from None

    def shutdown(self) -> None:
        self._outbox.put(None)
        self._replies.cancel()
        self._channel.close()


# ---------------------------------------------------------------------------- pruning


def example_scores(split: SplitModel, task: VerbalizerTask, prompt: torch.Tensor, examples, *, score: str,
                   batch_size: int) -> torch.Tensor:
    """Score every example with the local model (head → tail, no body): EL2N or cross-entropy."""
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            inputs, labels = task.batch(examples[start : start + batch_size])
            logits = split.label_logits(inputs["input_ids"], inputs["attention_mask"], prompt, task.label_token_ids,
                                        skip_body=True)
            out.append(score_logits(logits, labels, score))
    return torch.cat(out)


def score_logits(logits: torch.Tensor, labels: torch.Tensor, score: str) -> torch.Tensor:
    if score == "el2n":  # Paul et al. 2021: error L2 norm, high = hard / informative
        onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return (logits.softmax(-1) - onehot).norm(dim=-1)
    if score == "loss":
        return F.cross_entropy(logits, labels, reduction="none")
    raise ValueError(f"unknown sfprompt.prune_score {score!r}: choose el2n or loss")


def prune_indices(scores: torch.Tensor, keep: float, labels: list[int] | None = None) -> list[int]:
    """Indices of the ceil(keep · n) highest-scoring examples (ties broken by position), in order; with
    ``labels``, the top fraction *within each label*. Over all examples, a near-constant local model's EL2N
    is a label filter (it keeps the class it gets wrong): round 1 kept 9% positives of an owner holding 55%,
    and the merged model then predicted one class almost everywhere.

    Per label the quotas add up to the same ceil(keep · n) (largest remainders, ties to the label seen
    first): rounding up within each label would keep more than asked and could cost a whole extra split
    step (64 examples at keep 0.5 = 2 batches of 16, but 27 + 37 rounded up per label = 33 = 3 batches)."""
    n = scores.numel()
    k = min(n, max(1, math.ceil(keep * n)))
    if labels is None:
        return _top(scores, k)
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    exact = {y: k * len(idx) / n for y, idx in groups.items()}
    quota = {y: math.floor(q) for y, q in exact.items()}
    for y in sorted(groups, key=lambda y: -(exact[y] - quota[y]))[: k - sum(quota.values())]:
        quota[y] += 1  # sorted() is stable: ties go to the label seen first
    out: list[int] = []
    for y, idx in groups.items():
        out += [idx[j] for j in _top(scores[idx], quota[y])]
    return sorted(out)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())


# ---------------------------------------------------------------------------- the trainer


def phase_optimizers(prompt: torch.nn.Parameter, tail: list[torch.nn.Parameter], s, weight_decay: float):
    """(local-loss AdamW, split AdamW): one optimizer per phase, each with its own learning rates and its
    own moments. The local-loss phase's gradients come from head → tail with the body skipped, a different
    model than the split phase's; sharing one AdamW carried its moments (and its step sizes) into the split
    phase. Prompts want a far larger step than pretrained weights (Lester et al. 2021): two groups each.
    The local optimizer is None when ``local_loss_steps`` is 0."""

    def make(prompt_lr: float, tail_lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW([
            {"params": [prompt], "lr": prompt_lr, "weight_decay": 0.0},
            {"params": tail, "lr": tail_lr, "weight_decay": weight_decay},
        ])

    local = make(s.local_prompt_lr, s.local_tail_lr) if s.local_loss_steps else None
    return local, make(s.prompt_lr, s.tail_lr)


_SPLITS: dict[tuple, tuple[SplitModel, object]] = {}


def split_model_for(cfg) -> tuple[SplitModel, object]:
    """(SplitModel, tokenizer) for this run's model and split, built once per process."""
    s = cfg.sfprompt
    key = (cfg.model, cfg.seed, s.head_layers, s.tail_layers)
    if key not in _SPLITS:
        model, tok, _ = load_model(cfg.model, seed=cfg.seed)
        _SPLITS[key] = (SplitModel(model, s.head_layers, s.tail_layers), tok)
    return _SPLITS[key]


def train(ctx: TrainContext) -> TrainResult:
    cfg, s = ctx.cfg, ctx.cfg.sfprompt
    address = str(ctx.extra.get(BODY_ADDRESS_KEY, ""))
    if not address:
        return TrainResult(update={}, num_examples=0, status="error",
                           reason="the round instruction names no SFPrompt body service: run the coordinator with trainer = \"sfprompt\"")
    missing = {PROMPT_KEY} - set(ctx.global_state)
    if missing:
        return TrainResult(update={}, num_examples=0, status="error",
                           reason="the global state has no soft prompt: the coordinator runs another trainer than sfprompt")
    try:
        split, tok = split_model_for(cfg)
        task = VerbalizerTask.from_config(tok, ctx.labels, cfg.data)
        split.freeze_all_but_tail()
        split.load_tail_state(ctx.global_state)
    except SplitError as e:
        return TrainResult(update={}, num_examples=0, status="error", reason=str(e))
    prompt = torch.nn.Parameter(ctx.global_state[PROMPT_KEY].clone().float())
    tail = split.tail_parameters()
    local_opt, split_opt = phase_optimizers(prompt, list(tail.values()), s, cfg.train.weight_decay)
    gen = local_generator(ctx)
    bs = cfg.train.batch_size
    n_labels = len(task.label_token_ids)
    flops = {"client": 0, "full": 0, "full_epoch": 0}
    t0 = time.perf_counter()

    def count(inputs, *, train: bool) -> None:
        parts = split.flops(inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + s.prompt_tokens, n_labels)
        if train:
            flops["client"] += client_step_flops(parts)
            flops["full"] += full_finetune_step_flops(parts)
        else:  # a scoring pass: head and tail forward only
            flops["client"] += parts["head"] + parts["tail"]

    # 1. local-loss updates: head → tail, no body, no traffic
    local_losses = []
    for chunk in batches(ctx.examples, bs, s.local_loss_steps, gen) if s.local_loss_steps else ():
        inputs, labels = task.batch(chunk)
        logits = split.label_logits(inputs["input_ids"], inputs["attention_mask"], prompt, task.label_token_ids,
                                    skip_body=True)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        local_opt.step()
        local_opt.zero_grad(set_to_none=True)
        local_losses.append(loss.item())
        count(inputs, train=True)

    # the yardstick: fine-tuning the whole model for one epoch over all local examples
    for start in range(0, len(ctx.examples), bs):
        inputs = task.encode([e.text for e in ctx.examples[start : start + bs]])
        parts = split.flops(inputs["input_ids"].shape[0], inputs["input_ids"].shape[1], n_labels)
        flops["full_epoch"] += full_finetune_step_flops(parts)

    # 2. pruning with the (just updated) local model
    if s.prune_keep < 1.0:
        scores = example_scores(split, task, prompt.detach(), ctx.examples, score=s.prune_score, batch_size=cfg.train.eval_batch_size)
        for start in range(0, len(ctx.examples), cfg.train.eval_batch_size):
            count(task.encode([e.text for e in ctx.examples[start : start + cfg.train.eval_batch_size]]), train=False)
        kept = [ctx.examples[i] for i in prune_indices(scores, s.prune_keep, [e.label for e in ctx.examples])]
    else:
        kept = list(ctx.examples)

    # 3. split training through the body service
    split_steps = max(1, math.ceil(len(kept) * s.split_epochs / bs))
    if s.max_split_steps:
        split_steps = min(split_steps, s.max_split_steps)
    stream = BodyStream(
        address, max_bytes=s.max_message_mb * 1024 * 1024, timeout_s=cfg.federation.round_timeout_s,
        ca_pem=str(ctx.extra.get(BODY_CA_KEY, "")).encode(), server_name=str(ctx.extra.get(BODY_NAME_KEY, "")),
    )
    losses, correct, seen = [], 0, 0
    try:
        stream.open(cfg, ctx.client_name, ctx.round)
        for step, chunk in enumerate(batches(kept, bs, split_steps, gen), 1):
            inputs, labels = task.batch(chunk)
            smashed, mask = split.head(inputs["input_ids"], inputs["attention_mask"], prompt)
            body_out = stream.forward(step, smashed, mask).requires_grad_(True)
            logits = split.tail_label_logits(body_out, mask, task.label_token_ids)
            loss = F.cross_entropy(logits, labels)
            loss.backward()  # tail weight grads, and d loss / d body output
            smashed.backward(stream.backward(step, body_out.grad))  # through the head to the prompt
            split_opt.step()
            split_opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(chunk)
            count(inputs, train=True)
            if ctx.on_step:
                ctx.on_step(step, losses[-1])
        closed = stream.close()
    except (BodyStreamError, SplitWireError) as e:
        return TrainResult(update={}, num_examples=0, status="error", reason=str(e),
                           metrics={"split_bytes_up": float(stream.bytes_sent), "split_bytes_down": float(stream.bytes_received)})
    finally:
        stream.shutdown()

    update = {PROMPT_KEY: prompt.detach() - ctx.global_state[PROMPT_KEY]}
    update.update({k: p.detach() - ctx.global_state[k] for k, p in tail.items()})
    return TrainResult(
        update=update,
        num_examples=len(ctx.examples),
        metrics={
            "train_loss": sum(losses) / len(losses),
            "train_accuracy": correct / max(seen, 1),
            "local_loss": sum(local_losses) / len(local_losses) if local_losses else 0.0,
            "local_loss_steps": float(len(local_losses)),
            "kept_examples": float(len(kept)),
            "split_steps": float(len(losses)),
            "split_bytes_up": float(stream.bytes_sent),
            "split_bytes_down": float(stream.bytes_received),
            "body_bytes_received": float(closed.bytes_received),
            "body_bytes_sent": float(closed.bytes_sent),
            "client_flops": float(flops["client"]),
            "full_finetune_flops": float(flops["full"]),
            "client_flops_ratio": flops["client"] / max(flops["full"], 1),
            "full_finetune_epoch_flops": float(flops["full_epoch"]),
            "client_flops_epoch_ratio": flops["client"] / max(flops["full_epoch"], 1),
            "train_seconds": time.perf_counter() - t0,
        },
        extra={"body_session": stream.session_id},
    )
