"""Data-parallel training: the sharding and loss-scaling arithmetic in one process, then two real
gloo processes launched by torchrun through the `bbqrec train` CLI against one process."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model.generative import GenerativeRecommender, GenRecConfig
from training.cli import app
from training.data import EMBEDDED_DATASET, leave_one_out, load_dataset, training_prefixes
from training.distributed import SINGLE, Distributed, global_batches
from training.generative import Batch, CatalogueTables
from training.loop import LAST, TrainConfig, fit, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
USERS = 200  # users of the embedded dataset kept for the multi-process runs
BATCH = 81  # 1,054 training examples = 13 batches of 81 + one of 1: rank 1 gets no row of it


def test_shards_split_each_global_batch_in_order() -> None:
    rows = np.arange(10, 17)  # a global batch of 7 training examples
    for world in (1, 2, 3, 8):
        parts = [Distributed(rank=r, world_size=world).shard(rows) for r in range(world)]
        real = [p for p in parts if p.scale > 0]
        assert np.concatenate([p.rows for p in real]).tolist() == rows.tolist()
        assert [p.offset for p in real] == np.cumsum([0] + [len(p.rows) for p in real])[
            :-1
        ].tolist()
        assert np.mean([p.scale for p in parts]) == pytest.approx(1.0)
        for p in parts[len(real) :]:  # more ranks than rows: a zero-weight stand-in row
            assert p.rows.tolist() == [10]
            assert p.scale == 0.0
    assert len([p for p in parts if p.scale == 0]) == 1  # world 8, 7 rows


def test_length_grouped_batches_cover_every_row_once_in_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 21, size=1000)
    batches = list(global_batches(np.random.default_rng(3), 1000, 8, lengths))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert [len(b) for b in batches].count(8) == 125
    # a group of GROUP_BATCHES batches spans the whole length range: sorted inside it, a batch
    # of 8 covers one to three neighbouring lengths, where a random batch of 8 covers most of it
    spread = [int(np.ptp(lengths[b])) for b in batches]
    random_spread = [int(np.ptp(lengths[b])) for b in global_batches(rng, 1000, 8)]
    assert max(spread) <= 2 < min(random_spread)
    assert np.mean(spread) < 1
    again = list(global_batches(np.random.default_rng(3), 1000, 8, lengths))
    assert all(a.tolist() == b.tolist() for a, b in zip(batches, again, strict=True))
    with pytest.raises(ValueError, match="shape"):
        next(global_batches(rng, 1000, 8, lengths[:10]))


def test_shards_weighted_by_loss_terms() -> None:
    sizes = np.array([1, 5, 2, 2, 0, 4])  # real positions per SASRec window
    rows = np.array([5, 1, 2, 3])  # 4 + 5 | 2 + 2 terms
    parts = [Distributed(rank=r, world_size=2).shard(rows, sizes) for r in range(2)]
    assert [p.scale for p in parts] == pytest.approx([2 * 9 / 13, 2 * 4 / 13])


def tiny_tables(rng: np.random.Generator) -> CatalogueTables:
    n, levels, views, code_levels = 12, 3, 2, 2
    sids = rng.integers(0, 4, size=(n, levels))
    return CatalogueTables(
        sids=sids,
        view_codes=rng.integers(0, 4, size=(n, views, code_levels)),
        item_repr=rng.normal(size=(n, 8)).astype(np.float32),
    )


def test_scaled_shard_losses_average_to_the_global_loss_and_gradient() -> None:
    """What DDP computes (the mean over ranks of each rank's scaled loss and gradient) equals
    the global batch's loss and gradient, s2i negatives included, for an uneven split and for
    more ranks than rows."""
    rng = np.random.default_rng(0)
    tables = tiny_tables(rng)
    histories = rng.integers(-1, 12, size=(7, 4))
    histories[:, -1] = rng.integers(0, 12, size=7)  # at least one real item per history
    targets = np.array([3, 5, 3, 8, 1, 5, 3])  # duplicates: masked out of each other's negatives
    rows = np.arange(7)
    torch.manual_seed(0)
    model = GenerativeRecommender(
        GenRecConfig(
            sid_levels=3,
            codebook_size=4,
            num_views=2,
            code_levels=2,
            max_items=4,
            d_model=16,
            heads=2,
            d_kv=8,
            d_ff=32,
            encoder_layers=1,
            decoder_layers=1,
            dropout=0.0,
            item_dim=8,
        )
    )
    device = torch.device("cpu")

    def loss_and_grads(part_of: Distributed) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        batch = Batch.of(tables, histories, targets, rows, part_of.shard(rows), device)
        loss = batch.loss(model)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole_loss, whole_grads = loss_and_grads(SINGLE)
    out = model(
        *map(torch.from_numpy, tables.gather(histories)),
        torch.from_numpy(tables.sids[targets]),
        torch.from_numpy(tables.item_repr[targets]),
        torch.from_numpy(targets),
    )
    assert out.s2i_loss.item() > 0  # the in-batch contrastive term takes part
    assert whole_loss == pytest.approx(out.loss.item(), abs=1e-6)
    for world in (3, 8):
        ranks = [loss_and_grads(Distributed(rank=r, world_size=world)) for r in range(world)]
        assert np.mean([loss for loss, _ in ranks]) == pytest.approx(whole_loss, abs=1e-6)
        for i, grad in enumerate(whole_grads):
            mean = torch.stack([grads[i] for _, grads in ranks]).mean(0)
            torch.testing.assert_close(mean, grad, atol=1e-6, rtol=1e-5)


def test_a_stage_without_ddp_refuses_to_run_under_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        fit(
            model,
            model_config={},
            loss_fn=lambda batch: model(batch).sum(),
            batches=lambda rng: [torch.ones(1, 2)],
            validate=lambda: {"ndcg@10": 0.0},
            config=TrainConfig(epochs=1),
            run_dir=tmp_path,
            meta={},
            progress=False,
        )


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded catalogue (so the shared tiny tokenizer applies) with its first 200 users."""
    root = tmp_path_factory.mktemp("ddp") / "dataset"
    root.mkdir()
    for name in os.listdir(EMBEDDED_DATASET):
        if name != "sequences.jsonl.gz":
            (root / name).symlink_to(EMBEDDED_DATASET / name)
    with gzip.open(EMBEDDED_DATASET / "sequences.jsonl.gz", "rt") as f:
        users = [next(f) for _ in range(USERS)]
    with gzip.open(root / "sequences.jsonl.gz", "wt") as f:
        f.writelines(users)
    return root


def bbqrec_train(
    out: Path, tokenizer: Path, dataset: Path, config: Path, *, epochs: int, procs: int
) -> None:
    """`bbqrec train` in this process (procs=1) or under torchrun, one thread per process."""
    args = ["train", "--out", str(out), "--tokenizer", str(tokenizer), "--dataset", str(dataset)]
    args += ["--config", str(config), "--epochs", str(epochs), "--no-progress", "--device", "cpu"]
    if procs == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = CliRunner().invoke(app, args)
        finally:
            torch.set_num_threads(threads)
        assert result.exit_code == 0, result.output
        return
    # --standalone: a rendezvous on a free loopback port
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, *launch, "-m", "training.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_train_like_one_and_resume(
    tiny_tokenizer: Path, small_dataset: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc-per-node 2 -m training.cli train` (gloo) against one process on the
    same global batches: per-epoch losses within 1e-5 relative and weights within 1e-5 after
    two epochs, the second epoch resumed from the two-process run's `last.pt`. Dropout is off:
    a process's dropout masks cover only its rows, so with dropout the runs agree only in
    distribution."""
    split = leave_one_out(load_dataset(small_dataset), 20)
    assert len(training_prefixes(split.train, 20)[1]) % BATCH == 1  # the 1-row last batch
    config = tmp_path / "gen.json"
    model = {"d_model": 16, "heads": 2, "d_kv": 8, "d_ff": 32, "dropout": 0.0}
    model |= {"encoder_layers": 1, "decoder_layers": 1}
    config.write_text(json.dumps({"model": model, "train": {"batch_size": BATCH}}))

    one, two = tmp_path / "one", tmp_path / "two"
    bbqrec_train(one, tiny_tokenizer, small_dataset, config, epochs=2, procs=1)
    bbqrec_train(two, tiny_tokenizer, small_dataset, config, epochs=1, procs=2)
    first = json.loads((two / "history.json").read_text())
    bbqrec_train(two, tiny_tokenizer, small_dataset, config, epochs=2, procs=2)  # resumes

    a, b = load_checkpoint(one / LAST), load_checkpoint(two / LAST)
    assert a["epoch"] == b["epoch"] == 2
    assert b["history"][:1] == first
    losses_a = [h["loss"] for h in a["history"]]
    assert [h["loss"] for h in b["history"]] == pytest.approx(losses_a, rel=1e-5)
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, atol=1e-5, rtol=1e-4)
    assert len(b["rank_rng"]) == 2  # each rank's RNG, for an exact resume
    results = json.loads((two / "results.json").read_text())  # written by rank 0 alone
    assert results["hardware"]["world_size"] == 2
    assert results["hardware"]["backend"] == "gloo"
    assert "world_size" not in json.loads((one / "results.json").read_text())["hardware"]
