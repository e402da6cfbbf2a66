"""Bring your own model: offsite emulators and the SFPrompt split on Llama, Qwen2 and Gemma 3 (the tiny
random models of the store), and through the architecture table on OPT, GPT-2 and GPT-NeoX.

Numerical checks: the split's head → body → tail equals the full model's logits at the scored position,
an emulator that keeps every layer equals the full model, trained adapter layers plug back in; then one
2-node round of lora, offsite and sfprompt through the coordinator's round loop per family.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedadapt.architectures import decoder_layers, embeddings, lm_head, ties_embeddings
from fedadapt.models import load_model
from methods.offsite.emulator import (
    EmulatorPlan, adapter_layer_state, build_emulator_model, decode_emulator, emulator_tensors, encode_emulator,
    load_adapter_layers, load_lora_state, lora_state, plug_in, wrap_lora,
)
from methods.sfprompt.split_model import SplitError, SplitModel

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gemma3"]
_MODELS: dict[str, tuple] = {}


def tiny(name):
    """(model, tokenizer), loaded once per test session (tests deep-copy before changing weights)."""
    if name not in _MODELS:
        model, tok, _ = load_model(name)
        _MODELS[name] = (model, tok)
    return _MODELS[name]


def batch(seq=24, vocab=1000):
    """Left-padded rows longer than Gemma 3's sliding window (16): local and global layers differ."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[1, :2] = 0
    return ids, mask


def payload_round_trip(full, plan, *, include_adapters=True):
    """The emulator a data owner builds: through the wire format, tensors owned."""
    payload = encode_emulator(emulator_tensors(full, plan, include_adapters=include_adapters), plan, full.config.to_dict())
    return build_emulator_model(*decode_emulator(payload), take_ownership=True)


# ---------------------------------------------------------------------------- (a) the SFPrompt split


@pytest.mark.parametrize("name", FAMILIES)
def test_split_forward_and_gradients_equal_the_full_model(name):
    model, tok = tiny(name)
    split = SplitModel(model, 1, 1)
    split.freeze_all_but_tail()
    ids, mask = batch()
    labels_ids, labels = [10, 20, 30], torch.tensor([0, 2, 1])
    prompt = split.initial_prompt(tok, 4, "Classify the review.").requires_grad_(True)
    # the prompt starts as the embedding module's output (Gemma: scaled by sqrt(hidden) like every token)
    first = tok("Classify the review.", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(prompt[0].detach(), embeddings(model)(torch.tensor([first]))[0])

    hidden, m = split.head(ids, mask, prompt)
    logits = split.tail_label_logits(split.body(hidden, m), m, labels_ids)
    F.cross_entropy(logits, labels).backward()
    got_prompt = prompt.grad.clone()
    got_tail = {k: p.grad.clone() for k, p in split.tail_parameters().items()}
    prompt.grad = None
    for p in split.tail_parameters().values():
        p.grad = None

    embeds, full_mask = split.insert_prompt(ids, mask, prompt)
    ref = model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False, logits_to_keep=1).logits[:, -1, labels_ids]
    F.cross_entropy(ref, labels).backward()
    assert torch.allclose(logits, ref, atol=1e-6, rtol=1e-5), (logits - ref).abs().max()
    assert got_prompt.abs().max() > 0 and torch.allclose(got_prompt, prompt.grad, atol=1e-6, rtol=1e-4)
    for k, p in split.tail_parameters().items():
        assert torch.allclose(got_tail[k], p.grad, atol=1e-6, rtol=1e-4), k
    split.freeze_all()
    prompt.grad = None


def test_gemma3_split_gives_each_layer_its_own_attention_kind():
    model, tok = tiny("tiny-gemma3")
    split = SplitModel(model, 1, 1)
    assert split.head_types + split.body_types + split.tail_types == list(model.config.layer_types)
    assert split.tail_types == ["full_attention"]
    ids, mask = batch()
    hidden = embeddings(model)(ids)
    own = split.run_blocks(split.body_blocks, hidden, mask, split.body_types)
    as_global = split.run_blocks(split.body_blocks, hidden, mask, ["full_attention"] * 2)
    assert not torch.allclose(own, as_global, atol=1e-4)  # masks and RoPE bases differ: the kinds matter


# ---------------------------------------------------------------------------- (b) emulators


@pytest.mark.parametrize("name", FAMILIES)
def test_full_keep_emulator_equals_the_full_model_and_plugs_back_in(name):
    full, _ = tiny(name)
    full = copy.deepcopy(full)
    plan = EmulatorPlan("uniform", 4, 1, 1, [1, 2])  # every layer kept once: the full model
    emu = payload_round_trip(full, plan)
    assert type(emu) is type(full) and emu.config.num_hidden_layers == 4
    assert ties_embeddings(emu) == ties_embeddings(full)
    buffers = dict(full.named_buffers())
    assert {k: torch.equal(v, buffers[k]) for k, v in emu.named_buffers()} == {k: True for k in buffers}
    ids, mask = batch()
    ref = full(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(emu(input_ids=ids, attention_mask=mask, use_cache=False).logits, ref, atol=1e-5)

    # "training" on the emulator, then the plug-in: every parameter of the real layer (Qwen2's biases, Gemma's norms)
    state = adapter_layer_state(emu, plan, on="emulator")
    assert set(state) == {k for k in full.state_dict() if k.startswith(("model.layers.0.", "model.layers.3."))}
    g = torch.Generator().manual_seed(1)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    load_adapter_layers(emu, plan, trained, on="emulator")
    full.load_state_dict(plug_in(full.state_dict(), adapter_layer_state(emu, plan, on="emulator")))
    assert all(torch.equal(v, trained[k]) for k, v in adapter_layer_state(full, plan, on="full").items())
    ref2 = full(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert not torch.allclose(ref, ref2, atol=1e-4)
    assert torch.allclose(emu(input_ids=ids, attention_mask=mask, use_cache=False).logits, ref2, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_shared_and_shallow_emulators_and_lora_on_their_adapter_layers(name, tiny_cfg):
    full, _ = tiny(name)
    ids, mask = batch()
    shared = payload_round_trip(full, EmulatorPlan("crash", 4, 1, 1, [2, 2], [[1, 2]], share=True), include_adapters=False)
    layers = decoder_layers(shared)
    assert len(layers) == 4 and layers[1] is layers[2]
    assert torch.isfinite(shared(input_ids=ids, attention_mask=mask, use_cache=False).logits).all()
    plan = EmulatorPlan("uniform", 4, 1, 1, [2], [[1, 2]])
    shallow = payload_round_trip(full, plan)
    assert len(decoder_layers(shallow)) == 3 and shallow.config.num_hidden_layers == 3
    if hasattr(full.config, "layer_types"):
        assert len(shallow.config.layer_types) == 3
    assert torch.isfinite(shallow(input_ids=ids, attention_mask=mask, use_cache=False).logits).all()
    # LoRA on the emulator's adapter layers, named by full-model index, loads into the full model
    emu = wrap_lora(shallow, plan, tiny_cfg.lora, on="emulator", seed=0)
    state = lora_state(emu, plan, on="emulator")
    assert state and {k.split(".layers.")[1].split(".")[0] for k in state} == {"0", "3"}
    wrapped_full = wrap_lora(copy.deepcopy(full), plan, tiny_cfg.lora, on="full", seed=0)
    load_lora_state(wrapped_full, plan, {k: v + 1.0 for k, v in state.items()}, on="full")
    back = lora_state(wrapped_full, plan, on="full")
    assert all(torch.equal(back[k], v + 1.0) for k, v in state.items())


def test_gemma3_emulator_positions_keep_their_source_layers_attention_kind():
    """A position running layer 3 (global attention, global RoPE base) stays global wherever it sits."""
    full, _ = tiny("tiny-gemma3")
    assert full.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    plan = EmulatorPlan("crash", 4, 1, 0, [3, 3, 3], [[1, 2, 3]], share=True)
    emu = payload_round_trip(full, plan)
    assert emu.config.layer_types == ["sliding_attention"] + ["full_attention"] * 3
    assert emu.config.num_hidden_layers == 4
    ref = copy.deepcopy(full)  # the full model's own forward over layers 0, 3, 3, 3 with their own kinds
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in (0, 3, 3, 3)])
    ref.config.layer_types = emu.config.layer_types
    ids, mask = batch()
    got = emu(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(got, ref(input_ids=ids, attention_mask=mask, use_cache=False).logits, atol=1e-5)
    ref.config.layer_types = list(full.config.layer_types)  # kinds by position instead: a different function
    assert not torch.allclose(got, ref(input_ids=ids, attention_mask=mask, use_cache=False).logits, atol=1e-4)


# ---------------------------------------------------------------------------- other families through the table


def table_model(kind):
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, OPTConfig

    cfg = {
        "opt": lambda: OPTConfig(vocab_size=128, hidden_size=16, ffn_dim=32, num_hidden_layers=4, num_attention_heads=2,
                                 max_position_embeddings=64, word_embed_proj_dim=16),
        "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=16, n_layer=4, n_head=2, n_positions=64, bos_token_id=0,
                                   eos_token_id=0),
        "gpt_neox": lambda: GPTNeoXConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                          num_attention_heads=2, max_position_embeddings=64),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["opt", "gpt2", "gpt_neox"])
def test_table_families_emulate_and_split(kind):
    full = table_model(kind)
    ids, mask = batch(seq=12, vocab=128)
    plan = EmulatorPlan("uniform", 4, 1, 1, [1, 2])
    emu = payload_round_trip(full, plan)
    ref = full(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(emu(input_ids=ids, attention_mask=mask, use_cache=False).logits, ref, atol=1e-5)
    assert lm_head(emu).weight is embeddings(emu).weight or not ties_embeddings(full)
    shallow = payload_round_trip(full, EmulatorPlan("uniform", 4, 1, 1, [2]), include_adapters=False)
    assert len(decoder_layers(shallow)) == 3
    assert torch.isfinite(shallow(input_ids=ids, attention_mask=mask, use_cache=False).logits).all()
    if kind != "gpt_neox":  # learned positions enter with the embeddings: no rotary split
        with pytest.raises(SplitError, match="rotary"):
            SplitModel(full, 1, 1)
        return
    split = SplitModel(full, 1, 1)
    prompt = split.embed(torch.tensor([5, 6]))
    got = split.label_logits(ids, mask, prompt, [1, 2, 3])
    embeds, m = split.insert_prompt(ids, mask, prompt)
    want = full(inputs_embeds=embeds, attention_mask=m, use_cache=False).logits[:, -1, [1, 2, 3]]
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- (c) one round per method and family


RUNS = {
    "lora": [],
    "offsite": ["trainer='offsite'", "offsite.adapter_layers=[1,1]", "offsite.keep=1", "offsite.calibration_examples=8"],
    "sfprompt": ["trainer='sfprompt'", "sfprompt.local_loss_steps=1", "sfprompt.max_split_steps=1"],
}


@pytest.mark.parametrize("method", list(RUNS))
@pytest.mark.parametrize("name", FAMILIES)
def test_two_node_round(name, method, tmp_path, data_root):
    from coordinator.rounds import Coordinator
    from coordinator.run_dir import RunDir
    from protocols.config import load_config

    from .conftest import REPO
    from .test_rounds import LocalTransport

    cfg = load_config(REPO / "simulations" / "configs" / "tiny.toml", [
        f"output_dir='{tmp_path / 'runs'}'", f"data.root='{data_root}'", f"model='{name}'", "rounds=1",
        "data.eval_examples=8", "data.max_train_examples=8", "data.max_length=32", "train.local_steps=1",
        "train.batch_size=4", *RUNS[method]])
    rd = RunDir.create(cfg)
    Coordinator(cfg, rd, is_simulation=True).run(LocalTransport(2))  # closes the method (SFPrompt's body service)
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    assert [c["status"] for c in clients] == ["ok", "ok"], clients
    evals = [m for m in rd.metrics if m["kind"] == "eval"]
    assert [e["round"] for e in evals] == [0, 1] and rd.state()["status"] == "done"
