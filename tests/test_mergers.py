"""Each merger against a small example computed by hand, plus the LoRA merge spaces."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.mergers import MERGERS, ClientUpdate, get_merger, merge_updates
from coordinator.mergers.dare import drop_and_rescale
from coordinator.mergers.lora_space import factor_to_rank
from coordinator.mergers.ties import trim_top_k
from protocols.config import MergeConfig


def _updates(*vectors, examples=None):
    examples = examples or [1] * len(vectors)
    return [ClientUpdate(delta={"w": torch.tensor(v, dtype=torch.float32)}, num_examples=n, client=f"c{i}")
            for i, (v, n) in enumerate(zip(vectors, examples))]


def test_registry_answers_to_every_config_name():
    from typing import get_args

    from protocols.config import MergerName

    assert set(MERGERS) == set(get_args(MergerName))


def test_task_arithmetic_hand_example():
    # weights K·n_i/N = 2·10/40, 2·30/40 = 0.5, 1.5; λ = 0.5:
    # 0.5 · (0.5·[1, 2] + 1.5·[3, -2]) = 0.5 · [5, -2] = [2.5, -1]  (= FedAvg, since λ = 1/K)
    ups = _updates([1.0, 2.0], [3.0, -2.0], examples=[10, 30])
    out = get_merger("task-arithmetic")(ups, MergeConfig(scaling=0.5))
    assert torch.allclose(out["w"], torch.tensor([2.5, -1.0]))
    assert torch.allclose(out["w"], get_merger("fedavg")(ups, None)["w"])
    # λ = 1 sums the task vectors: [1+3, 2-2]
    assert torch.allclose(get_merger("task-arithmetic")(_updates([1.0, 2.0], [3.0, -2.0]), None)["w"],
                          torch.tensor([4.0, 0.0]))


def test_ties_hand_example():
    # density 0.5 keeps 2 of 4 entries per client:
    #   [4, -1, 2, .5] -> [4, 0, 2, 0];  [-3, 2, 1, -5] -> [-3, 0, 0, -5];  [5, 3, -6, .1] -> [5, 0, -6, 0]
    # mass [6, 0, -4, -5] elects signs [+, + (tie), -, -]
    # disjoint means over agreeing nonzeros: [(4+5)/2, nothing -> 0, -6, -5]; λ = 2 doubles them
    ups = _updates([4.0, -1.0, 2.0, 0.5], [-3.0, 2.0, 1.0, -5.0], [5.0, 3.0, -6.0, 0.1])
    out = get_merger("ties")(ups, MergeConfig(density=0.5, scaling=2.0))
    assert torch.allclose(out["w"], torch.tensor([9.0, 0.0, -12.0, -10.0]))


def test_ties_weights_clients_by_examples():
    # weights 0.5 and 1.5 (density 1, nothing trimmed): [0.5·2, -0.5·4] and [1.5·-1, 1.5·2]
    # mass [1 - 1.5, -2 + 3] = [-.5, 1] -> signs [-, +]; entries [-1.5, 3]
    ups = _updates([2.0, -4.0], [-1.0, 2.0], examples=[1, 3])
    out = get_merger("ties")(ups, MergeConfig(density=1.0))
    assert torch.allclose(out["w"], torch.tensor([-1.5, 3.0]))


def test_trim_keeps_at_least_one_entry_per_client():
    t = torch.tensor([[1.0, -3.0, 2.0], [0.1, 0.2, -0.3]])
    assert torch.equal(trim_top_k(t, 0.01), torch.tensor([[0.0, -3.0, 0.0], [0.0, 0.0, -0.3]]))


def test_dare_ties_without_drops_is_sign_election_and_disjoint_mean():
    # density 1 drops nothing: mass [1+3, -2+1] -> signs [+, -]; means [(1+3)/2, -2]
    out = get_merger("dare-ties")(_updates([1.0, -2.0], [3.0, 1.0]), MergeConfig(density=1.0))
    assert torch.allclose(out["w"], torch.tensor([2.0, -2.0]))


def test_dare_drops_and_rescales_reproducibly_and_without_bias():
    t = torch.linspace(-1, 1, 4000)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    dropped = drop_and_rescale(t, 0.25, g(0))
    kept = dropped != 0
    assert torch.allclose(dropped[kept], t[kept] * 4)  # survivors are rescaled by 1/density
    assert abs(kept.float().mean().item() - 0.25) < 0.03
    mean = torch.stack([drop_and_rescale(t, 0.25, g(s)) for s in range(400)]).mean(0)
    assert (mean - t).abs().mean() < 0.05  # unbiased in expectation
    ups = [ClientUpdate(delta={"w": t}, num_examples=1, client="a")]
    cfg = MergeConfig(density=0.5, seed=3)
    first, again = get_merger("dare-ties")(ups, cfg)["w"], get_merger("dare-ties")(ups, cfg)["w"]
    assert torch.equal(first, again)
    other = get_merger("dare-ties")(ups, MergeConfig(density=0.5, seed=4))["w"]
    assert not torch.equal(first, other)


def test_pcb_hand_example():
    # T1 = [1, -2, 3, .5], T2 = [2, 1, -1, .5], K = 2, pcb_ratio .5 (keep the top 2 of 4 per client)
    # |T| clipped to rank 0 .. rank int(4·0.9999 - 1) = 2:  [1, 2, 2, .5] and [1, 1, 1, .5]
    # intra = exp(2·minmax²): [e^(2/9), e², e², 1] and [e², e², e², 1]
    # inter = tanh(T ⊙ (T1 + T2)), sum = [3, -1, 2, 1]: tanh[3, 2, 6, .5] and tanh[6, -1, -2, .5]
    # scores ≈ [1.24, 7.12, 7.39, .46] and [7.39, -5.63, -7.12, .46]; raised to their rank-2 value
    # (7.12 and .46) and min-max normalised: β1 = [0, 0, 1, 0], β2 = [1, 0, 0, 0]
    # merged = Σ clipped·β / Σβ = [1 (client 2), 0, 2 (client 1, clipped from 3), 0]
    out = get_merger("pcb")(_updates([1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 0.5]), MergeConfig(pcb_ratio=0.5))
    assert torch.allclose(out["w"], torch.tensor([1.0, 0.0, 2.0, 0.0]))
    assert math.isclose(math.exp(2 / 9) * math.tanh(3), 1.2426, rel_tol=1e-3)  # the arithmetic above


@pytest.mark.parametrize("name", sorted(MERGERS))
def test_every_merger_keeps_names_shapes_and_is_finite(name):
    g = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(delta={"a": torch.randn(3, 5, generator=g) * 1e-3, "b": torch.randn(7, generator=g),
                               "s": torch.randn((), generator=g)}, num_examples=i + 1, client=f"c{i}")
           for i in range(3)]
    out = get_merger(name)(ups, None)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ups[0].delta.items()}
    assert all(torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError):
        get_merger(name)([], None)


@pytest.mark.parametrize("name", ["fedavg", "task-arithmetic", "ties", "dare-ties"])
def test_identical_clients_merge_to_their_update(name):
    # K identical updates: sign election never conflicts, so the (disjoint) mean is the update itself
    d = {"w": torch.tensor([0.5, -1.0, 2.0, 0.0])}
    ups = [ClientUpdate(delta=d, num_examples=5, client=f"c{i}") for i in range(3)]
    cfg = MergeConfig(density=1.0, scaling=1 / 3 if name == "task-arithmetic" else 1.0)
    assert torch.allclose(get_merger(name)(ups, cfg)["w"], d["w"])


# ------------------------------------------------------------------ LoRA merge spaces
A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _lora_clients(change_a: bool):
    g = torch.Generator().manual_seed(1)
    glob = {A: torch.randn(2, 5, generator=g), B: torch.zeros(4, 2)}
    ups = []
    for i in range(2):
        delta = {A: torch.randn(2, 5, generator=g) * (1.0 if change_a else 0.0), B: torch.randn(4, 2, generator=g)}
        ups.append(ClientUpdate(delta=delta, num_examples=1, client=f"c{i}"))
    return glob, ups


def _product(state):
    return state[B].double() @ state[A].double()


def test_per_matrix_averaging_has_the_cross_term_of_peft_issue_3004():
    glob, ups = _lora_clients(change_a=True)
    merged = merge_updates(get_merger("fedavg"), ups, MergeConfig(lora_space="per-matrix"), glob)
    new = {k: glob[k] + merged[k] for k in glob}
    b1, a1 = ups[0].delta[B].double(), glob[A].double() + ups[0].delta[A].double()
    b2, a2 = ups[1].delta[B].double(), glob[A].double() + ups[1].delta[A].double()
    mean_of_products = (b1 @ a1 + b2 @ a2) / 2
    # (B1+B2)(A1+A2)/4 - (B1A1 + B2A2)/2 = -(B1-B2)(A1-A2)/4, by expanding the product
    assert torch.allclose(_product(new) - mean_of_products, -(b1 - b2) @ (a1 - a2) / 4, atol=1e-5)


def test_product_space_merges_delta_w_exactly_when_it_fits_the_rank():
    glob, ups = _lora_clients(change_a=False)  # ΔW_i = ΔB_i A: the mean has rank ≤ r
    merged = merge_updates(get_merger("fedavg"), ups, MergeConfig(lora_space="product"), glob)
    new = {k: glob[k] + merged[k] for k in glob}
    expected = (ups[0].delta[B].double() + ups[1].delta[B].double()) / 2 @ glob[A].double()
    assert torch.allclose(_product(new), expected, atol=1e-5)


def test_product_space_truncates_to_the_best_rank_r_approximation():
    glob, ups = _lora_clients(change_a=True)  # the mean of two rank-2 products has rank up to 4
    merged = merge_updates(get_merger("fedavg"), ups, MergeConfig(lora_space="product"), glob)
    new = {k: glob[k] + merged[k] for k in glob}
    assert new[A].shape == (2, 5) and new[B].shape == (4, 2)
    target = sum((glob[B].double() + u.delta[B].double()) @ (glob[A].double() + u.delta[A].double()) for u in ups) / 2
    s = torch.linalg.svdvals(target)
    # Eckart–Young: the error of the best rank-2 approximation is the norm of the dropped singular values
    assert math.isclose((_product(new) - target).norm().item(), s[2:].norm().item(), rel_tol=1e-4)


def test_product_space_passes_non_lora_tensors_per_matrix_and_factor_is_balanced():
    glob, ups = _lora_clients(change_a=False)
    glob["head"] = torch.zeros(3)
    for i, u in enumerate(ups):
        u.delta["head"] = torch.full((3,), float(i))
    merged = merge_updates(get_merger("fedavg"), ups, MergeConfig(lora_space="product"), glob)
    assert torch.allclose(merged["head"], torch.full((3,), 0.5))
    b, a = factor_to_rank(torch.diag(torch.tensor([4.0, 1.0, 0.0])), 2)
    assert torch.allclose(b @ a, torch.diag(torch.tensor([4.0, 1.0, 0.0])).double())
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1))  # √S on both sides
