"""Emulator building blocks on known inputs and a small random Llama: CKA, clustering, plans,
shared modules, forward shapes, the payload and the plug-in."""

import json

import pytest
import torch

from methods.offsite.emulators import get_emulator_builder
from methods.offsite.emulators.build import payload_tensors
from methods.offsite.emulators.crash import contiguous_clusters, medoid, plan_crash
from methods.offsite.emulators.similarity import cka_matrix, linear_cka, massive_token_mask
from methods.offsite.emulators.uniform import plan_uniform
from methods.offsite.emulator import (
    EmulatorError, EmulatorPlan, adapter_layer_state, build_emulator_model, decode_emulator, emulator_tensors,
    encode_emulator, load_adapter_layers, payload_sha256, plug_in, rename_layers, unique_decoder_params,
)


def small_llama(layers=8):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------- CKA


def test_cka_identical_and_invariant():
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 5.0 * x @ q) == pytest.approx(1.0, abs=1e-9)  # rotation and scale do not matter
    y = torch.randn(200, 12, generator=torch.Generator().manual_seed(2))
    assert linear_cka(x, y) < 0.3  # independent noise is dissimilar
    m = cka_matrix([x, x @ q, y])
    assert torch.allclose(m, m.T) and torch.allclose(torch.diag(m), torch.ones(3, dtype=m.dtype))
    assert m[0, 1] == pytest.approx(1.0, abs=1e-5) and m[0, 2] == pytest.approx(linear_cka(x, y), abs=1e-4)


def test_massive_tokens_dominate_cka_until_masked():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    a[0, 3] = b[0, 3] = 1e4  # one shared massive activation, as SmolLM2's first tokens
    assert linear_cka(a, b) > 0.99  # all-token CKA says "identical"
    keep = massive_token_mask([a, b], factor=5.0)
    assert keep.sum() == 299 and not keep[0]
    assert linear_cka(a[keep], b[keep]) < 0.3  # the other 299 tokens are unrelated


# ---------------------------------------------------------------------------- clustering and plans


def block_similarity(sizes):
    n = sum(sizes)
    s = torch.full((n, n), 0.2, dtype=torch.float64)
    i = 0
    for k in sizes:
        s[i : i + k, i : i + k] = 0.9
        i += k
    s.fill_diagonal_(1.0)
    return s


def layer_similarity_map(n, bottom, sizes):
    """An n x n layer map whose middle layers (from ``bottom``) form the given blocks."""
    s = torch.eye(n, dtype=torch.float64)
    m = sum(sizes)
    s[bottom : bottom + m, bottom : bottom + m] = block_similarity(sizes)
    return s


def test_clusters_are_contiguous_and_recover_blocks():
    s = block_similarity([3, 5, 2])
    groups = contiguous_clusters(s, 3)
    assert groups == [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9]]
    for k in range(1, 11):
        g = contiguous_clusters(torch.rand(10, 10, generator=torch.Generator().manual_seed(k)), k)
        assert len(g) == k and [i for grp in g for i in grp] == list(range(10))  # contiguous cover, in order
    with pytest.raises(EmulatorError, match="keep"):
        contiguous_clusters(s, 11)


def test_crash_plan_shares_medoids_and_uniform_drops():
    s = layer_similarity_map(12, 2, [3, 5])  # 12 layers: adapters 0-1 and 10-11, middle 2-9
    plan = plan_crash(12, 2, 2, 2, similarity=s, share=True)
    assert plan.clusters == [[2, 3, 4], [5, 6, 7, 8, 9]] and plan.depth == 12
    assert len(plan.unique_middle) == 2 and plan.middle_sources[:3] == [plan.middle_sources[0]] * 3
    removed = plan_crash(12, 2, 2, 2, similarity=s, share=False)
    assert removed.depth == 6 and removed.middle_sources == plan.unique_middle
    with pytest.raises(EmulatorError, match="one row per layer"):
        plan_crash(12, 2, 2, 2, similarity=torch.eye(8))
    assert medoid(s, [0, 1, 2]) in (0, 1, 2)
    uni = plan_uniform(30, 2, 2, 8)
    assert uni.depth == 12 and len(uni.unique_middle) == 8 and all(2 <= i < 28 for i in uni.middle_sources)
    assert [i for c in uni.clusters for i in c] == list(range(2, 28))
    assert get_emulator_builder("uniform") is plan_uniform
    with pytest.raises(EmulatorError, match="choose one of"):
        get_emulator_builder("nope")
    with pytest.raises(EmulatorError, match="adapter_layers"):
        plan_uniform(4, 2, 2, 1)


# ---------------------------------------------------------------------------- the emulator model


def test_emulator_shares_modules_and_runs():
    full = small_llama(8)
    plan = plan_crash(8, 2, 2, 2, similarity=layer_similarity_map(8, 2, [2, 2]), share=True)
    emu = build_emulator_model(emulator_tensors(full, plan, include_adapters=True), plan, full.config.to_dict())
    layers = emu.model.layers
    assert len(layers) == 8 and emu.config.num_hidden_layers == 8
    assert layers[2] is layers[3] and layers[4] is layers[5] and layers[2] is not layers[4]
    assert layers[2].mlp.up_proj.weight is layers[3].mlp.up_proj.weight  # the same tensor object
    assert unique_decoder_params(emu) == unique_decoder_params(full) * 6 // 8
    src = plan.middle_sources[0]
    assert torch.equal(layers[2].mlp.up_proj.weight, full.model.layers[src].mlp.up_proj.weight)
    ids = torch.randint(0, 64, (3, 7))
    out = emu(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert out.logits.shape == (3, 7, 64) and torch.isfinite(out.logits).all()
    # an emulator built from all middle layers, unshared, is the full model
    ident = EmulatorPlan("uniform", 8, 2, 2, [2, 3, 4, 5])
    emu_id = build_emulator_model(emulator_tensors(full, ident, include_adapters=True), ident, full.config.to_dict())
    ref = full(input_ids=ids, use_cache=False).logits
    assert torch.allclose(emu_id(input_ids=ids, use_cache=False).logits, ref, atol=1e-5)


def test_payload_round_trip_and_tamper_detection():
    full = small_llama(8)
    plan = plan_uniform(8, 2, 2, 2)
    payload = encode_emulator(emulator_tensors(full, plan, include_adapters=False), plan, full.config.to_dict())
    sha = payload_sha256(payload)
    tensors, plan2, config = decode_emulator(payload, expected_sha256=sha)
    assert plan2 == plan and config["num_hidden_layers"] == 8
    layers_sent = {int(k.split(".")[1]) for k in tensors if k.startswith("middle.")}
    assert layers_sent == set(plan.unique_middle) and not any(k.startswith("model.layers.") for k in tensors)
    bad = bytearray(payload)
    bad[-1] ^= 1
    with pytest.raises(EmulatorError, match="SHA-256"):
        decode_emulator(bytes(bad), expected_sha256=sha)
    with pytest.raises(EmulatorError, match="safetensors"):
        decode_emulator(b"garbage-bytes-not-a-payload")


def test_plug_in_round_trip():
    full = small_llama(8)
    plan = plan_crash(8, 2, 2, 2, similarity=layer_similarity_map(8, 2, [2, 2]), share=True)
    emu = build_emulator_model(emulator_tensors(full, plan, include_adapters=True), plan, full.config.to_dict())
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in adapter_layer_state(emu, plan, on="emulator").items()}
    assert {int(k.split(".")[2]) for k in trained} == {0, 1, 6, 7}  # full-model indices
    load_adapter_layers(emu, plan, trained, on="emulator")
    back = adapter_layer_state(emu, plan, on="emulator")
    before = {k: v.clone() for k, v in full.state_dict().items()}
    merged = plug_in(full.state_dict(), back)
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())  # pure: the input is untouched
    full.load_state_dict(merged)
    assert all(torch.equal(v, trained[k]) for k, v in adapter_layer_state(full, plan, on="full").items())
    assert torch.equal(full.model.layers[3].mlp.up_proj.weight, before["model.layers.3.mlp.up_proj.weight"])
    with pytest.raises(EmulatorError, match="no place"):
        plug_in(full.state_dict(), {"model.layers.99.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(EmulatorError, match="shape"):
        plug_in(full.state_dict(), {"model.layers.0.mlp.up_proj.weight": torch.zeros(1)})
    assert set(rename_layers({"a.layers.7.w": 1}, plan.emulator_index)) == {"a.layers.7.w"}


def test_payload_tensors_reflect_distilled_weights():
    full = small_llama(8)
    plan = plan_crash(8, 2, 2, 2, similarity=layer_similarity_map(8, 2, [2, 2]), share=True)
    emu = build_emulator_model(emulator_tensors(full, plan, include_adapters=True), plan, full.config.to_dict())
    with torch.no_grad():
        emu.model.layers[2].mlp.up_proj.weight.add_(1.0)
    t = payload_tensors(emu, plan, include_adapters=False)
    src = plan.middle_sources[0]
    assert torch.equal(t[f"middle.{src}.mlp.up_proj.weight"], full.model.layers[src].mlp.up_proj.weight + 1.0)


def test_emulator_build_command(tmp_path, data_root, capsys):
    from coordinator.cli import main

    out = tmp_path / "emu"
    args = ["emulator", "build", "--model", "tiny-llama", "--method", "crash", "--adapter-layers", "1,1", "--keep", "1",
            "--calibration", "vader_sentiment/nyt_editorials", "--calibration-examples", "8", "--distill-steps", "2",
            "--distill-examples", "24"]
    assert main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unique decoder params" in printed and "75.00%" in printed and "distillation: loss" in printed
    assert {p.name for p in out.iterdir()} >= {"emulator.safetensors", "emulator.json", "similarity.png"}
    report = json.loads((out / "emulator.json").read_text())
    assert report["distill_texts"] == 24  # distillation cycles over its own, larger public text set
    assert len(report["similarity"]["robust"]) == 4 and report["plan"]["middle_sources"] == [report["plan"]["middle_sources"][0]] * 2
    assert (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert main(args[:-8] + ["--keep", "5", "--out", str(tmp_path / "bad")]) == 2  # 5 of 2 middle layers
    assert "offsite.keep must be between 1 and 2" in capsys.readouterr().err


def test_emulator_copies_live_weights_unless_it_owns_them():
    from methods.offsite.emulator import decode_emulator, encode_emulator

    full = small_llama(8)
    plan = plan_uniform(8, 2, 2, 2)
    tensors = emulator_tensors(full, plan, include_adapters=True)
    emu = build_emulator_model(tensors, plan, full.config.to_dict())
    ptrs = {p.data_ptr() for p in full.parameters()}
    assert not any(p.data_ptr() in ptrs for p in emu.parameters()), "training the emulator must not touch the full model"
    assert not any(p.is_meta for p in emu.parameters()) and torch.isfinite(emu.model.rotary_emb.inv_freq).all()
    decoded, plan2, config = decode_emulator(encode_emulator(tensors, plan, full.config.to_dict()))
    owned = build_emulator_model(decoded, plan2, config, take_ownership=True)
    assert owned.model.embed_tokens.weight.data_ptr() == decoded["model.embed_tokens.weight"].data_ptr()
    assert owned.lm_head.weight is owned.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 7))
    assert torch.allclose(emu(input_ids=ids, use_cache=False).logits, owned(input_ids=ids, use_cache=False).logits)

    bare = build_emulator_model(emulator_tensors(full, plan, include_adapters=False), plan, full.config.to_dict())
    assert not any(p.is_meta for p in bare.parameters())
    assert torch.isfinite(bare(input_ids=ids, use_cache=False).logits).all()


def test_distillation_in_the_prompt_repairs_the_emulator(data_root):
    from methods.offsite.emulators.build import EmulatorSpec, build_emulator, distill_batches
    from fedadapt.models import load_model

    full, tok, _ = load_model("tiny-llama", seed=0)
    prompt = "Review: {text}\nSentiment:"
    spec = EmulatorSpec(model="tiny-llama", method="uniform", bottom=1, top=1, keep=1, calibration="vader_sentiment/nyt_editorials",
                        calibration_examples=16, max_length=24, distill_steps=40, distill_lr=3e-3, distill_examples=32,
                        distill_prompt=prompt, distill_batch_size=8, distill_lm_weight=0.0)  # the teacher's terms only
    texts = ["a long public text " * 20, "short"]
    batch = distill_batches(tok, texts, spec)[0]
    tail = tok("\nSentiment:", add_special_tokens=False)["input_ids"]
    # every row ends in the instruction (left padding; a long text is cut, never the instruction)
    assert batch["input_ids"].shape[1] == 24 and batch["input_ids"][:, -len(tail):].tolist() == [tail, tail]
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][1, 0]
    assert spec.key() != EmulatorSpec(**{**spec.__dict__, "distill_prompt": ""}).key()

    bundle, _ = build_emulator(spec, full, tok, progress=lambda *_: None)
    assert bundle.report["distill_texts"] == 32
    assert bundle.report["distill_loss_last"] < 0.5 * bundle.report["distill_loss_first"]
    untrained, _ = build_emulator(EmulatorSpec(**{**spec.__dict__, "distill_steps": 0}), full, tok, progress=lambda *_: None)
    probe = distill_batches(tok, ["the food was cold", "a fine film"], spec)[0]
    with torch.no_grad():
        want = torch.log_softmax(full(**probe, logits_to_keep=1).logits[:, -1], -1)
        gaps = [torch.nn.functional.kl_div(torch.log_softmax(b.model(full)(**probe, logits_to_keep=1).logits[:, -1], -1),
                                           want, log_target=True, reduction="batchmean").item() for b in (untrained, bundle)]
    assert gaps[1] < gaps[0], gaps  # closer to the full model's next-token distribution where labels are read


# ---------------------------------------------------------------------------- fidelity, pooled similarity, resumable distillation


def _emulator_of(full, plan):
    from methods.offsite.emulator import emulator_tensors

    return build_emulator_model(emulator_tensors(full, plan, include_adapters=True), plan, full.config.to_dict())


def _lm_batches(n=3, rows=4, width=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[0, :3] = 0  # one left-padded row
        out.append({"input_ids": torch.randint(0, 64, (rows, width), generator=g), "attention_mask": mask})
    return out


def test_fidelity_is_one_for_an_emulator_that_keeps_every_layer_and_drops_when_layers_go():
    from methods.offsite.emulators.fidelity import gradient_fidelity, lm_loss, verdict

    full = small_llama(8)
    for p in full.parameters():
        p.requires_grad_(False)
    batches = _lm_batches()
    whole = plan_uniform(8, 2, 2, 4)  # keeps all 4 middle layers: the full model itself
    fid = gradient_fidelity(full, _emulator_of(full, whole), whole, batches, lm_loss, loss="lm")
    assert fid.overall == pytest.approx(1.0, abs=1e-5)
    assert sorted(fid.per_layer) == [0, 1, 6, 7]
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in fid.per_layer.values())
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in fid.norm_ratio.values())
    assert fid.loss_full == pytest.approx(fid.loss_emulator, rel=1e-5)
    assert not any(p.requires_grad for p in full.parameters())  # left as found

    cut = plan_uniform(8, 2, 2, 1)  # one middle layer of four
    low = gradient_fidelity(full, _emulator_of(full, cut), cut, batches, lm_loss, loss="lm")
    assert low.overall < 0.99 and min(low.per_layer.values()) < 0.99, low
    assert -1.0 <= low.overall <= 1.0
    assert verdict(1.0).startswith("high") and verdict(-0.1).startswith("none") and verdict(None) == "unknown"
    d = low.to_dict()
    assert set(d["per_layer"]) == {"0", "1", "6", "7"} and d["verdict"] == low.verdict


def test_fidelity_on_public_rows_uses_public_labels_else_the_full_models_prediction():
    from methods.offsite.emulators.fidelity import public_rows_batches

    class Tok:  # a character tokenizer, enough for a verbalizer over a 64-token vocabulary
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=True, **_):
            return {"input_ids": [1 + (ord(c) % 60) for c in text]}

    from fedadapt.tasks.classify import ClassifyTask

    full = small_llama(4)
    task = ClassifyTask.build(Tok(), ["negative", "positive"], prompt="R: {text}\nS:", max_length=16, label_words=["n", "p"])
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}, {"text": "meh", "label": "neutral"},
            {"text": "so so"}]
    batches, fn, kind, extra = public_rows_batches(task, rows, full, batch_size=3)
    assert kind == "task" and extra == {"public_labels": 2, "pseudo_labels": 2}
    assert batches[0]["labels"][:2].tolist() == [1, 0] and len(batches) == 2
    assert torch.isfinite(fn(full, batches[0]))
    lm_task = ClassifyTask.build(Tok(), [], prompt="R: {text}\nS:", max_length=16, label_words=[])
    _, _, kind, _ = public_rows_batches(lm_task, rows, full)
    assert kind == "lm"


def test_pooled_similarity_has_one_row_per_sequence_as_crash_reference():
    from methods.offsite.emulators.similarity import layer_similarity, pool_rows, sequence_ids

    batches = _lm_batches(n=2, rows=4, width=6)
    seq, last = sequence_ids(batches)
    assert seq.tolist()[:3] == [0, 0, 0] and int(seq.max()) == 7 and int(last.sum()) == 8
    reps = [torch.arange(int(seq.numel()), dtype=torch.float32).unsqueeze(1).repeat(1, 2)]
    mean = pool_rows(reps, seq, last, "mean")[0]
    assert mean.shape == (8, 2) and mean[0, 0] == pytest.approx(sum(range(3)) / 3)  # row 0 has 3 real tokens
    assert pool_rows(reps, seq, last, "last")[0][0, 0] == 2.0
    full = small_llama(6)
    for pooling in ("mean", "last", "tokens"):
        sim = layer_similarity(full, _lm_batches(n=4, rows=8, width=10), pooling=pooling)
        assert sim.robust.shape == (6, 6) and sim.pooling == pooling
        assert torch.allclose(torch.diag(sim.robust), torch.ones(6, dtype=sim.robust.dtype))
    with pytest.raises(ValueError, match="pooling"):
        layer_similarity(full, _lm_batches(n=1), pooling="max")


def test_lr_schedule_warms_up_then_decays_to_zero():
    from methods.offsite.emulators.build import lr_at

    lrs = [lr_at(s, 20, 1e-3, 0.1) for s in range(20)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # 2 warmup steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 1e-4
    assert lr_at(0, 10, 1e-3, 0.0) == pytest.approx(1e-3)


def test_interrupted_distillation_resumes_to_the_uninterrupted_result(tmp_path):
    from methods.offsite.emulators.build import DistillCheckpoint, DistillInterrupted, distill

    full = small_llama(8)
    for p in full.parameters():
        p.requires_grad_(False)
    plan = plan_uniform(8, 2, 2, 2)
    batches = _lm_batches(n=3)
    kw = dict(steps=7, lr=3e-3, warmup=0.2, seed=1)

    straight = _emulator_of(full, plan)
    want = distill(straight, full, plan, batches, **kw)
    assert len(want) == 7

    ckpt = DistillCheckpoint(tmp_path / "job", every=2, fingerprint="job-a")
    first = _emulator_of(full, plan)
    with pytest.raises(DistillInterrupted):
        distill(first, full, plan, batches, checkpoint=ckpt, stop_after=3, **kw)
    saved = torch.load(ckpt.path, weights_only=False)
    assert saved["step"] == 3 and len(saved["losses"]) == 3
    assert DistillCheckpoint(tmp_path / "job", fingerprint="other-data").load() is None  # another job's: ignored

    resumed = _emulator_of(full, plan)  # a fresh process: weights from the full model again, state from the checkpoint
    seen = []
    got = distill(resumed, full, plan, batches, checkpoint=ckpt, on_step=lambda n, loss: seen.append(n), **kw)
    assert seen[0] == 3 and len(seen) == 5  # reported the 3 steps done, then ran the other 4
    assert got == pytest.approx(want, rel=1e-5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.load(ckpt.path, weights_only=False)["step"] == 7


def test_build_resumes_an_interrupted_distillation_and_caches_it(data_root, tmp_path, monkeypatch):
    from methods.offsite.emulators.build import DistillInterrupted, EmulatorSpec, build_emulator, distill_checkpoint
    from methods.offsite.emulators.build import calibration_texts
    from fedadapt.models import load_model

    monkeypatch.setenv("FEDADAPT_HOME", str(tmp_path / "home"))
    full, tok, _ = load_model("tiny-llama", seed=0)
    spec = EmulatorSpec(model="tiny-llama", method="uniform", bottom=1, top=1, keep=1, calibration_examples=16,
                        max_length=16, distill_steps=4, distill_lr=1e-3, distill_batch_size=8)
    with pytest.raises(DistillInterrupted):
        build_emulator(spec, full, tok, progress=lambda *_: None, stop_after=2)
    ckpt = distill_checkpoint(spec, calibration_texts(spec.calibration, 16))
    assert ckpt.load()["step"] == 2
    resumed, _ = build_emulator(spec, full, tok, progress=lambda *_: None)
    assert not ckpt.path.exists()  # finished: the checkpoint is gone, the result is the caller's
    fresh, _ = build_emulator(spec, full, tok, progress=lambda *_: None)
    got, want = decode_emulator(resumed.payload)[0], decode_emulator(fresh.payload)[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)  # the uninterrupted job's weights
    assert spec.key() != EmulatorSpec(**{**spec.__dict__, "distill_kd_weight": 0.5}).key()
    assert EmulatorSpec(**{**spec.__dict__, "distill_steps": 0}).key() == EmulatorSpec(
        **{**spec.__dict__, "distill_steps": 0, "distill_kd_weight": 0.5}).key()  # training-free: not part of the key


def test_emulator_build_cli_prints_and_records_fidelity(data_root, tmp_path, monkeypatch, capsys):
    from coordinator.cli import main

    monkeypatch.setenv("FEDADAPT_HOME", str(tmp_path / "home"))
    out = tmp_path / "emu"
    args = ["emulator", "build", "--model", "tiny-llama", "--method", "crash", "--adapter-layers", "1,1", "--keep", "1",
            "--calibration-examples", "16", "--prompt", "Review: {text}\\nSentiment:", "--labels", "negative,positive",
            "--fidelity-examples", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "emulator fidelity" in printed and "layer 0" in printed and "layer 3" in printed
    report = json.loads((out / "emulator.json").read_text())
    fid = report["fidelity"]
    assert set(fid["per_layer"]) == {"0", "3"} and fid["rows"] == 8 and fid["loss"] == "task"
    assert fid["prompt"] == "Review: {text}\nSentiment:" and report["similarity_pooling"] == "mean"
    assert report["spec"]["similarity_prompt"] == "Review: {text}\nSentiment:" and "similarity" in report
    assert (out / "emulator.safetensors").is_file()
