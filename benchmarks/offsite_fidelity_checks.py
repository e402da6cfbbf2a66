"""`flock /tmp/fedadapt-heavy.lock .venv/bin/python benchmarks/offsite_fidelity_checks.py` (~4 min on 2 shared cores).

Quick checks beside benchmarks/offsite_fidelity.py: task-loss vs next-token-loss fidelity on 64 train rows
(uniform keep 18, 2+2: the issue's replica reported 0.40, top layers 0.77/0.73), and fidelity before/after
the new KD+LM distillation (uniform keep 8, 2+2, 60 steps)."""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
import torch
torch.set_num_threads(2)
from fedadapt.models import load_model
from fedadapt.tasks.classify import VerbalizerTask
from fedadapt.data import load_split, resolve_dataset_dir
from methods.offsite.emulators.build import EmulatorSpec, build_emulator, cached_emulator, public_rows
from methods.offsite.emulators.fidelity import gradient_fidelity, lm_loss, public_rows_batches

t0 = time.time()
full, tok, _ = load_model("smollm2-135m")
for p in full.parameters():
    p.requires_grad_(False)
labels = ["negative", "positive"]
prompt = "Review: {text}\nSentiment:"
task = VerbalizerTask.build(tok, labels, prompt=prompt, max_length=64)
train = load_split(resolve_dataset_dir("rotten_tomatoes", ""), "train", labels)[:64]
private = [{"text": e.text, "label": labels[e.label]} for e in train]
tb, tfn, _, _ = public_rows_batches(task, private, full)
pub = public_rows("vader_sentiment/nyt_editorials", 64)
pb, _, _, _ = public_rows_batches(task, pub, full)
out = {}
def fid(emu, plan, batches, fn, kind):
    f = gradient_fidelity(full, emu, plan, batches, fn, loss=kind).to_dict()
    return {"overall": round(f["overall"], 3), "per_layer": {k: round(v, 3) for k, v in f["per_layer"].items()}}
spec18 = EmulatorSpec(model="smollm2-135m", method="uniform", bottom=2, top=2, keep=18, calibration_examples=16)
b18, _ = build_emulator(spec18, full, tok, progress=lambda *a: None)
e18 = b18.model(full)
out["uniform18_2+2_train_task"] = fid(e18, b18.plan, tb, tfn, "task")
out["uniform18_2+2_train_lm"] = fid(e18, b18.plan, tb, lm_loss, "lm")
print(json.dumps(out), flush=True); del e18
spec8 = EmulatorSpec(model="smollm2-135m", method="uniform", bottom=2, top=2, keep=8, calibration_examples=16)
b8, _ = build_emulator(spec8, full, tok, progress=lambda *a: None)
e8 = b8.model(full)
out["uniform8_before_public_task"] = fid(e8, b8.plan, pb, tfn, "task")
out["uniform8_before_train_task"] = fid(e8, b8.plan, tb, tfn, "task")
del e8
spec8d = EmulatorSpec(model="smollm2-135m", method="uniform", bottom=2, top=2, keep=8, calibration_examples=16,
                      distill_steps=60, distill_examples=480, distill_prompt=prompt, distill_lr=1e-4,
                      calibration="vader_sentiment/nyt_editorials")
t1 = time.time()
b8d = cached_emulator(spec8d, full, tok, progress=lambda *a: print(*a, flush=True))
out["distill_seconds"] = round(time.time() - t1)
out["distill_loss"] = [b8d.report["distill_loss_first"], b8d.report["distill_loss_last"]]
e8d = b8d.model(full)
out["uniform8_distilled60_public_task"] = fid(e8d, b8d.plan, pb, tfn, "task")
out["uniform8_distilled60_train_task"] = fid(e8d, b8d.plan, tb, tfn, "task")
out["seconds"] = round(time.time() - t0)
print(json.dumps(out), flush=True)
json.dump(out, open(__import__("pathlib").Path(__file__).resolve().parent / "results" / "offsite_fidelity_checks.json", "w"), indent=1)
