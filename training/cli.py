"""`bbqrec`: the command line. Strings become classes and configs here, at the edge, once."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from training.data import (
    EMBEDDED_DATASET,
    PROBE_SPLITS,
    Dataset,
    DatasetError,
    leave_one_out,
    load_dataset,
    probe_split,
)
from training.evaluation import NDCG_KS, RECALL_KS

if TYPE_CHECKING:
    from service.settings import Settings
    from training.loop import FitResult

app = typer.Typer(help="BBQRec: train, evaluate, export and serve.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DatasetArg = Annotated[
    Path,
    typer.Argument(help="Dataset directory in the shared schema (default: the embedded one)."),
]
DatasetOpt = Annotated[
    Path, typer.Option("--dataset", help="Dataset directory (default: the embedded one).")
]
TimeBudgetOpt = Annotated[
    float | None,
    typer.Option(
        help="Overrides train.time_budget_s: stop after the epoch that crosses this many "
        "seconds of the training loop (validations included), validated, then test."
    ),
]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _load(path: Path) -> Dataset:
    try:
        return load_dataset(path)
    except DatasetError as e:
        raise _fail(str(e)) from e


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """What a result was measured on, stored next to every result.

    The CPU model and the SIMD level torch dispatches to are recorded because a seeded CPU run
    repeats bit for bit on one machine, while the same command on another VM has given close,
    not identical, figures (other kernels, other rounding; docs/RESULTS.md).
    """
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        info["world_size"] = torch.distributed.get_world_size()
        info["backend"] = torch.distributed.get_backend()
    return info


def write_results(
    out: Path,
    ds: Dataset,
    config: dict[str, Any],
    result: FitResult,
    test: dict[str, float],
    start: float,
) -> None:
    """`OUT/results.json`: command, config, selection, test metrics, wall time, hardware."""
    summary = {
        "command": "bbqrec " + " ".join(sys.argv[1:]),
        "dataset": str(ds.root),
        "config": config,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_by": result.stopped_by,
        "valid": result.best_metrics,
        "test": test,
        "train_wall_seconds": round(result.wall_seconds, 1),
        "total_wall_seconds": round(time.perf_counter() - start, 1),
        "hardware": hardware(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    typer.echo(json.dumps({"valid": result.best_metrics, "test": test}, indent=2))


def build_config(cls: type, section: dict[str, Any], **overrides: Any) -> Any:
    """Build a frozen config dataclass from a JSON section plus CLI overrides; unknown keys fail."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise _fail(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    values = dict(section) | {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise _fail(f"{cls.__name__}: {e}") from e


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(f"{path}: cannot read JSON config ({e})") from e
    if not isinstance(config, dict):
        raise _fail(f"{path}: a config is a JSON object with 'model' and 'train' sections")
    return config


@data_app.command("stats")
def data_stats(dataset: DatasetArg = EMBEDDED_DATASET, max_len: int = 20) -> None:
    """Counts, sequence lengths, split sizes and modalities of a dataset."""
    from training.features import available_modalities

    ds = _load(dataset)
    lengths = np.array([len(s) for s in ds.sequences])
    split = leave_one_out(ds, max_len)
    stats = {
        "dataset": str(ds.root),
        "users": ds.num_users,
        "items": ds.num_items,
        "interactions": ds.num_interactions,
        "density": ds.num_interactions / (ds.num_users * ds.num_items),
        "seq_len": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 3),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "items_with_text": sum(1 for t in ds.item_text if t),
        "eval_users": len(split.test),
        "train_targets": int(sum(max(len(s) - 1, 0) for s in split.train)),
        "modalities": {
            name: list(ds.features[name].shape) if name in ds.features else "computed (MiniLM)"
            for name in available_modalities(ds)
        },
    }
    typer.echo(json.dumps(stats, indent=2))


@app.command()
def features(
    dataset: DatasetArg = EMBEDDED_DATASET,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache directory.")] = None,
) -> None:
    """Compute (or find cached) text features and list every modality with its shape."""
    from training.features import DEFAULT_CACHE_DIR, available_modalities, load_modalities

    ds = _load(dataset)
    cache = cache_dir or DEFAULT_CACHE_DIR
    mods = load_modalities(ds, available_modalities(ds), cache_dir=cache)
    for name, matrix in mods.items():
        typer.echo(f"{name}: {matrix.shape[0]} x {matrix.shape[1]} float32")


@app.command("train-sasrec")
def train_sasrec_cmd(
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, history, results).")],
    dataset: DatasetOpt = EMBEDDED_DATASET,
    config: Annotated[Path | None, typer.Option(help="JSON with 'model'/'train' sections.")] = None,
    seed: Annotated[int | None, typer.Option(help="Overrides train.seed.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Overrides train.epochs.")] = None,
    time_budget: TimeBudgetOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the SASRec baseline; resumes from OUT/last.pt when present. Data-parallel when
    launched by torchrun (see `training.distributed`)."""
    from model.sasrec import SASRecConfig
    from training.distributed import launched
    from training.loop import TrainConfig
    from training.sasrec import train_sasrec

    ds = _load(dataset)
    cfg = read_config_file(config)
    model_cfg = build_config(SASRecConfig, cfg.get("model", {}), num_items=ds.num_items)
    train_cfg = build_config(
        TrainConfig, cfg.get("train", {}), seed=seed, epochs=epochs, time_budget_s=time_budget
    )
    start = time.perf_counter()
    with launched(device) as dist:
        _, result, test = train_sasrec(
            ds, model_cfg, train_cfg, out, device=device, progress=progress, dist=dist
        )
        config_used = {"model": asdict(model_cfg), "train": asdict(train_cfg)}
        if dist.is_main:
            write_results(out, ds, config_used, result, test, start)


@app.command()
def evaluate(
    run: Annotated[
        Path | None, typer.Option(help="Run directory written by a train command.")
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Exported bundle: evaluated through ONNX Runtime.")
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            help="valid | test, or a diagnostic split: train-last (the last training target) "
            "| test-skip-valid (the test target without the validation item in the history)."
        ),
    ] = "test",
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset (default: the one the run was trained on).")
    ] = None,
    k: Annotated[
        int,
        typer.Option(
            "--k",
            min=1,
            max=100,
            help="Length of the ranked list, as the service's k: metrics at the cutoffs up to k.",
        ),
    ] = max(RECALL_KS),
    beam: Annotated[
        int | None,
        typer.Option(min=1, help="Beam width of a generative run or bundle (default: trained)."),
    ] = None,
) -> None:
    """Full-ranking Recall/NDCG of a run's selected checkpoint (SASRec or generative) or of an
    exported bundle. `--k 10 --beam 10` measures what the service returns for k = 10 with
    BBQREC_BEAM=10 (the search keeps max(k, beam) prefixes)."""
    from training.evaluation import Ranker, load_run_ranker
    from training.evaluation import evaluate as evaluate_ranker

    if split not in ("valid", "test", *PROBE_SPLITS):
        raise _fail(f"--split must be one of valid, test, {', '.join(PROBE_SPLITS)}: {split!r}")
    if (run is None) == (bundle is None):
        raise _fail("give exactly one of --run and --bundle")
    ranker: Ranker
    if bundle is not None:
        from service.bundle import Bundle
        from service.manifest import BundleError

        try:
            loaded = Bundle(bundle, beam=beam)
        except BundleError as e:
            raise _fail(str(e)) from e
        ds = _load(dataset or Path(loaded.manifest["dataset"]["path"]))
        if list(ds.item_ids) != loaded.catalogue.item_ids:
            raise _fail(f"{ds.root} is not the catalogue the bundle was exported with")
        ranker, max_len = loaded, loaded.max_history
    else:
        assert run is not None
        try:
            ranker, max_len, meta = load_run_ranker(run, beam)
        except (FileNotFoundError, ValueError) as e:
            raise _fail(str(e)) from e
        ds = _load(dataset or Path(meta["dataset"]))
        if ds.num_items != meta["num_items"]:
            raise _fail(
                f"{ds.root} has {ds.num_items} items; the run was trained on {meta['num_items']}"
            )
    if split in PROBE_SPLITS:
        chosen = probe_split(ds, split, max_len)
    else:
        loo = leave_one_out(ds, max_len)
        chosen = loo.test if split == "test" else loo.valid
    metrics = evaluate_ranker(
        ranker,
        chosen,
        recall_ks=sorted({c for c in RECALL_KS if c <= k} | {k}),
        ndcg_ks=sorted({c for c in NDCG_KS if c <= k} | {k}),
    )
    typer.echo(json.dumps(metrics, indent=2))


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Option(help="Generative run directory.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset (default: the one the run was trained on).")
    ] = None,
) -> None:
    """Export a generative run to a versioned, self-describing ONNX bundle."""
    from training.export import export_bundle
    from training.loop import BEST, load_checkpoint

    try:
        meta = load_checkpoint(run / BEST)["meta"]
        ds = _load(dataset or Path(meta["dataset"]))
        manifest = export_bundle(run, out, ds)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    typer.echo(json.dumps({k: manifest[k] for k in ("model_version", "files")}, indent=2))


@app.command("bench-model")
def bench_model(
    run: Annotated[Path, typer.Option(help="Generative run directory.")],
    bundle: Annotated[
        Path | None, typer.Option(help="Its exported bundle (default: export to a temp dir).")
    ] = None,
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,64",
    ks: Annotated[str, typer.Option("--k", help="Comma-separated k values.")] = "10,100",
    repeats: Annotated[int, typer.Option(help="Timed calls per configuration.")] = 50,
    beam: Annotated[
        int | None, typer.Option(min=1, help="Beam width for both (default: the run's).")
    ] = None,
) -> None:
    """p50/p99 latency of PyTorch eager vs ONNX Runtime CPU (1 and 2 threads), one run."""
    import tempfile

    from training.bench import bench, markdown
    from training.export import export_bundle
    from training.loop import BEST, load_checkpoint

    meta = load_checkpoint(run / BEST)["meta"]
    ds = _load(Path(meta["dataset"]))
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = bundle or Path(tmp) / "bundle"
        if bundle is None:
            export_bundle(run, bundle_dir, ds)
        report = bench(
            run,
            bundle_dir,
            ds,
            batches=[int(b) for b in batches.split(",")],
            ks=[int(k) for k in ks.split(",")],
            repeats=repeats,
            beam=beam,
        )
    typer.echo(markdown(report))


@app.command()
def serve(
    bundle: Annotated[Path, typer.Option(help="Exported bundle directory.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL (default: BBQREC_REDIS_URL, else embedded).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes (default: BBQREC_WORKERS, else 1)."),
    ] = None,
) -> None:
    """Serve a bundle over HTTP (other settings from BBQREC_* environment variables)."""
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    overrides: dict[str, Any] = {"bundle_path": bundle}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    if workers is not None:
        overrides["workers"] = workers
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        raise _fail(str(e)) from e
    # No per-request access log line: at thousands of requests a second it costs more than the
    # route; requests are counted and timed in /metrics instead.
    options: dict[str, Any] = {"host": host, "port": port, "log_level": "info", "access_log": False}
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    _serve_workers(settings, options)


def _serve_workers(settings: Settings, options: dict[str, Any]) -> None:
    """`settings.workers` uvicorn worker processes, each building the app from BBQREC_*
    variables (validated once above). They share one Redis (the embedded one is started here,
    once) and one Prometheus metrics directory, so /metrics on any worker counts them all."""
    import shutil
    import tempfile

    import uvicorn

    from service.store import EmbeddedRedis

    embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
    env = {
        "BBQREC_BUNDLE_PATH": str(settings.bundle_path),
        "BBQREC_REDIS_URL": settings.redis_url or (embedded.url if embedded else ""),
        "BBQREC_WORKERS": str(settings.workers),
    }
    own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bbqrec-metrics-")
    os.environ.update(env)
    try:
        uvicorn.run("service.app:app_from_env", factory=True, workers=settings.workers, **options)
    finally:
        if own_metrics_dir:
            shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
        if embedded is not None:
            embedded.close()


# Generative-model variants: the full model and the model-side ablations.
GENERATIVE_VARIANTS: dict[str, dict[str, Any]] = {
    "bbqrec": {},
    "no-reweight": {"reweight": False},
    "no-s2i": {"s2i_weight": 0.0},
    "plain": {"reweight": False, "s2i_weight": 0.0},  # TIGER's model on any tokenizer
}
PROFILES = ("quick", "full")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run directory.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer artifact from `bbqrec tokenize`.")],
    dataset: DatasetOpt = EMBEDDED_DATASET,
    profile: Annotated[str, typer.Option(help="quick (CPU) | full (paper size, GPU)")] = "quick",
    variant: Annotated[str, typer.Option(help=", ".join(GENERATIVE_VARIANTS))] = "bbqrec",
    config: Annotated[
        Path | None, typer.Option(help="JSON with 'model'/'train' sections over the profile.")
    ] = None,
    beam: Annotated[int, typer.Option(help="Beam width for ranking (>= 20).")] = 20,
    seed: Annotated[int | None, typer.Option(help="Overrides train.seed.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Overrides train.epochs.")] = None,
    time_budget: TimeBudgetOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the generative recommender on a tokenizer's semantic IDs; resumes from OUT.
    Data-parallel when launched by torchrun (see `training.distributed`)."""
    from model.generative import GenRecConfig
    from training.distributed import launched
    from training.generative import CatalogueTables, train_generative
    from training.loop import TrainConfig
    from training.tokenize import Tokenizer

    if profile not in PROFILES:
        raise _fail(f"unknown profile {profile!r}; choose from {PROFILES}")
    if variant not in GENERATIVE_VARIANTS:
        raise _fail(f"unknown variant {variant!r}; choose from {sorted(GENERATIVE_VARIANTS)}")
    ds = _load(dataset)
    try:
        tok = Tokenizer(tokenizer)
        tables = CatalogueTables.from_tokenizer(tok, ds)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    base = read_config_file(Path(__file__).parent / "configs" / f"generative_{profile}.json")
    user = read_config_file(config)
    model_cfg = build_config(
        GenRecConfig,
        base["model"] | user.get("model", {}) | GENERATIVE_VARIANTS[variant],
        sid_levels=tables.sids.shape[1],
        codebook_size=tok.config.codebook_size,
        num_views=tables.view_codes.shape[1],
        code_levels=tables.view_codes.shape[2],
        item_dim=tables.item_repr.shape[1],
    )
    train_cfg = build_config(
        TrainConfig,
        base["train"] | user.get("train", {}),
        seed=seed,
        epochs=epochs,
        time_budget_s=time_budget,
    )
    start = time.perf_counter()
    meta = {
        "tokenizer": str(tokenizer),
        "tokenizer_variant": tok.meta.get("variant"),
        "variant": variant,
        "profile": profile,
    }
    with launched(device) as dist:
        _, result, test = train_generative(
            ds,
            tables,
            model_cfg,
            train_cfg,
            out,
            beam=beam,
            meta=meta,
            device=device,
            progress=progress,
            dist=dist,
        )
        config_used = {
            "model": asdict(model_cfg),
            "train": asdict(train_cfg),
            "beam": beam,
            "tokenizer": str(tokenizer),
        }
        if dist.is_main:
            write_results(out, ds, config_used, result, test, start)


# Tokenizer variants: BBQRec, the TIGER-style baseline and the ablations, as config overrides.
TOKENIZER_VARIANTS: dict[str, dict[str, Any]] = {
    "bbqrec": {},
    "tiger": {"tiger": True, "id_dim": 0, "club": False, "contrastive": False},
    "no-club": {"club": False},
    "separate-codebooks": {"shared_codebook": False},
    "no-id": {"id_dim": 0},
}


def default_modalities(names: list[str]) -> list[str]:
    """Text plus every image feature the dataset ships."""
    return [m for m in names if m == "text" or "image" in m]


@app.command()
def tokenize(
    out: Annotated[Path, typer.Option(help="Artifact directory.")],
    dataset: DatasetOpt = EMBEDDED_DATASET,
    variant: Annotated[str, typer.Option(help=", ".join(TOKENIZER_VARIANTS))] = "bbqrec",
    config: Annotated[
        Path | None, typer.Option(help="JSON with 'tokenizer'/'train' sections.")
    ] = None,
    sasrec: Annotated[
        Path | None,
        typer.Option(
            help="SASRec run whose item embeddings initialise z_ID (default: train one "
            "on the training split into OUT/sasrec)."
        ),
    ] = None,
    modalities: Annotated[
        str | None, typer.Option(help="Comma-separated modalities (default: text + images).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Overrides train.seed.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Overrides train.epochs.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the behaviour-bound tokenizer (or a baseline/ablation) and write SIDs."""
    from model.sasrec import SASRecConfig
    from model.tokenizer import TokenizerConfig
    from training.features import available_modalities, text_features
    from training.loop import TrainConfig
    from training.sasrec import item_embeddings, load_sasrec, train_sasrec
    from training.tokenize import train_tokenizer

    if variant not in TOKENIZER_VARIANTS:
        raise _fail(f"unknown variant {variant!r}; choose from {sorted(TOKENIZER_VARIANTS)}")
    ds = _load(dataset)
    names = modalities.split(",") if modalities else default_modalities(available_modalities(ds))
    if not names:
        raise _fail(f"{ds.root} has no content modality to tokenize")
    dims = []
    for name in names:
        if name == "text":
            dims.append((name, int(text_features(ds, progress=progress).shape[1])))
        elif name in ds.features:
            dims.append((name, int(ds.features[name].shape[1])))
        else:
            raise _fail(f"modality {name!r} not available; have {available_modalities(ds)}")
    cfg = read_config_file(config)
    section = cfg.get("tokenizer", {}) | TOKENIZER_VARIANTS[variant]
    tok_cfg = build_config(TokenizerConfig, section, modalities=tuple(dims), num_items=ds.num_items)
    train_cfg = build_config(
        TrainConfig,
        {"epochs": 100, "batch_size": 512, "patience": 10} | cfg.get("train", {}),
        seed=seed,
        epochs=epochs,
        monitor="neg_loss",
    )
    id_init = None
    if tok_cfg.id_dim:
        if sasrec is None:
            sasrec = out / "sasrec"
            sas_cfg = read_config_file(Path(__file__).parent / "configs" / "sasrec.json")
            model_cfg = build_config(
                SASRecConfig, sas_cfg["model"] | {"dim": tok_cfg.id_dim}, num_items=ds.num_items
            )
            train_sasrec(
                ds,
                model_cfg,
                build_config(TrainConfig, sas_cfg["train"], seed=train_cfg.seed),
                sasrec,
                device=device,
                progress=progress,
            )
        sas_model, ckpt = load_sasrec(sasrec)
        if ckpt["meta"]["num_items"] != ds.num_items:
            raise _fail(f"{sasrec} was trained on another catalogue")
        id_init = item_embeddings(sas_model)
        if id_init.shape[1] != tok_cfg.id_dim:
            raise _fail(f"{sasrec} has dim {id_init.shape[1]}; set tokenizer.id_dim to match")
    start = time.perf_counter()
    _, metrics = train_tokenizer(
        ds,
        tok_cfg,
        train_cfg,
        out,
        modality_names=names,
        id_init=id_init,
        variant=variant,
        device=device,
        progress=progress,
    )
    summary = {
        "command": "bbqrec " + " ".join(sys.argv[1:]),
        "variant": variant,
        "config": {"tokenizer": asdict(tok_cfg), "train": asdict(train_cfg)},
        "wall_seconds": round(time.perf_counter() - start, 1),
        "hardware": hardware(),
    }
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    shown = {k: v for k, v in metrics.items() if k != "curves"}
    typer.echo(json.dumps(shown, indent=2))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
