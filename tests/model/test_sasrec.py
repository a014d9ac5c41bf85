from __future__ import annotations

import pytest
import torch

from model.sasrec import SASRec, SASRecConfig


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=50, max_len=8, dim=16, heads=2, layers=2)).eval()


def test_future_items_do_not_change_past_states(model: SASRec) -> None:
    a = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    b = a.clone()
    b[0, -1] = 42
    ha, hb = model(a).hidden, model(b).hidden
    assert torch.allclose(ha[:, :-1], hb[:, :-1], atol=1e-6)
    assert not torch.allclose(ha[:, -1], hb[:, -1])


def test_scores_do_not_depend_on_left_padding(model: SASRec) -> None:
    bare = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[-1, -1, -1, -1, -1, 3, 4, 5]])
    assert torch.allclose(model.scores(bare), model.scores(padded), atol=1e-5)


def test_all_padding_row_is_finite(model: SASRec) -> None:
    scores = model.scores(torch.full((2, 8), -1))
    assert torch.isfinite(scores).all()
    assert scores.shape == (2, 50)


def test_loss_ignores_padding_targets(model: SASRec) -> None:
    model.train()
    windows = torch.tensor([[-1, -1, -1, -1, -1, -1, 1, 2, 3]])
    loss = model.loss(windows)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.item_emb.weight.grad is not None
    # padding row of the embedding never receives gradient
    assert torch.count_nonzero(model.item_emb.weight.grad[0]) == 0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(num_items=5, dim=10, heads=3)


def test_bf16_autocast_loss_is_near_float32(model: SASRec) -> None:
    """The loop trains under bf16 autocast on CUDA; CPU autocast runs the same path here."""
    windows = torch.tensor([[-1, -1, -1, 4, 9, 1, 2, 3, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
    exact = model.loss(windows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.loss(windows)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=0.05)
    mixed.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert model.item_emb.weight.grad is not None
