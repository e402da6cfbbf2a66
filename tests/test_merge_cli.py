"""`fedadapt merge` on real PEFT adapter folders (tiny-llama), and the compeft + ties simulation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from coordinator.merge_cli import main as merge_main
from coordinator.merge_cli import merge_adapters
from fedadapt.adapters import adapter_state, save_peft_adapter
from fedadapt.models import cached_lora_model
from methods.lora.config import LoraConfig
from protocols.config import MergeConfig


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three adapters that started from one global adapter (like a run's clients), and that global."""
    root = tmp_path_factory.mktemp("adapters")
    model, _ = cached_lora_model("tiny-llama", LoraConfig(), seed=0)
    base = adapter_state(model)
    g = torch.Generator().manual_seed(0)
    folders = []
    for i in range(3):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        folders.append(save_peft_adapter(model, state, root / f"client-{i}"))
    save_peft_adapter(model, base, root / "global")
    return root, folders, model


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_cli_ties_writes_a_loadable_peft_adapter(adapters, tmp_path):
    root, folders, model = adapters
    out = tmp_path / "merged"
    rc = merge_main(["--method", "ties", *map(str, folders), "--base", str(root / "global"),
                     "--out", str(out), "--lora-space", "per-matrix", "--density", "0.5"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "merge.json"}
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == "ties" and info["merge"]["density"] == 0.5 and len(info["adapters"]) == 3
    merged = _weights(out)
    base = _weights(root / "global")
    inputs = [_weights(f) for f in folders]
    # per-matrix with a base: exactly base + TIES over the three task vectors
    from coordinator.mergers import ClientUpdate, get_merger

    ups = [ClientUpdate(delta={k: s[k] - base[k] for k in s}, num_examples=1, client=str(i)) for i, s in enumerate(inputs)]
    expected = get_merger("ties")(ups, MergeConfig(density=0.5))
    for k in base:
        assert torch.allclose(merged[k], base[k] + expected[k], atol=1e-6)
    from peft import PeftModel

    from fedadapt.models import load_model

    fresh, _, _ = load_model("tiny-llama")
    PeftModel.from_pretrained(fresh, out)  # PEFT accepts it


def test_product_space_fedavg_without_base_is_the_mean_weight_update_when_it_fits(adapters, tmp_path):
    # one adapter merged with itself: ΔW = BA has rank ≤ r, so product space reproduces it exactly
    root, folders, _ = adapters
    config, merged = merge_adapters([folders[0], folders[0]], "fedavg", MergeConfig(lora_space="product"))
    src = _weights(folders[0])
    for a in [k for k in src if "lora_A" in k]:
        b = a.replace("lora_A", "lora_B")
        assert torch.allclose(merged[b] @ merged[a], src[b] @ src[a], atol=1e-5)
    assert config["r"] == 8


def test_weights_change_the_fedavg_result(adapters):
    root, folders, _ = adapters
    _, merged = merge_adapters(folders[:2], "fedavg", MergeConfig(lora_space="per-matrix"), weights=[3, 1])
    a, b = _weights(folders[0]), _weights(folders[1])
    for k in a:
        assert torch.allclose(merged[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6)


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_bad_inputs_give_one_clear_line(adapters, tmp_path, capsys):
    root, folders, _ = adapters
    assert merge_main(["--method", "ties", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lacks adapter_config.json" in _err(capsys)
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((folders[0] / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    (other / "adapter_model.safetensors").write_bytes((folders[0] / "adapter_model.safetensors").read_bytes())
    assert merge_main(["--method", "ties", str(folders[0]), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "same LoRA config" in _err(capsys)
    assert merge_main(["--method", "ties", str(folders[0]), "--out", str(tmp_path / "o"), "--density", "2"]) == 2
    assert "density" in _err(capsys)
    assert merge_main(["--method", "ties", str(folders[0]), "--out", str(folders[0])]) == 2
    assert "is one of the inputs" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_umbrella_command_delegates_merge(adapters, tmp_path):
    from fedadapt.cli import main

    root, folders, _ = adapters
    out = tmp_path / "m"
    assert main(["merge", "--method", "pcb", *map(str, folders), "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ the run: compeft on the wire, ties merging
def test_simulation_with_compeft_and_ties(tiny_cfg):
    from simulations.simulate import run_simulation_for

    tiny_cfg.codec = "compeft"
    tiny_cfg.merger = "ties"
    tiny_cfg.compression.density = 0.05
    rd = run_simulation_for(tiny_cfg)
    clients = [m for m in rd.metrics if m["kind"] == "client"]
    assert len(clients) == 4 and all(c["status"] == "ok" for c in clients)
    for c in clients:
        assert c["bytes_received"] == c["bytes_up"]  # both sides count the same payload
        # tiny-llama has 256-entry tensors: the per-tensor header (name, shape) outweighs the ~30 body bytes;
        # at 135M (4,608-entry tensors) the same codec gives ~65x (benchmarks/codecs.py)
        assert c["compression_ratio"] > 5
    assert rd.state()["completed_rounds"] == 2
    merged = load_file(str(rd.adapter_dir / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in merged.items() if "lora_B" in k)  # updates reached the global


def test_error_feedback_residual_persists_on_the_node(tiny_cfg):
    from coordinator.rounds import Coordinator
    from coordinator.run_dir import RunDir
    from tests.test_rounds import LocalTransport

    tiny_cfg.codec = "compeft"
    tiny_cfg.merger = "ties"
    tiny_cfg.merge.lora_space = "product"
    transport = LocalTransport(2)
    rd = RunDir.create(tiny_cfg)
    Coordinator(tiny_cfg, rd).run(transport)
    for state in transport.states.values():
        residuals = {k: v for k, v in state.items() if k.startswith("compeft.residual/")}
        assert residuals and all(v.abs().sum() > 0 for v in residuals.values())
