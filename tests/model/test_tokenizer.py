from __future__ import annotations

import pytest
import torch

from model.tokenizer import BBQTokenizer, TokenizerConfig
from training.cli import TOKENIZER_VARIANTS as VARIANTS

MODS = (("text", 12), ("image", 10))


def batch(n: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = {name: torch.randn(n, d, generator=g) for name, d in MODS}
    return feats, torch.arange(n)


def config(**kw: object) -> TokenizerConfig:
    base: dict[str, object] = {
        "modalities": MODS,
        "num_items": 20,
        "id_dim": 6,
        "code_dim": 4,
        "hidden": 16,
        "levels": 2,
        "codebook_size": 8,
    }
    return TokenizerConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_returns_the_same_typed_output(variant: str) -> None:
    torch.manual_seed(0)
    model = BBQTokenizer(config(**VARIANTS[variant]))
    feats, items = batch()
    out = model(feats, items, feats, torch.roll(items, 1))
    assert set(out.parts) == {"recon", "rq", "club", "align", "anchor", "club_raw", "club_clamped"}
    assert out.codes.shape == (8, 2)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    if variant == "tiger":
        assert float(out.parts["club"].detach()) == 0.0
        assert float(out.parts["align"].detach()) == 0.0
    else:
        assert float(out.parts["align"].detach()) > 0.0


def test_views_follow_the_switches() -> None:
    assert config().views == ("text", "image", "id")
    assert config(id_dim=0).views == ("text", "image")
    assert len(BBQTokenizer(config(shared_codebook=False)).quantizers) == 4  # 3 views + fused
    assert len(BBQTokenizer(config()).quantizers) == 1


def test_tiger_refuses_behaviour_terms() -> None:
    with pytest.raises(ValueError, match="tiger=True"):
        config(tiger=True)


def test_club_estimator_is_not_stepped_by_the_main_optimiser() -> None:
    model = BBQTokenizer(config())
    main = {id(p) for p in model.main_parameters()}
    assert all(id(p) not in main for p in model.estimator_parameters())
    assert len(model.estimator_parameters()) > 0


def test_club_term_is_the_clamped_estimate_and_the_raw_one_is_logged_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = BBQTokenizer(config())
    fixed = {"text": -2.0, "image": 3.0}  # one modality clamped, one not
    for m, value in fixed.items():
        est = model.estimator(m)
        monkeypatch.setattr(est, "estimate", lambda x, y, v=value: x.sum() * 0.0 + v)
    feats, items = batch()
    parts = model(feats, items).parts
    assert float(parts["club"]) == pytest.approx(3.0)
    assert float(parts["club_raw"]) == pytest.approx(1.0)
    assert float(parts["club_clamped"]) == pytest.approx(0.5)
    assert not parts["club_raw"].requires_grad  # a diagnostic, never part of the loss


def test_cold_start_codes_need_no_item_and_are_deterministic() -> None:
    model = BBQTokenizer(config()).eval()
    feats, _ = batch(3)
    a = model.codes(feats, None)
    assert torch.equal(a, model.codes(feats, None))
    assert a.shape == (3, 2)


def test_decode_sid_adds_the_extra_level() -> None:
    model = BBQTokenizer(config()).eval()
    with torch.no_grad():
        model.extra_level.weight[1] = 1.0
    sid = torch.tensor([[3, 4, 0], [3, 4, 1]])
    diff = model.decode_sid(sid)[1] - model.decode_sid(sid)[0]
    assert torch.allclose(diff, torch.ones(4))


@pytest.mark.parametrize("variant", ["bbqrec", "tiger"])
def test_reconstruct_gives_every_modality_back_in_its_shape(variant: str) -> None:
    model = BBQTokenizer(config(**VARIANTS[variant])).eval()
    feats, items = batch(5)
    recon = model.reconstruct(feats, items)
    assert {m: r.shape for m, r in recon.items()} == {m: f.shape for m, f in feats.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_autocast_runs_every_variant(variant: str) -> None:
    """On CUDA the loop trains under bf16 autocast; CPU autocast runs the same mixed-precision
    path: a finite float32 loss and finite float32 gradients, the CLUB estimator's included."""
    torch.manual_seed(0)
    model = BBQTokenizer(config(**VARIANTS[variant]))
    feats, items = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if model.estimator_parameters():  # the estimator's own step, inside the loss as trained
            estimator_loss = model.estimator_loss(feats)
            assert torch.isfinite(estimator_loss)
            estimator_loss.backward()
        out = model(feats, items, feats, torch.roll(items, 1))
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
