from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model.generative import Trie, beam_search
from service.bundle import Bundle, Catalogue
from service.manifest import BundleError, sha256, space_of
from tests.conftest import train_and_export
from training.cli import app
from training.data import PAD, left_pad, load_dataset, trim_padding
from training.features import TextEncoder
from training.generative import load_generative

runner = CliRunner()


def histories(batch: int, max_len: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """Lengths cycling through 0 (all padding) .. max_len."""
    rows = [rng.integers(0, n, size=b % (max_len + 1)) for b in range(batch)]
    return left_pad(rows, max_len)


TIE = 1e-5  # scores closer than this are a tie: ONNX Runtime and PyTorch differ by ~1e-6


def tie_groups(scores: np.ndarray) -> list[slice]:
    """Runs of consecutive ranks whose scores are within TIE of the previous one."""
    cuts = [0, *(np.flatnonzero(np.abs(np.diff(scores)) > TIE) + 1).tolist(), len(scores)]
    return [slice(a, b) for a, b in pairwise(cuts)]


def assert_same_ranking(items: np.ndarray, scores: np.ndarray, ref_items: np.ndarray) -> None:
    """Equal lists, except that the order within a tie may differ; a tie that runs past the
    k-th rank may be cut at different items."""
    for row, ref, row_scores in zip(items, ref_items, scores, strict=True):
        groups = tie_groups(row_scores)
        for g in groups[:-1]:
            assert sorted(row[g].tolist()) == sorted(ref[g].tolist())
        if groups[-1].stop - groups[-1].start == 1:
            assert row[groups[-1]].tolist() == ref[groups[-1]].tolist()


def assert_bundle_equals_eager(
    run: Path, bundle_dir: Path, h: np.ndarray, k: int, exclude: np.ndarray
) -> np.ndarray:
    """The bundle's top-k through ONNX Runtime equals the run's PyTorch beam search (scores
    within 1e-4, ranks up to ties); returns the bundle's items."""
    model, tables, ckpt = load_generative(run)
    items, scores = Bundle(bundle_dir).recommend(h, k, exclude)
    sids, codes = tables.gather(h)
    ref = beam_search(
        model,
        torch.from_numpy(sids),
        torch.from_numpy(codes),
        Trie.from_sids(tables.sids, model.config.codebook_size).children,
        k=k,
        beam=max(ckpt["meta"]["beam"], k),
        exclude=torch.from_numpy(exclude),
    )
    assert np.abs(scores - ref.scores.numpy()).max() < 1e-4
    assert_same_ranking(items, scores, ref.items.numpy())
    return items


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_onnx_runtime_equals_pytorch_beam_search(
    exported: tuple[Path, Path], batch: int, k: int
) -> None:
    run, bundle_dir = exported
    model, tables, _ = load_generative(run)
    rng = np.random.default_rng(batch * 1000 + k)
    h = histories(batch, model.config.max_items, rng, len(tables.sids))
    exclude = np.where(rng.random(h.shape) < 0.5, h, PAD)
    items = assert_bundle_equals_eager(run, bundle_dir, h, k, exclude)
    assert items.shape == (batch, k)
    for row, ex in zip(items, exclude, strict=True):
        assert not set(row.tolist()) & set(ex[ex >= 0].tolist())


def test_leading_padding_does_not_change_the_answer(exported: tuple[Path, Path]) -> None:
    """Both runtimes run on the batch's longest history (`trim_padding`); the answer for the
    same histories padded to the model's full length is the same, in PyTorch and in the graph
    (the reweighting's similarity bias included: the run trained it away from zero)."""
    run, bundle_dir = exported
    model, tables, ckpt = load_generative(run)
    assert model.sim_bias.abs().max() > 0
    m = model.config.max_items
    rng = np.random.default_rng(7)
    rows = [rng.integers(0, len(tables.sids), size=1 + b % (m // 2)) for b in range(16)]
    padded, trimmed = left_pad(rows, m), left_pad(rows, m // 2)
    assert trim_padding(padded).tolist() == trimmed.tolist()
    trie = Trie.from_sids(tables.sids, model.config.codebook_size).children

    def eager(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sids, codes = tables.gather(h)
        r = beam_search(
            model,
            torch.from_numpy(sids),
            torch.from_numpy(codes),
            trie,
            k=10,
            beam=ckpt["meta"]["beam"],
            exclude=torch.from_numpy(h),
        )
        return r.items.numpy(), r.scores.numpy()

    full_items, full_scores = eager(padded)
    items, scores = eager(trimmed)
    assert np.abs(scores - full_scores).max() < 1e-5
    assert_same_ranking(items, scores, full_items)
    ort_items, ort_scores = Bundle(bundle_dir).recommend(padded, 10, padded)
    assert np.abs(ort_scores - full_scores).max() < 1e-4
    assert_same_ranking(ort_items, ort_scores, full_items)


@pytest.fixture(scope="module")
def exported_plain(
    tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A run of the plain model (no similarity reweighting, no s2i: TIGER's), and its bundle."""
    return train_and_export(tmp_path_factory.mktemp("plain"), tiny_tokenizer, "--variant", "plain")


def test_a_model_without_the_reweighting_exports_and_serves(
    exported_plain: tuple[Path, Path],
) -> None:
    """Its graph reads no view codes, so the exporter drops that input: the manifest declares
    what the graph takes, the bundle loads and feeds exactly that, and ORT equals PyTorch."""
    run, bundle_dir = exported_plain
    model, tables, _ = load_generative(run)
    assert not model.config.reweight
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert "view_table" not in manifest["recommender"]["inputs"]
    assert {"histories", "exclude", "sid_table", "trie_0"} <= set(manifest["recommender"]["inputs"])
    h = histories(16, model.config.max_items, np.random.default_rng(3), len(tables.sids))
    assert_bundle_equals_eager(run, bundle_dir, h, 10, h)


def test_the_beam_width_is_a_runtime_input(exported: tuple[Path, Path]) -> None:
    """A bundle opened with another beam width searches with it, as PyTorch does, without
    re-export."""
    run, bundle_dir = exported
    model, tables, ckpt = load_generative(run)
    assert ckpt["meta"]["beam"] == 20
    rng = np.random.default_rng(5)
    h = histories(64, model.config.max_items, rng, len(tables.sids))
    sids, codes = tables.gather(h)
    trie = Trie.from_sids(tables.sids, model.config.codebook_size).children
    for beam in (1, 5, 20):
        ref = beam_search(
            model, torch.from_numpy(sids), torch.from_numpy(codes), trie, k=5, beam=beam
        )
        items, scores = Bundle(bundle_dir, beam=beam).recommend(h, 5)
        assert np.abs(scores - ref.scores.numpy()).max() < 1e-4
        assert_same_ranking(items, scores, ref.items.numpy())
    with pytest.raises(ValueError, match="beam must be >= 1"):
        Bundle(bundle_dir, beam=0)


def test_a_beam_of_one_is_greedy(exported: tuple[Path, Path]) -> None:
    """Exclude every item under the greedy path's last prefix: a beam of 1 has nothing left to
    return, a beam of 20 still finds an item elsewhere, so an ignored beam input would fail."""
    _, bundle_dir = exported
    greedy, wide = Bundle(bundle_dir, beam=1), Bundle(bundle_dir)
    h = left_pad([np.array([3, 17, 42])], greedy.max_history)
    first = int(greedy.recommend(h, 1)[0][0, 0])
    sids = greedy.catalogue.sids
    siblings = np.flatnonzero((sids[:, :-1] == sids[first, :-1]).all(axis=1))
    exclude = siblings[None, :]
    assert greedy.recommend(h, 1, exclude)[0].tolist() == [[-1]]
    found = int(wide.recommend(h, 1, exclude)[0][0, 0])
    assert found >= 0
    assert found not in siblings


@pytest.mark.parametrize("served", [[], ["--k", "10", "--beam", "5"]])
def test_bundle_evaluation_equals_pytorch_evaluation(
    exported: tuple[Path, Path], served: list[str]
) -> None:
    """Also as served with k = 10 and a narrower beam (the search keeps max(k, beam) = 10)."""
    run, bundle_dir = exported
    by_run = runner.invoke(app, ["evaluate", "--run", str(run), "--split", "valid", *served])
    by_bundle = runner.invoke(
        app, ["evaluate", "--bundle", str(bundle_dir), "--split", "valid", *served]
    )
    assert by_run.exit_code == 0, by_run.output
    assert by_bundle.exit_code == 0, by_bundle.output
    a, b = json.loads(by_run.output), json.loads(by_bundle.output)
    assert max(abs(a[key] - b[key]) for key in a) < 1e-6
    cutoffs = ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    assert set(a) == {*cutoffs, "users"} | ({"recall@20", "ndcg@20"} if not served else set())


def test_manifest_describes_the_bundle(exported: tuple[Path, Path]) -> None:
    _, bundle_dir = exported
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["beam"] == 20
    assert manifest["recommender"]["inputs"]["beam"] == []
    assert manifest["sid_depth"] == 3
    assert manifest["codebook_size"] == 64
    assert manifest["versions"]["onnx_opset"] >= 18
    assert set(manifest["files"]) >= {
        "recommender.onnx",
        "quantizer.onnx",
        "sids.npy",
        "item_ids.txt",
        "view_codes.npy",
        "popularity.npy",
    }
    assert manifest["training"]["test"]["users"] == 2928


def test_the_sid_space_names_the_tokenizer(
    exported: tuple[Path, Path],
    tiny_tokenizer: Path,
    retokenized: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Bundles of one tokenizer share their SID space (the hash of its artifact, whatever the
    run); another tokenizer's bundle has another. A manifest without it gets one from its SID
    table and quantizer; one that is no hex string (it names Redis keys) is refused."""
    bundle = Bundle(exported[1])
    files = (sha256(tiny_tokenizer / name) for name in ("tokenizer.pt", "sids.npy"))
    assert bundle.sid_space == bundle.manifest["sid_space"] == space_of(*files)
    assert Bundle(retokenized[1]).sid_space != bundle.sid_space
    copy = tmp_path / "b"
    shutil.copytree(exported[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["sid_space"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    digests = manifest["files"]
    assert Bundle(copy).sid_space == space_of(digests["sids.npy"], digests["quantizer.onnx"])
    manifest["sid_space"] = "../../etc"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="sid_space"):
        Bundle(copy)


@pytest.mark.parametrize("damage", ["corrupt", "missing", "version"])
def test_damaged_bundles_are_refused(
    exported: tuple[Path, Path], tmp_path: Path, damage: str
) -> None:
    _, bundle_dir = exported
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    if damage == "corrupt":
        with (copy / "sids.npy").open("r+b") as f:
            f.seek(-1, 2)
            f.write(b"\x07")
        match = r"sids\.npy: sha256 does not match"
    elif damage == "missing":
        (copy / "quantizer.onnx").unlink()
        match = r"quantizer\.onnx: listed in the manifest but missing"
    else:
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["format_version"] = 99
        (copy / "manifest.json").write_text(json.dumps(manifest))
        match = "format version 99"
    with pytest.raises(BundleError, match=match):
        Bundle(copy)


def test_an_item_added_through_the_tables_is_recommended(exported: tuple[Path, Path]) -> None:
    _, bundle_dir = exported
    bundle = Bundle(bundle_dir)
    cat = bundle.catalogue
    h = left_pad([np.array([3, 17, 42])], bundle.max_history)
    best = int(bundle.recommend(h, 1)[0][0, 0])
    # serve a catalogue without the best item: it cannot be returned
    keep = [i for i in range(len(cat.item_ids)) if i != best]
    bundle.catalogue = Catalogue(
        item_ids=[cat.item_ids[i] for i in keep],
        sids=cat.sids[keep],
        view_codes=cat.view_codes[keep],
        popularity=cat.popularity[keep],
        codebook_size=cat.codebook_size,
    )
    remapped = np.array([[keep.index(i) if i >= 0 else PAD for i in h[0]]])
    top = int(bundle.recommend(remapped, 1)[0][0, 0])
    assert bundle.catalogue.item_ids[top] != cat.item_ids[best]
    # add it back as a new item at the end of the tables: now it is the top recommendation
    bundle.catalogue = bundle.catalogue.with_item("new-item", cat.sids[best], cat.view_codes[best])
    new = len(keep)
    assert bundle.catalogue.item_ids[new] == "new-item"
    assert int(bundle.recommend(remapped, 1)[0][0, 0]) == new


def test_quantizer_gives_codes_for_new_items(exported: tuple[Path, Path]) -> None:
    _, bundle_dir = exported
    bundle = Bundle(bundle_dir)
    ds = load_dataset()
    feats = {m: ds.features[m][:5] for m in ("clip_vitb32_image", "clip_vitb32_text")}
    codes, view_codes = bundle.quantize(feats)
    assert codes.shape == (5, 2)
    assert ((codes >= 0) & (codes < 64)).all()
    assert view_codes.shape == (5, 2, 2)  # the no-id tokenizer: image and text views
    assert ((view_codes >= 0) & (view_codes < 64)).all()
    extra = bundle.catalogue.next_extra(codes[0])
    assert 0 <= extra < 64
    assert not (bundle.catalogue.sids == np.array([*codes[0], extra])).all(axis=1).any()
    with pytest.raises(ValueError, match="missing modality"):
        bundle.quantize({"clip_vitb32_image": feats["clip_vitb32_image"]})


def test_bench_measures_every_configuration(exported: tuple[Path, Path]) -> None:
    from training.bench import bench, markdown

    run, bundle_dir = exported
    report = bench(run, bundle_dir, load_dataset(), batches=[1, 2], ks=[1, 5], repeats=2, beam=3)
    results = report.timings
    assert {(r.batch, r.k, r.threads) for r in results} == {
        (b, k, t) for b in (1, 2) for k in (1, 5) for t in (1, 2)
    }
    assert all(r.eager_ms[0] > 0 and r.ort_ms[0] > 0 for r in results)
    # the same search does more products for a larger batch, and for a larger k (wider beam)
    gflop = {(r.batch, r.k): r.gflop for r in results}
    assert 0 < gflop[1, 1] < gflop[2, 1]
    assert gflop[1, 1] < gflop[1, 5]
    assert set(report.peaks) == {1, 2}
    assert all(rate > 0 for rate in report.peaks.values())
    assert markdown(report).count("\n") == len(results) + 3


def test_bundle_text_encoder_equals_the_training_encoder(
    text_exported: tuple[Path, Path], exported: tuple[Path, Path]
) -> None:
    """Raw text through the bundle (tokenizers + ONNX Runtime) = the training text features,
    for a batch of different lengths (padding) and a text longer than the encoder's limit."""
    bundle = Bundle(text_exported[1])
    assert bundle.text is not None
    assert bundle.manifest["text_encoder"]["modality"] == "text"
    texts = ["beaker", "nitrile gloves, size M, box of 100", " ".join(["pipette"] * 400)]
    expected = TextEncoder().encode(texts)
    np.testing.assert_allclose(bundle.text.embed(texts), expected, atol=1e-5)
    assert Bundle(exported[1]).text is None  # no text modality, no encoder shipped
