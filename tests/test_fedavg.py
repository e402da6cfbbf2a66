import torch

from coordinator.mergers import ClientUpdate, get_merger


def test_fedavg_matches_hand_computed_example():
    # weights 1/4 and 3/4 by examples: 0.25*[1,2] + 0.75*[3,-2] = [2.5, -1.0]
    u1 = ClientUpdate(delta={"w": torch.tensor([1.0, 2.0])}, num_examples=10)
    u2 = ClientUpdate(delta={"w": torch.tensor([3.0, -2.0])}, num_examples=30)
    merged = get_merger("fedavg")([u1, u2], None)
    assert torch.allclose(merged["w"], torch.tensor([2.5, -1.0]))


def test_fedavg_single_client_is_identity():
    d = {"a": torch.randn(3, 4), "b": torch.randn(2)}
    merged = get_merger("fedavg")([ClientUpdate(delta=d, num_examples=7)], None)
    assert all(torch.equal(merged[k], d[k]) for k in d)
