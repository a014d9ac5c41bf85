from __future__ import annotations

import numpy as np
import pytest
import torch

from model.generative import (
    GenerativeRecommender,
    GenRecConfig,
    Trie,
    beam_search,
    item_pairs_to_tokens,
    shared_prefix_length,
    sid_tokens,
)

K, D, L, V = 4, 3, 2, 2
# toy catalogue: 10 unique SIDs (2 codes + extra level)
SIDS = np.array(
    [
        [0, 0, 0],
        [0, 0, 1],
        [0, 1, 0],
        [1, 2, 0],
        [1, 2, 1],
        [1, 2, 2],
        [2, 3, 0],
        [3, 0, 0],
        [3, 1, 0],
        [3, 1, 1],
    ]
)
VIEW_CODES = np.stack([SIDS[:, :L], (SIDS[:, :L] + 1) % K], axis=1)  # (N, V, L)


def config(**kw: object) -> GenRecConfig:
    base: dict[str, object] = {
        "sid_levels": D,
        "codebook_size": K,
        "num_views": V,
        "code_levels": L,
        "max_items": 5,
        "d_model": 16,
        "heads": 2,
        "d_kv": 8,
        "d_ff": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "dropout": 0.0,
        "item_dim": 8,
    }
    return GenRecConfig(**(base | kw))  # type: ignore[arg-type]


def histories() -> tuple[torch.Tensor, torch.Tensor]:
    items = np.array([[-1, -1, 0, 3, 4], [1, 2, 5, 6, 9], [-1, -1, -1, -1, 7], [-1] * 5])
    sids = np.where(items[..., None] >= 0, SIDS[items], -1)
    codes = np.where(items[..., None, None] >= 0, VIEW_CODES[items], -1)
    return torch.from_numpy(sids), torch.from_numpy(codes)


def test_sid_tokens_offset_each_level_and_keep_padding() -> None:
    tokens = sid_tokens(torch.tensor([[1, 2, 0], [-1, -1, -1]]), codebook_size=4)
    assert tokens.tolist() == [[2, 7, 9], [0, 0, 0]]


def test_shared_prefix_length_counts_leading_equal_codes() -> None:
    codes = torch.tensor([[[[1, 2]], [[1, 3]], [[2, 2]], [[-1, -1]]]])  # (1, 4, 1, 2)
    sim = shared_prefix_length(codes)[0, 0]
    assert sim[0].tolist() == [2, 1, 0, 0]
    assert sim[1, 2].item() == 0
    assert sim[3, 3].item() == 0  # padding shares nothing


def test_item_pair_values_reach_every_token_pair_of_the_two_items() -> None:
    values = torch.randn(2, 3, 5, 5)  # not symmetric: rows and columns must not swap
    out = item_pairs_to_tokens(values, 4)
    assert out.shape == (2, 3, 20, 20)
    t = torch.arange(20)
    assert torch.equal(out, values[:, :, t[:, None] // 4, t[None, :] // 4])


def test_zero_reweighting_equals_the_plain_transformer_exactly() -> None:
    torch.manual_seed(0)
    plain = GenerativeRecommender(config(reweight=False)).eval()
    weighted = GenerativeRecommender(config(reweight=True)).eval()
    weighted.load_state_dict(plain.state_dict())
    sids, codes = histories()
    target = torch.from_numpy(SIDS[[1, 2, 3, 4]])
    a, b = plain(sids, codes, target), weighted(sids, codes, target)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)
    with torch.no_grad():
        weighted.sim_bias[0, 0, 2] = 1.0
    assert not torch.equal(weighted(sids, codes, target).logits, a.logits)


def test_loss_trains_every_part() -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(config())
    sids, codes = histories()
    target_items = torch.tensor([1, 2, 3, 3])
    out = model(
        sids, codes, torch.from_numpy(SIDS[target_items.numpy()]), torch.randn(4, 8), target_items
    )
    assert out.logits.shape == (4, D, K)
    assert float(out.s2i_loss.detach()) > 0
    out.loss.backward()
    assert model.sim_bias.grad is not None
    assert torch.count_nonzero(model.sim_bias.grad) > 0
    assert model.seq_proj.weight.grad is not None


def test_trie_holds_exactly_the_catalogue() -> None:
    trie = Trie.from_sids(SIDS, K)
    assert trie.children[0].shape == (1, K)
    found = []
    for a in range(K):
        p1 = int(trie.children[0][0, a])
        if p1 < 0:
            continue
        for b in range(K):
            p2 = int(trie.children[1][p1, b])
            if p2 < 0:
                continue
            for e in range(K):
                item = int(trie.children[2][p2, e])
                if item >= 0:
                    found.append((item, (a, b, e)))
    assert sorted(found) == [(i, tuple(s)) for i, s in enumerate(SIDS.tolist())]


def exhaustive_scores(
    model: GenerativeRecommender, sids: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """(B, N) log-likelihood of every item's SID under teacher forcing."""
    B, N = sids.shape[0], len(SIDS)
    rows = []
    for b in range(B):
        s = sids[b : b + 1].expand(N, -1, -1)
        c = codes[b : b + 1].expand(N, -1, -1, -1)
        logits = model(s, c, torch.from_numpy(SIDS)).logits  # (N, D, K)
        logp = torch.log_softmax(logits, dim=-1)
        rows.append(logp.gather(2, torch.from_numpy(SIDS)[:, :, None]).squeeze(-1).sum(-1))
    return torch.stack(rows)


def test_incremental_decoding_equals_full_decode() -> None:
    """The cached one-token decoder steps of beam search = the decoder over the whole prefix,
    also when beams (rows of the cache) repeat an encoder row."""
    torch.manual_seed(3)
    model = GenerativeRecommender(config()).eval()
    sids, codes = histories()
    with torch.no_grad():
        enc = model.encode(sids, codes)
        beams = 3
        targets = sid_tokens(torch.from_numpy(SIDS[[0, 4, 8] * len(sids)]), K)  # (B*3, D)
        prefix = torch.cat([torch.full_like(targets[:, :1], model.config.bos), targets], dim=1)
        full = model.decode(enc, prefix[:, :D])  # (B*3, D, K)
        cross, past = model.cross_keys_values(enc), None
        for d in range(D):
            step, past = model.decode_step(enc, cross, past, prefix[:, d], d)
            assert step.shape == (len(sids) * beams, K)
            torch.testing.assert_close(step, full[:, d], atol=1e-5, rtol=1e-5)


def test_full_beam_equals_exhaustive_scoring() -> None:
    torch.manual_seed(1)
    model = GenerativeRecommender(config()).eval()
    sids, codes = histories()
    expected = exhaustive_scores(model, sids, codes)
    result = beam_search(
        model, sids, codes, Trie.from_sids(SIDS, K).children, k=len(SIDS), beam=len(SIDS)
    )
    for b in range(len(sids)):
        order = torch.argsort(expected[b], descending=True)
        assert result.items[b].tolist() == order.tolist()
        assert torch.allclose(result.scores[b], expected[b][order], atol=1e-5)


def test_beam_returns_valid_distinct_sorted_items_and_excludes_seen() -> None:
    torch.manual_seed(2)
    model = GenerativeRecommender(config()).eval()
    sids, codes = histories()
    exclude = torch.tensor([[0, 3, 4, -1, -1], [1, 2, 5, 6, 9], [7, -1, -1, -1, -1], [-1] * 5])
    result = beam_search(
        model, sids, codes, Trie.from_sids(SIDS, K).children, k=4, beam=4, exclude=exclude
    )
    for b in range(len(sids)):
        items = [i for i in result.items[b].tolist() if i >= 0]
        assert len(items) == len(set(items))
        assert all(0 <= i < len(SIDS) for i in items)
        assert not set(items) & set(exclude[b].tolist())
        s = result.scores[b][: len(items)]
        assert (s[:-1] >= s[1:]).all()
    assert (result.items[1] >= 0).sum() == 4  # 5 seen, 5 left: still k results


def test_a_beam_narrower_than_k_keeps_k_prefixes() -> None:
    model = GenerativeRecommender(config()).eval()
    sids, codes = histories()
    trie = Trie.from_sids(SIDS, K).children
    narrow = beam_search(model, sids, codes, trie, k=5, beam=3)
    at_k = beam_search(model, sids, codes, trie, k=5, beam=torch.tensor(5))
    assert torch.equal(narrow.items, at_k.items)
    assert torch.equal(narrow.scores, at_k.scores)


def test_all_padding_history_is_finite() -> None:
    model = GenerativeRecommender(config()).eval()
    sids, codes = histories()
    out = model(sids[3:], codes[3:], torch.from_numpy(SIDS[:1]))
    assert torch.isfinite(out.logits).all()


def test_bf16_autocast_trains_like_float32() -> None:
    """On CUDA the loop trains under bf16 autocast (`TrainConfig.amp`); CPU autocast runs the
    same mixed-precision code path here: no dtype clash, a finite loss near the float32 one,
    and a gradient for every parameter, in float32."""
    torch.manual_seed(0)
    model = GenerativeRecommender(config())
    with torch.no_grad():
        model.sim_bias.normal_()  # non-zero reweighting: its bf16 path runs too
    sids, codes = histories()
    target_items = torch.tensor([1, 2, 3, 3])
    args = (sids, codes, torch.from_numpy(SIDS[target_items.numpy()]), torch.randn(4, 8))
    exact = model(*args, target_items).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(*args, target_items).loss
    assert mixed.dtype == torch.float32
    assert torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(exact.item(), rel=0.05)
    mixed.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
