"""Service settings: one pydantic-settings class (`BBQREC_*` env variables), validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BBQREC_", extra="forbid")

    bundle_path: Path = Field(description="Exported bundle directory (manifest.json inside).")
    redis_url: str | None = Field(
        default=None,
        description="redis:// or unix:// URL; unset = an embedded Redis persisted in data_dir.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="redis_url names one node of a Redis Cluster (redis-py RedisCluster).",
    )
    data_dir: Path = Field(default=Path("data"), description="Embedded Redis persistence.")
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(default=64, ge=1, le=1024)
    intra_op_threads: int = Field(
        default=1, ge=1, le=64, description="ONNX Runtime threads of one inference call."
    )
    concurrent_batches: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Micro-batches that may run at once in one process, each in its own "
        "thread: a request that arrives while a batch runs starts on the next idle one instead "
        "of waiting. Keep concurrent_batches x intra_op_threads x workers within the cores.",
    )
    beam: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Beam width of the search (it keeps max(k, beam) prefixes); unset = the "
        "bundle's, the width it was trained and evaluated with. Narrower is faster and may "
        "rank worse: `bbqrec evaluate --bundle DIR --k 10 --beam N` measures the trade-off.",
    )
    history_length: int = Field(default=50, ge=1, le=1000, description="Events kept per user.")
    redis_timeout_s: float = Field(
        default=0.25,
        gt=0,
        le=30,
        description="Budget for one request's Redis work (retries included); past it the "
        "request is answered degraded (/recommend) or 503 (writes).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Worker processes (`bbqrec serve`), each with its own ONNX Runtime session "
        "and micro-batcher. POST /admin/reload is refused when > 1 (it would reload one of "
        "them): restart instead.",
    )
    items_sync_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="How often a replica takes in the items other replicas added (a request "
        "naming such an item looks it up at once).",
    )
    idempotency_ttl_s: int = Field(
        default=86_400,
        ge=1,
        le=30 * 86_400,
        description="How long POST /events remembers an Idempotency-Key (a retry within it "
        "writes nothing again).",
    )
    api_key: SecretStr | None = Field(default=None, description="Required on write routes.")
    protect_reads: bool = Field(default=False, description="Also require the key on reads.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024)

    @field_validator("bundle_path")
    @classmethod
    def _bundle_exists(cls, path: Path) -> Path:
        if not (path / "manifest.json").is_file():
            raise ValueError(f"{path}: no manifest.json; not an exported bundle")
        return path

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return url

    @model_validator(mode="after")
    def _cluster_needs_a_node(self) -> Settings:
        if self.redis_cluster:
            url = self.redis_url or ""
            if not url.startswith(("redis://", "rediss://")):
                raise ValueError("redis_cluster needs a redis:// or rediss:// redis_url (a node)")
            if urlsplit(url).path.strip("/") not in ("", "0"):
                raise ValueError("redis_cluster: a Redis Cluster has only database 0")
        return self
