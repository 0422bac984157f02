"""All configuration of tokenfleet, read from ``TOKENFLEET_*`` environment variables.

One ``Settings`` object is built at process start (``Settings()``) and passed down; no module
reads the environment on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def _default_model_dir() -> Path:
    return Path.home() / ".cache" / "tokenfleet" / "models"


class Settings(BaseSettings):
    """Every knob of the gateway, the worker and the CLI."""

    model_config = SettingsConfigDict(env_prefix="TOKENFLEET_", extra="ignore")

    # --- Redis -------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "tf"
    redis_timeout_s: float = 1.0  # connect/socket timeout: Redis down -> fail fast

    # --- Model -------------------------------------------------------------------------
    model: str = DEFAULT_MODEL  # the built-in name, or a local Hugging Face model directory
    served_model_name: str | None = None  # name clients use; default: the model's basename
    model_dir: Path = Field(default_factory=_default_model_dir)  # prepared checkpoints
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "auto", "int8-torch", "int8", "nf4"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = None
    engine: Literal["hf", "null"] = "hf"  # "null": no model, emits dummy tokens (bus bench)
    null_engine_tokens: int = 16
    null_engine_step_ms: float = 0.0  # simulated compute per null-engine step (soak tests)

    # decode: pure decode steps run through one torch.compile-d graph of one layer that
    # every layer calls (inductor, artifacts cached under ~/.cache/tokenfleet/inductor);
    # step: one graph of all layers (faster steps, a far longer first compile and start);
    # off: eager. See docs/design/engine.md, "Compiled decode step (issue 15)"
    compile: Literal["off", "decode", "step"] = "off"
    # background: the worker serves eager at once and the compiled graphs are built in a
    # thread, attached between steps when all are ready; blocking: built before it serves
    compile_warmup: Literal["background", "blocking"] = "background"
    # decode attention: torch (two batched matmuls over every row's whole buffer, masked),
    # native (a C kernel built once with the machine's compiler that reads each row's own
    # keys; CPU; warns and keeps torch where it cannot run) or auto (native where it can run,
    # quietly torch elsewhere, e.g. CUDA). See docs/design/engine.md, "Native decode attention"
    attention: Literal["torch", "native", "auto"] = "auto"
    # a layer's norms, rotary embedding, residual sums and gated activation: torch (~25
    # operations a layer), native (four C calls a layer, built like the attention kernel;
    # CPU, plain Llama layers; warns and keeps torch where it cannot) or auto (native where
    # it can, quietly torch elsewhere). docs/design/engine.md, "Native pointwise kernels"
    pointwise: Literal["torch", "native", "auto"] = "auto"
    # fp32 projections and head: torch (oneDNN's packed matmul, else MKL; 1-3 rows padded to
    # 4), native (a C kernel whose rows round alike at any row count: x86 AVX2+FMA CPUs, fp32
    # only; warns and keeps torch elsewhere) or auto (native for an fp32 model where the CPU
    # can run it, quietly torch elsewhere). docs/design/engine.md, "Native fp32 linear"
    linear: Literal["torch", "native", "auto"] = "auto"

    # --- Batching ----------------------------------------------------------------------
    coalesce_ms: float = 15.0  # how long an idle worker waits to fill a batch
    max_batch_size: int = 64  # most sequences decoding at once
    max_batch_tokens: int = 32768  # KV-cache budget: rows x padded length
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step (chunked prefill)
    max_waiting: int = 16  # requests a worker holds locally beyond the running batch
    interactive_reserve: int = 4  # batch rows and read slots kept for the interactive lane
    # mixed: prompt chunks beside every step's decodes, in one forward pass (bf16); phase:
    # prefill-only or decode-only steps. mixed is the default: measured as fast or faster in
    # tok/s with a far lower inter-token tail (docs/design/engine.md, "Scheduling policy")
    scheduling: Literal["mixed", "phase"] = "mixed"
    # phase: at most this many prefill-only steps in a row while streams wait (0: no bound)
    phase_max_prefill_steps: int = Field(default=4, ge=0)
    prefix_cache_tokens: int = 8192  # prompt KV kept for reuse (automatic prefix caching)
    # speculative decoding: off; ngram (prompt lookup: proposals from the request's own text);
    # draft (a draft model, TOKENFLEET_DRAFT_MODEL, or the model's first draft_layers layers)
    speculative: Literal["off", "ngram", "draft"] = "off"
    speculative_tokens: int = Field(default=4, ge=1, le=16)  # k: tokens a row proposes at first
    # the most a row's k grows to while its proposals are accepted whole (doubling; a
    # rejection sets it to the accepted run + 1); speculative_tokens or less keeps k fixed
    speculative_tokens_max: int = Field(default=16, ge=1, le=32)
    speculative_ngram: int = Field(default=3, ge=1, le=8)  # longest suffix matched (down to 1)
    # speculate only while at most this many rows decode (None: the method's measured crossover)
    speculative_max_rows: int | None = Field(default=None, ge=0)
    draft_model: str | None = None  # local HF dir with the model's tokenizer (None: self-draft)
    draft_layers: int = Field(default=8, ge=1)  # self-draft: the target's first layers

    # --- Request limits ----------------------------------------------------------------
    default_max_tokens: int = 256
    max_tokens_cap: int = 4096
    max_stop_sequences: int = 8
    max_stop_length: int = 64
    max_stop_token_ids: int = 64  # entries of the stop_token_ids extension
    # prompts of more characters than this are tokenized in a thread, off the event loop
    tokenize_inline_chars: int = 4096
    max_body_bytes: int = 1_048_576
    max_messages: int = 256

    # --- Queue, jobs, liveness ---------------------------------------------------------
    job_ttl_s: int = 86_400  # a job's hash and text live this long after it finishes
    events_ttl_s: int = 300  # its per-token event list only this long (the replay window)
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 10.0
    claim_idle_ms: int = 30_000  # pending this long with no progress -> another worker claims
    stall_timeout_s: float = 300.0  # a loop turn this long: stop refreshing, let others claim
    max_deliveries: int = 3
    drain_timeout_s: float = 30.0
    backlog_limit: int = 4096  # stream length + pending above this -> 429
    stream_maxlen: int = 100_000
    request_timeout_s: float | None = None  # default deadline when a request gives none

    # --- Gateway -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    gateway_workers: int = 1  # gateway processes on the port (tokenfleet gateway --workers)
    auth: bool = False  # require "Authorization: Bearer <key>"
    # static keys, comma-separated in the environment
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    rate_limit_rpm: int = 0  # per key, 0 = unlimited
    rate_limit_tpm: int = 0
    auth_cache_s: float = 5.0  # how long a gateway trusts a key lookup (revocation delay)
    gateway_drain_timeout_s: float = 30.0  # on SIGTERM, how long open streams may finish
    gateway_shutdown_delay_s: float = 1.0  # on SIGTERM, /readyz 503 this long before closing
    log_level: str = "INFO"
    sse_keepalive_s: float = Field(default=15.0, gt=0)  # SSE comment this often when idle

    # --- Operations: metrics and autoscaling (docs/operations.md) -----------------------
    metrics_port: int = 0  # worker: /metrics, /healthz and /readyz on this port; 0 = off
    scale_to_zero: bool = False  # gateway: with no live worker, queue work and stay ready
    scale_down_idle_s: float = 30.0  # autoscaler: drain a worker idle (no request) this long
    scale_target_requests: int = 16  # autoscaler: queued + running requests per worker
    scale_standby_workers: int = 0  # autoscaler: loaded spares waiting to be promoted
    worker_standby: bool = False  # worker: load the model, then wait for SIGUSR1 to serve

    @property
    def interactive_reserve_rows(self) -> int:
        """``interactive_reserve``, at most a quarter of ``max_batch_size`` (a small test
        worker keeps its batch lane)."""
        return min(self.interactive_reserve, self.max_batch_size // 4)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _check_budgets(self) -> Settings:
        if self.coalesce_ms < 0:
            raise ValueError("TOKENFLEET_COALESCE_MS must be >= 0")
        if self.max_batch_size < 1:
            raise ValueError("TOKENFLEET_MAX_BATCH_SIZE must be >= 1")
        if self.interactive_reserve < 0:
            raise ValueError("TOKENFLEET_INTERACTIVE_RESERVE must be >= 0 (0: off)")
        if self.max_prefill_tokens < 16:
            raise ValueError("TOKENFLEET_MAX_PREFILL_TOKENS must be >= 16")
        for name in ("auth_cache_s", "gateway_drain_timeout_s", "gateway_shutdown_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"TOKENFLEET_{name.upper()} must be >= 0")
        if self.gateway_workers < 1:
            raise ValueError("TOKENFLEET_GATEWAY_WORKERS must be >= 1")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("TOKENFLEET_METRICS_PORT must be 0 (off) or a port number")
        if self.scale_down_idle_s < 0 or self.scale_target_requests < 1 \
                or self.scale_standby_workers < 0:
            raise ValueError("TOKENFLEET_SCALE_DOWN_IDLE_S and _STANDBY_WORKERS must be >= 0, "
                             "TOKENFLEET_SCALE_TARGET_REQUESTS >= 1")
        if self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise ValueError("TOKENFLEET_RATE_LIMIT_RPM and _TPM must be >= 0 (0: unlimited)")
        if not 1 <= self.events_ttl_s <= self.job_ttl_s:
            raise ValueError("TOKENFLEET_EVENTS_TTL_S must be >= 1 and <= TOKENFLEET_JOB_TTL_S")
        if self.prefix_cache_tokens < 0:
            raise ValueError("TOKENFLEET_PREFIX_CACHE_TOKENS must be >= 0 (0: no prefix cache)")
        if self.max_batch_tokens < self.max_prefill_tokens:
            raise ValueError(
                "TOKENFLEET_MAX_BATCH_TOKENS must be >= TOKENFLEET_MAX_PREFILL_TOKENS")
        return self

    @property
    def model_name(self) -> str:
        """The name clients put in ``"model"``."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else DEFAULT_MODEL


    # --- Files and batches (batches/) ----------------------------------------------------
    max_file_bytes: int = 104_857_600  # 100 MiB per uploaded file (OpenAI allows 200 MB)
    max_batch_lines: int = 100_000  # requests per batch file (OpenAI: 50,000)
    file_ttl_s: int = 30 * 86_400  # uploaded and generated files expire after this
    batch_ttl_s: int = 30 * 86_400  # a batch record is kept this long after it ends
    batch_max_in_flight: int = 128  # requests of one batch queued or running at once
    batch_poll_s: float = 0.05  # how often the orchestrator reads its in-flight jobs
    batch_slice_s: float = 10.0  # an arq job drives its batch this long, then re-queues
    batch_lease_s: float = 3.0  # a killed orchestrator's batch is resumed after about this
    batch_max_errors: int = 100  # validation errors listed per batch (the rest are counted)
    batch_orchestrator_jobs: int = 16  # batches one orchestrator process drives at once

    @model_validator(mode="after")
    def _check_batches(self) -> Settings:
        for name in ("max_file_bytes", "max_batch_lines", "batch_max_in_flight",
                     "batch_max_errors", "batch_orchestrator_jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"TOKENFLEET_{name.upper()} must be >= 1")
        if self.batch_lease_s < 1 or self.batch_slice_s < 1 or self.batch_poll_s <= 0:
            raise ValueError("TOKENFLEET_BATCH_LEASE_S and TOKENFLEET_BATCH_SLICE_S must be "
                             ">= 1 and TOKENFLEET_BATCH_POLL_S > 0")
        return self

    # --- Async jobs: idempotency and webhooks (gateway/idempotency.py, webhooks/) ---------
    idempotency_ttl_s: int = 86_400  # how long an Idempotency-Key is bound to its request
    webhook_secret: str | None = None  # "whsec_<base64>" (Standard Webhooks); unset: off
    webhook_max_attempts: int = 10  # deliveries of one event before it is dead-lettered
    webhook_retry_base_s: float = 1.0  # first retry after ~this; doubles, with jitter
    webhook_timeout_s: float = 10.0  # per delivery: connect + answer
    webhook_allow_private: bool = False  # allow loopback/private/link-local webhook hosts

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_async_jobs(self) -> Settings:
        if not 1 <= self.idempotency_ttl_s <= self.job_ttl_s:
            raise ValueError("TOKENFLEET_IDEMPOTENCY_TTL_S must be >= 1 and <= "
                             "TOKENFLEET_JOB_TTL_S (a key must not outlive its job)")
        if self.webhook_max_attempts < 1:
            raise ValueError("TOKENFLEET_WEBHOOK_MAX_ATTEMPTS must be >= 1")
        if self.webhook_retry_base_s <= 0 or self.webhook_timeout_s <= 0:
            raise ValueError("TOKENFLEET_WEBHOOK_RETRY_BASE_S and TOKENFLEET_WEBHOOK_TIMEOUT_S "
                             "must be > 0")
        if self.webhook_secret is not None:
            _check_webhook_secret(self.webhook_secret)
        return self


def _check_webhook_secret(secret: str) -> None:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 to 64 random bytes."""
    import base64
    import binascii

    problem = "TOKENFLEET_WEBHOOK_SECRET must be 'whsec_' followed by base64 of 24 to 64 " \
        "random bytes (`tokenfleet webhooks secret` makes one)"
    if not secret.startswith("whsec_"):
        raise ValueError(problem)
    try:
        raw = base64.b64decode(secret[len("whsec_"):] + "==", validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(problem) from exc
    if not 24 <= len(raw) <= 64:
        raise ValueError(problem)
