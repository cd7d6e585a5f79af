"""Server settings: one pydantic-settings object, read from `TUNEFORGE_*` env vars and CLI flags.

Everything the server can be told lives here, validated once at start and printed once, so a
misconfiguration fails before the first request instead of in the middle of a training run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneforge import quantization as quant


class Limits(BaseSettings):
    """Per-request limits. A request over one fails with a message naming the limit."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_LIMIT_", extra="forbid")

    max_datums_per_request: int = Field(1024, ge=1)
    max_tokens_per_datum: int = Field(8192, ge=2)
    max_tokens_per_request: int = Field(262_144, ge=2)
    max_samples_per_request: int = Field(128, ge=1)
    max_sample_tokens: int = Field(4096, ge=1)
    max_topk_logprobs: int = Field(64, ge=1)


class ModelSpec(BaseModel):
    """What a served model name stands for: a model, optionally quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    """A built-in model, a local folder or a Hugging Face id."""
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    """bitsandbytes 4-bit NF4 or FP4, or 8-bit LLM.int8() (CUDA only) weights."""
    double_quant: bool = True
    """4-bit: quantize the quantization constants too (about 0.4 bits per weight saved)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass for every run on this model."""

    @property
    def quantized(self) -> str | None:
        return quant.check(self.quantization)


class Settings(BaseSettings):
    """Everything `tuneforge serve` can be told. Env prefix `TUNEFORGE_`."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("./data")
    models_dir: Path | None = None
    """Where built-in and converted base models are cached; default `data_dir/models`."""
    database_url: str | None = None
    """SQLAlchemy URL of the metadata database; default: a SQLite file in `data_dir`."""
    api_keys: list[str] = Field(default_factory=list)
    """Accepted API keys besides the one generated into `data_dir/api_key` on first start."""
    preload_models: list[str] = Field(default_factory=lambda: ["tuneforge/tiny-qwen3"])
    """Base models loaded at start (the default is the built-in offline tiny model)."""
    model_aliases: dict[str, str | ModelSpec] = Field(default_factory=dict)
    """Serve a model under another name, e.g. {"Qwen/Qwen3-8B": "tuneforge/tiny-qwen3"}, or a
    quantized one: {"smollm2-4bit": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "quantization": "nf4"}} (keys: model, quantization, double_quant, gradient_checkpointing)."""
    num_threads: int = Field(0, ge=0)
    """torch intra-op threads for the engine; 0 = all cores."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype: bf16 autocast or fp32 for forward/backward and sampling. In bf16 the base's
    linear weights are stored rounded to bf16 (what autocast computes with); LoRA weights and
    optimizer state stay fp32. auto: bf16 on CUDA or a CPU with AVX512-BF16/AMX, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass for every run (less memory, more compute;
    same results). A run can ask for it alone with user_metadata gradient_checkpointing=true."""
    device: str = "auto"
    lora_alpha: float = Field(32.0, gt=0)
    """LoRA alpha; the scaling applied to an adapter of rank r is alpha / r (Tinker uses 32)."""
    max_lora_rank: int = Field(128, ge=1)
    seed: int | None = None
    """Reproducible runs of scripts that seed nothing: unseeded training clients and sample
    requests get seeds derived from this one (server/seeds.py); unset: fresh randomness."""
    max_models_per_key: int = Field(64, ge=1)
    """Training models one API key may have loaded at once."""
    max_running_jobs: int = Field(4, ge=1)
    """Declarative jobs (POST /api/jobs) running at once; later ones wait in order."""
    job_files_dir: Path | None = None
    """Jobs posted over HTTP may name server files (data, tasks, skill files) only inside this
    folder; unset: they must carry their rows inline (`tuneforge jobs submit` inlines them)."""
    allow_job_code: bool = False
    """Let jobs posted over HTTP name a Python grader (FILE.py:FUNCTION or module:FUNCTION),
    which the server then runs: only for servers whose every key is trusted with that."""
    batch_tokens: int = Field(16384, ge=1)
    """Tokens of forward/forward_backward requests (of different models) one shared pass may
    gather; a request bigger than this runs alone."""
    batch_requests: int = Field(32, ge=1)
    """Requests (of as many models) one shared pass may gather."""
    batch_wait_ms: float = Field(60.0, ge=0)
    """How long a forward/forward_backward may wait for the requests of other models that were
    training a moment ago, to share one pass with them (never when one model trains alone, and
    not while such waits keep gaining nothing)."""
    max_decode_rows: int = Field(64, ge=1)
    """Samples decoded together per base model; further requests wait for a free row."""
    base_memory_mb: int = Field(0, ge=0)
    """Memory for base models; 0 = no limit. A base model nothing uses is unloaded to make room
    for another (and loaded again on its next use)."""
    adapter_memory_mb: int = Field(4096, ge=1)
    """Memory for adapters (training models with their gradients and optimizer state, and
    sampler weights) on the compute device; the least recently used beyond it are offloaded and
    reloaded on their next request."""
    cpu_offload_memory_mb: int = Field(16384, ge=0)
    """On a GPU: CPU memory for adapters offloaded from it before they go to disk."""
    long_poll_seconds: float = Field(20.0, gt=0, lt=45)
    """How long retrieve_future holds a request for a result; the SDK times out at 45 s."""
    session_timeout_seconds: float = Field(600.0, ge=0)
    """A session that sends no heartbeat for this long (its client died; the SDK heartbeats
    every 10 s) is finished and its models and samplers freed; 0 = never."""
    result_ttl_seconds: float = Field(3600.0, gt=0)
    """How long a finished future's result is kept after it completes."""
    fwdbwd_max_chunk_len: int = Field(256, ge=1)
    """Datums per forward_backward request that the SDK is told to send at most."""
    ray: str | None = None
    """Run the engine in Ray actors: "auto" starts a Ray instance on this machine (listening on
    127.0.0.1 only), an address ("HOST:PORT", "ray://…") joins a running cluster; unset: one
    engine in the server's process, and Ray is not imported."""
    workers: int = Field(1, ge=1, le=256)
    """Engine workers (Ray actors), each owning one device and the models placed on it."""
    worker_gpus: float | None = Field(None, ge=0)
    """GPUs per worker actor; unset: 1 where the cluster has GPUs, else 0 (a CPU worker)."""
    worker_threads: int = Field(1, ge=1)
    """torch threads (and Ray CPUs) of each CPU worker actor."""
    data_parallel: dict[str, int] = Field(default_factory=dict)
    """Base model → K: its runs are data-parallel over K workers (a replica of each adapter on
    every one, the batch split between them, LoRA gradients all-reduced before each step)."""
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _workers_need_ray(self) -> Settings:
        if self.ray is None:
            if self.workers > 1:
                raise ValueError(f"workers={self.workers} needs ray (--ray auto or an address); "
                                 "without it the engine runs in the server's process")
            if self.data_parallel:
                raise ValueError("data_parallel needs ray (--ray auto or an address)")
        for base, k in self.data_parallel.items():
            if not 2 <= k <= self.workers:
                raise ValueError(f"data_parallel[{base!r}] = {k}: a group needs between 2 and "
                                 f"workers={self.workers} workers")
        if sum(self.data_parallel.values()) > self.workers:
            raise ValueError(f"data_parallel groups need {sum(self.data_parallel.values())} "
                             f"workers in all (each worker joins one group at most), but "
                             f"workers={self.workers}")
        return self

    @field_validator("model_aliases")
    @classmethod
    def _alias_targets(cls, v: dict[str, str | ModelSpec]) -> dict[str, str | ModelSpec]:
        for target in v.values():
            if isinstance(target, str):
                quant.split(target)  # an unknown @qualifier fails at start, not on first use
        return v

    @field_validator("data_dir", "models_dir")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tuneforge.db'}"

    def summary(self) -> str:
        shown = self.model_dump(exclude={"api_keys"})
        shown["api_keys"] = f"{len(self.api_keys)} configured"
        return ", ".join(f"{k}={v}" for k, v in shown.items())
