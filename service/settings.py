"""Server settings: one object, from defaults < ``CAVEAT_*`` environment variables < command-line flags."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.options import add_flag, scalar_type

ENV_PREFIX = "CAVEAT_"


class Settings(BaseModel):
    """Everything ``caveat-serve`` can be told. Field descriptions are the ``--help`` texts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field("minilm", description="Hugging Face id, local path, or the embedded name 'minilm'")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: str = Field("float32", description="base model precision: float32, bfloat16 or float16")
    adapter_dir: Path = Field(
        Path("bundles"),
        description="where the admin API's bundle paths are found (they stay inside); the bundle store too unless "
        "--store names another",
    )
    store: str | None = Field(
        None,
        description="the bundle store every replica serves from: a local or shared directory, or an fsspec URL "
        "(s3://bucket/prefix; credentials and endpoint from the usual AWS_* variables) (default: --adapter-dir)",
    )
    preload_adapters: bool = Field(
        True, description="load every adapter of the store at start (off: each loads on its first request)"
    )
    store_poll_s: float = Field(
        2.0, gt=0, description="how often the store is checked for new current versions (the hot-swap bound)"
    )
    miss_wait_ms: float = Field(
        2000.0, ge=0, description="how long a request for an adapter being loaded from the store waits; then 503"
    )
    workers: int = Field(
        1,
        ge=1,
        description="server processes on one address, each with the base model and its own engine; they "
        "share the bundle store, the answers kept for feedback, the feedback log and /metrics (torch threads per "
        "worker: the CPUs divided among them unless --torch-threads says)",
    )
    engine: Literal["uvicorn", "ray"] = Field(
        "uvicorn",
        description="uvicorn: this machine's processes (--workers); ray: a Ray Serve application on a local Ray "
        "cluster (the ray extra), an ingress and --replicas worker replicas multiplexed by adapter",
    )
    replicas: int = Field(1, ge=1, description="Ray worker replicas (at least this many when --max-replicas is set)")
    max_replicas: int | None = Field(
        None, ge=1, description="Ray autoscaling between --replicas and this on ongoing requests (unset: fixed)"
    )
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="ongoing requests per Ray worker replica the autoscaler aims at"
    )
    adapters_per_replica: int = Field(
        16, ge=1, description="adapters a Ray worker replica holds; beyond, it drops its least recently used"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    admin_token: str | None = Field(None, description="bearer token of the admin routes (unset: admin disabled)")
    admin_token_file: Path | None = Field(None, description="file holding the admin token (Docker secrets)")
    batching: bool = Field(True, description="combine concurrent requests into one batched forward")
    max_batch_rows: int = Field(512, ge=1, description="rows (inputs × samples) collected into one batch")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests once one arrived")
    queue_size: int = Field(256, ge=1, description="admitted requests waiting for the model; beyond: 429")
    token_budget: int | None = Field(
        None, ge=1, description="rows × tokens per forward (default 4096 on CPU, where big forwards leave cache)"
    )
    step_tokens: int | None = Field(
        None,
        ge=1,
        description="rows × tokens the engine runs between scheduling decisions (default: calibrated at warm-up "
        "so that a step takes about step_ms, at least 1024 on CPU and 262144 on GPU); big requests run in "
        "pieces, small ones are served between them",
    )
    step_ms: float | None = Field(
        None,
        gt=0,
        description="how long the base model alone should take for one engine step, for the calibrated step_tokens "
        "(default 250 on CPU, 50 on GPU); the adapters, the OOD score's base rows and the GLM's backward passes make "
        "real steps longer (2.6-3x with MiniLM on a 2-core CPU, docs/benchmarks.md); shorter steps serve small "
        "requests sooner, longer ones batch more",
    )
    max_request_tokens: int = Field(
        262_144,
        ge=1,
        description="estimated rows × tokens one request may ask for (inputs × samples × tokens); beyond: 413",
    )
    queue_tokens: int = Field(
        1_048_576, ge=1, description="estimated rows × tokens of all admitted requests together; beyond: 429"
    )
    max_inputs: int = Field(64, ge=1, description="inputs per request")
    max_text_chars: int = Field(20_000, ge=1, description="characters per input text")
    max_samples: int = Field(128, ge=1, description="network posterior samples per request (method sample)")
    max_glm_samples: int = Field(65_536, ge=1, description="logit draws per request (method glm)")
    max_body_bytes: int = Field(1_048_576, ge=1, description="request body size")
    request_timeout_s: float = Field(30.0, gt=0, description="a prediction not done by then answers 504")
    memory_budget_mb: float = Field(2048.0, gt=0, description="device memory for adapter tensors; LRU beyond")
    pinned: list[str] = Field(default_factory=list, description="comma-separated adapters never evicted")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    warmup: bool = Field(True, description="run a warm-up forward before turning ready")
    drain_s: float = Field(0.0, ge=0, description="on SIGTERM, report not-ready this long before closing")
    feedback_store_size: int = Field(
        20_000,
        ge=0,
        description="recent answers kept for POST /v1/feedback to join labels to (oldest dropped; 0: "
        "none kept, feedback is refused)",
    )
    feedback_ttl_s: float = Field(86_400.0, gt=0, description="how long an answer waits for its label")
    feedback_dir: Path = Field(
        Path("feedback"), description="directory of the durable log of labelled answers (JSONL, fsync'd per batch)"
    )
    feedback_log_max_mb: float = Field(64.0, gt=0, description="size at which a feedback log file is rotated")
    feedback_token: str | None = Field(
        None, description="bearer token of POST /v1/feedback (unset: the admin token); lets label sources in "
        "without admin rights",
    )  # fmt: skip
    max_feedback: int = Field(1000, ge=1, description="labels per feedback request")
    log_level: str = Field("info", description="uvicorn log level")
    loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="uvicorn event loop (asyncio: the standard one)")
    http: Literal["httptools", "h11"] = Field("httptools", description="uvicorn HTTP parser (h11: pure Python)")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in ("float32", "bfloat16", "float16"):
            raise ValueError("dtype must be float32, bfloat16 or float16")
        return value

    @field_validator("pinned", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_front(self) -> Settings:
        if self.engine == "ray" and self.workers > 1:
            raise ValueError("--workers is for --engine uvicorn; under Ray, --replicas sets the worker processes")
        return self

    def resolved_admin_token(self) -> str | None:
        """The admin token from ``admin_token`` or, failing that, ``admin_token_file``."""
        if self.admin_token:
            return self.admin_token
        if self.admin_token_file is not None:
            return self.admin_token_file.read_text().strip() or None
        return None


def settings_from(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then ``CAVEAT_<FIELD>`` variables, then flags. Raises ``SystemExit(2)`` on bad values."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = environ[key]
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(problems)
        raise  # parser.error exits; this keeps type checkers content
    if settings.admin_token_file is not None and not settings.admin_token_file.is_file():
        parser.error(f"admin_token_file: {settings.admin_token_file} is not a readable file")
    return settings


def configure_logging(level: str) -> None:
    """The server's log format at ``level`` (the ``log_level`` setting), in the supervisor and in each worker."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caveat-serve",
        description="Serve calibrated predictions from Caveat bundles. Every flag can also be set as an "
        f"environment variable {ENV_PREFIX}<FLAG> (upper case, underscores).",
    )
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        kind = bool if scalar_type(info.annotation)[0] is bool else str  # pydantic converts the strings
        add_flag(parser, name.replace("_", "-"), kind, default=None, help=f"{info.description} (default: {default})")
    return parser
