"""`fedadapt merge`: merge finished PEFT LoRA adapters once, offline, with any of the run mergers.

    fedadapt merge --method ties ADAPTER_DIR ADAPTER_DIR ... --out DIR [--base ADAPTER_DIR]

Each ADAPTER_DIR is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), e.g. the
``adapter/`` of run directories or adapters saved by data owners. All must share the LoRA config
(rank, alpha, target modules). The task vector of an adapter is its difference to ``--base`` (the
adapter they all started from, e.g. a run's global adapter), or, without ``--base``, the adapter
itself (its difference to the bare model). ``--lora-space product`` (the default here) merges each
adapter's ΔW = B·A and factors the result back to rank r, because adapters trained apart need not
share an A; ``per-matrix`` merges A and B on their own (see coordinator/mergers/lora_space.py).
The output is a PEFT adapter folder with the inputs' config, written atomically, plus merge.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fedadapt.cli import run_cli
from fedadapt.paths import atomic_replace_dir
from protocols.config import ConfigError, MergeConfig

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# The adapter config keys that must agree for tensors to be merged meaningfully.
MUST_MATCH = ("r", "lora_alpha", "target_modules", "peft_type", "use_rslora")


class MergeInputError(ConfigError):
    """An adapter folder that cannot be merged; the message names the folder and the fix."""


def load_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise MergeInputError(f"{folder} is not a folder: pass PEFT adapter folders (with {CONFIG_FILE})")
    if not cfg_path.is_file() or not weights_path.is_file():
        raise MergeInputError(f"{folder} lacks {CONFIG_FILE} or {WEIGHTS_FILE}: pass a PEFT adapter folder "
                              "(e.g. a run directory's adapter/)")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise MergeInputError(f"{folder} cannot be read ({e}): re-save the adapter") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeInputError(f"{folder} is a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    return config, tensors


def check_compatible(folders: list[Path], configs: list[dict], states: list[dict[str, torch.Tensor]]) -> None:
    first_cfg, first = configs[0], states[0]
    for folder, cfg, st in zip(folders[1:], configs[1:], states[1:]):
        for key in MUST_MATCH:
            if cfg.get(key) != first_cfg.get(key) and not (key == "target_modules" and
                                                           sorted(cfg.get(key) or []) == sorted(first_cfg.get(key) or [])):
                raise MergeInputError(f"{folder} has {key}={cfg.get(key)!r} but {folders[0]} has "
                                      f"{first_cfg.get(key)!r}: merge only adapters trained with the same LoRA config")
        if set(st) != set(first):
            raise MergeInputError(f"{folder} holds different tensors than {folders[0]}: adapters of different models or layers")
        for k, v in st.items():
            if v.shape != first[k].shape:
                raise MergeInputError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, {folders[0]} has {tuple(first[k].shape)}")
    for folder, st in zip(folders, states):
        bad = [k for k, v in st.items() if not torch.isfinite(v).all()]
        if bad:
            raise MergeInputError(f"{folder}: tensor {bad[0]} contains NaN or Inf; this adapter cannot be merged")


def merge_adapters(folders: list[str | Path], method: str, merge_cfg: MergeConfig, *, base: str | Path | None = None,
                   weights: list[float] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Merge adapter folders; returns (adapter config, merged tensors). Pure apart from reading the inputs."""
    from coordinator.mergers import ClientUpdate, get_merger, merge_updates

    folders = [Path(f) for f in folders]
    if not folders:
        raise MergeInputError("no adapters given: pass at least one ADAPTER_DIR")
    if weights is not None and (len(weights) != len(folders) or any(w <= 0 for w in weights)):
        raise MergeInputError(f"--weights needs {len(folders)} positive numbers, one per adapter")
    try:
        merger = get_merger(method)
    except KeyError as e:
        raise MergeInputError(str(e).strip("'\"")) from None
    loaded = [load_adapter(f) for f in folders]
    all_folders = list(folders)
    if base is not None:
        loaded.append(load_adapter(base))
        all_folders.append(Path(base))
    check_compatible(all_folders, [c for c, _ in loaded], [s for _, s in loaded])
    states = [{k: v.float() for k, v in s.items()} for _, s in loaded]
    reference = states.pop() if base is not None else {k: torch.zeros_like(v) for k, v in states[0].items()}
    updates = [ClientUpdate(delta={k: s[k] - reference[k] for k in s}, num_examples=1, client=str(f))
               for f, s in zip(folders, states)]
    if weights is not None:
        # example_weights normalises num_examples; fractional weights keep their ratio at 1e6 resolution
        for u, w in zip(updates, weights):
            u.num_examples = max(1, round(w * 1_000_000))
    merged = merge_updates(merger, updates, merge_cfg, reference)
    dtype = loaded[0][1][next(iter(loaded[0][1]))].dtype
    out = {k: (reference[k] + merged[k]).to(dtype) for k in reference}
    return loaded[0][0], out


def write_adapter(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Write a PEFT adapter folder; an existing folder is replaced only once the new one is complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_replace_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / "merge.json").write_text(json.dumps(info, indent=2))
    return out_dir


def cmd_merge(args) -> int:
    from fedadapt.cli import err

    from pydantic import ValidationError

    from protocols.config import _format_error

    try:
        merge_cfg = MergeConfig(scaling=args.scaling, density=args.density, pcb_ratio=args.pcb_ratio,
                                lora_space=args.lora_space, seed=args.seed)
    except ValidationError as e:
        raise MergeInputError(f"bad merge option: {_format_error(e)}") from None
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise MergeInputError(f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 1,2,1") from None
    out = Path(args.out)
    if out.resolve() in {Path(a).resolve() for a in args.adapters + ([args.base] if args.base else [])}:
        raise MergeInputError(f"--out {out} is one of the inputs: choose a new folder")
    config, tensors = merge_adapters(args.adapters, args.method, merge_cfg, base=args.base, weights=weights)
    info = {"method": args.method, "adapters": [str(Path(a).resolve()) for a in args.adapters],
            "base": str(Path(args.base).resolve()) if args.base else None, "weights": weights,
            "merge": merge_cfg.model_dump()}
    write_adapter(out, config, tensors, info)
    err.print(f"merged {len(args.adapters)} adapters with [bold]{args.method}[/] ({args.lora_space}) → [bold]{out}[/]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from coordinator.mergers import MERGERS

    d = MergeConfig()
    p = argparse.ArgumentParser(prog="fedadapt merge", description="Merge PEFT LoRA adapters offline.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter folders to merge")
    p.add_argument("--method", required=True, choices=sorted(MERGERS), help="merger (as in the run config)")
    p.add_argument("--out", required=True, metavar="DIR", help="output adapter folder")
    p.add_argument("--base", metavar="ADAPTER_DIR", help="adapter the inputs started from (task vector = input - base)")
    p.add_argument("--weights", metavar="W1,W2,...", help="relative weight per adapter (default: equal)")
    p.add_argument("--lora-space", choices=["product", "per-matrix"], default="product",
                   help="merge ΔW = B·A (default) or A and B separately")
    p.add_argument("--scaling", type=float, default=d.scaling, help=f"λ applied to the merged update (default {d.scaling})")
    p.add_argument("--density", type=float, default=d.density, help=f"ties/dare-ties: fraction kept (default {d.density})")
    p.add_argument("--pcb-ratio", type=float, default=d.pcb_ratio, help=f"pcb: fraction kept (default {d.pcb_ratio})")
    p.add_argument("--seed", type=int, default=d.seed, help="dare-ties: seed of the drop masks")
    p.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
