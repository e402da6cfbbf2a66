"""SFPrompt's two phases train with two optimizers: the local-loss phase (head → tail, no body) and the split
phase (through the body) each get their own AdamW, their own learning rates and their own moments."""

from __future__ import annotations

import pytest
import torch

from methods.sfprompt.client import phase_optimizers, train
from methods.sfprompt.split_model import PROMPT_KEY

from .test_sfprompt_split import _ctx, _examples, body  # noqa: F401  (body: the module-scoped fixture)


class RecordingAdamW(torch.optim.AdamW):
    """An AdamW that remembers every instance and how many steps each took."""

    made: list["RecordingAdamW"] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.steps = 0
        RecordingAdamW.made.append(self)

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


@pytest.fixture()
def recording(monkeypatch):
    RecordingAdamW.made = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    return RecordingAdamW.made


def _lrs(opt) -> tuple[float, float]:
    prompt_group, tail_group = opt.param_groups
    return prompt_group["lr"], tail_group["lr"]


def test_each_phase_steps_its_own_optimizer_with_its_own_lrs(body, tiny_cfg, data_root, recording):  # noqa: F811
    tiny_cfg.data.root = str(data_root)
    ctx = _ctx(tiny_cfg, body.address(), _examples(data_root, 32))
    s = tiny_cfg.sfprompt
    s.local_loss_steps = 3
    s.tail_lr, s.prompt_lr, s.local_tail_lr, s.local_prompt_lr = 2e-5, 3e-4, 7e-5, 4e-3
    res = train(ctx)
    assert res.status == "ok", res.reason
    assert len(recording) == 2
    local, split = recording
    assert local is not split
    assert _lrs(local) == (4e-3, 7e-5) and _lrs(split) == (3e-4, 2e-5)
    # each stepped only in its own phase
    assert local.steps == 3 and split.steps == res.metrics["split_steps"] >= 1
    # separate moments: each optimizer's Adam step count is its own phase's, not the sum of both
    for opt, n in ((local, 3), (split, int(res.metrics["split_steps"]))):
        for group in opt.param_groups:
            for p in group["params"]:
                assert int(opt.state[p]["step"]) == n
    # the same parameters, different state tensors
    p0 = local.param_groups[0]["params"][0]
    assert p0 is split.param_groups[0]["params"][0]
    assert local.state[p0]["exp_avg"].data_ptr() != split.state[p0]["exp_avg"].data_ptr()
    # the prompt never decays, the tail uses train.weight_decay
    assert local.param_groups[0]["weight_decay"] == split.param_groups[0]["weight_decay"] == 0.0


def test_split_phase_lrs_set_the_step_size(body, tiny_cfg, data_root, recording):  # noqa: F811
    """No local-loss steps and one split step: Adam's first step moves every element by at most lr (exactly
    lr where the gradient is not tiny), so the update's largest entry is the configured split lr."""
    tiny_cfg.data.root = str(data_root)
    ctx = _ctx(tiny_cfg, body.address(), _examples(data_root, 16))
    s = tiny_cfg.sfprompt
    s.local_loss_steps, s.max_split_steps = 0, 1
    s.tail_lr, s.prompt_lr = 3e-5, 2e-3
    s.local_tail_lr = s.local_prompt_lr = 0.5  # unused: no local-loss phase
    tiny_cfg.train.weight_decay = 0.0
    res = train(ctx)
    assert res.status == "ok", res.reason
    assert len(recording) == 1 and recording[0].steps == 1  # no local optimizer at all
    assert res.update[PROMPT_KEY].abs().max().item() == pytest.approx(2e-3, rel=1e-3)
    tail_max = max(v.abs().max().item() for k, v in res.update.items() if k != PROMPT_KEY)
    assert tail_max == pytest.approx(3e-5, rel=1e-2)


def test_phase_optimizers_without_local_steps():
    from protocols.config import validate_config

    s = validate_config({"trainer": "sfprompt", "sfprompt": {"local_loss_steps": 0}}).sfprompt
    prompt, tail = torch.nn.Parameter(torch.zeros(2, 3)), [torch.nn.Parameter(torch.zeros(3))]
    local, split = phase_optimizers(prompt, tail, s, 0.01)
    assert local is None and _lrs(split) == (1e-3, 5e-5)
    assert split.param_groups[1]["weight_decay"] == 0.01


def test_lr_config_is_explicit_and_checked_in_one_line():
    from protocols.config import ConfigError, validate_config

    s = validate_config({"trainer": "sfprompt"}).sfprompt
    assert (s.tail_lr, s.prompt_lr, s.local_tail_lr, s.local_prompt_lr) == (5e-5, 1e-3, 5e-5, 1e-3)
    for key, bad in (("prompt_lr", 0), ("tail_lr", float("inf")), ("local_prompt_lr", -1e-3), ("local_tail_lr", 2.0),
                     ("tail_lr", float("nan"))):
        with pytest.raises(ConfigError) as e:
            validate_config({"trainer": "sfprompt", "sfprompt": {key: bad}})
        msg = str(e.value)
        assert "\n" not in msg and f"sfprompt.{key}" in msg and "(0, 1]" in msg, msg
    with pytest.raises(ConfigError, match="unknown key 'sfprompt.split_lr'"):
        validate_config({"sfprompt": {"split_lr": 1e-4}})
