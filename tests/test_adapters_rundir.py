import json
import os

import pytest
import torch

from coordinator.run_dir import RunDir, RunDirError
from fedadapt.adapters import adapter_state, load_adapter_state, make_lora_model, save_peft_adapter
from fedadapt.models import load_model
from fedadapt.paths import atomic_write_text
from protocols.config import RunConfig


def _lora(seed=0):
    base, tok, _ = load_model("tiny-llama")
    return make_lora_model(base, RunConfig().lora, seed=seed), tok


def test_tiny_llama_is_identical_across_loads():
    a, _, _ = load_model("tiny-llama")
    b, _, _ = load_model("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_peft_round_trip_with_from_pretrained(tmp_path):
    from peft import PeftModel

    model, tok = _lora()
    state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    out = save_peft_adapter(model, state, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base, _, _ = load_model("tiny-llama")
    loaded = PeftModel.from_pretrained(base, out)
    got = adapter_state(loaded)
    assert set(got) == set(state)
    assert all(torch.allclose(got[k], state[k]) for k in state)
    ids = tok("Review: fine\nSentiment:", return_tensors="pt")
    load_adapter_state(model, state)
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, loaded(**ids).logits, atol=1e-5)


def test_initial_adapter_equals_base_model():
    model, tok = _lora()
    base, _, _ = load_model("tiny-llama")
    ids = tok("hello there", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, base(**ids).logits, atol=1e-6)


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "state.json"
    atomic_write_text(f, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(f, "new")
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_run_dir_resume_drops_uncommitted_metrics(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), name="r")
    rd = RunDir.create(cfg)
    g1 = {"w": torch.ones(2)}
    rd.append_metrics({"kind": "eval", "round": 0, "accuracy": 0.5})
    rd.append_metrics({"kind": "eval", "round": 1, "accuracy": 0.6})
    rd.commit_round(1, g1)
    rd.append_metrics({"kind": "client", "round": 2, "client": "a"})  # crash before round 2 commits
    again = RunDir.open_existing(rd.path)
    done, state = again.resume_point()
    assert done == 1 and torch.equal(state["w"], g1["w"])
    assert [m["round"] for m in again.metrics] == [0, 1]
    assert len(rd.metrics_file.read_text().splitlines()) == 2
    assert json.loads(rd.config_file.read_text())["name"] == "r"


def test_run_dir_refuses_non_run_folder(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir.open_existing(tmp_path)


def test_new_run_never_overwrites_existing(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), name="same")
    a = RunDir.create(cfg)
    b = RunDir.create(cfg)
    assert a.path != b.path and a.config_file.is_file() and b.config_file.is_file()


def test_run_dir_lock_nests_within_a_process_and_refuses_other_holders(tmp_path):
    from fedadapt.paths import LockBusy, hold_lock

    rd = RunDir.create(RunConfig(output_dir=str(tmp_path), name="r"))
    rd.hold()
    rd.hold()
    rd.release()
    with pytest.raises(LockBusy):  # another open file (as another process would) is refused while one hold is left
        hold_lock(rd.lock_file)
    rd.release()
    fd = hold_lock(rd.lock_file)
    with pytest.raises(RunDirError, match=r"in use by process \d+: stop it first"):
        RunDir.open_existing(rd.path).hold()
    os.close(fd)
    RunDir.open_existing(rd.path).hold().release()
