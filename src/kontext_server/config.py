"""Settings, read once (prefix ``KONTEXT_``) and passed down. No other module reads os.environ."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kontext_server.domain.engine_options import AccelerationPreset, parse_memory_mode

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every setting of kontext-server. CLI flags override the environment.

    Units are in the names (``lease_s``, ``max_image_bytes``). Paths default to places under
    ``data_dir`` so that one folder holds everything of a single-node install.
    """

    model_config = SettingsConfigDict(env_prefix="KONTEXT_", extra="ignore")

    # --- where things live -----------------------------------------------------------------
    data_dir: Path = Path("kontext-data")
    store: str | None = None  # sqlite:///path.db ; default: sqlite:///<data_dir>/jobs.db
    files: str | None = None  # file:///dir ; default: file://<data_dir>/files

    # --- PostgreSQL (store=postgresql://...) ------------------------------------------------
    pg_pool_max: int = 10  # connections per process

    # --- S3-compatible object store (files=s3://bucket/prefix) --------------------------------
    s3_endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO; None: AWS
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None  # None: boto3's own credential chain
    s3_secret_access_key: SecretStr | None = None
    s3_path_style: bool = False  # path-style addressing (MinIO, moto, most self-hosted)
    s3_presign_expiry_s: int = 7 * 24 * 3600  # links in results; SigV4 allows at most 7 days

    # --- retention ------------------------------------------------------------------------
    result_retention_s: float = 30 * 24 * 3600  # fal keeps payloads 30 days
    cleanup_interval_s: float = 60.0

    # --- the model -------------------------------------------------------------------------
    model: str = "tiny"  # tiny | dummy-full | HF id | diffusers folder | .safetensors | .gguf
    model_config_dir: Path | None = None  # diffusers config folder for single-file / GGUF
    allow_download: bool = False  # never touch the Hugging Face hub unless allowed
    device: str | None = None  # cuda, cuda:1, cpu; default: cuda if available
    default_steps: int | None = None  # None: 28 for real weights, 4 for tiny
    multi_reference_budget_px: int = 2 * 1024 * 1024  # total reference pixels for /multi

    # --- engine speed and memory (docs/performance.md#presets) -----------------------------
    # none | compile (same arithmetic) | fp8 | cache (compile + step caching) | fp8-cache
    acceleration: AccelerationPreset = "none"
    # resident | fp8-storage | nf4 | model-offload | group-offload | storage+offload
    memory: str = "resident"
    cache_threshold: float = Field(default=0.12, gt=0, le=1)  # step cache (cache presets)
    prompt_cache_size: int = Field(default=32, ge=0)  # prompts whose text embeddings are kept
    warmup: bool = True  # compile/warm the engine before the worker claims its first request
    compile_cache: Path | None = None  # default: <data_dir>/compile-cache

    # --- HTTP ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = ""  # prefix a reverse proxy serves us under (e.g. "/kontext")
    insecure_no_auth: bool = False
    workers: int | None = None  # None: one per GPU, one on a CPU-only machine

    # --- queue -----------------------------------------------------------------------------
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    max_attempts: int = 3
    claim_poll_s: float = 0.02  # SQLite: how often an idle worker looks (PostgreSQL: NOTIFY)
    max_queued_per_key: int = 1000  # 429 + Retry-After past this
    max_queue_size: int = 100_000  # all keys together
    job_timeout_s: float = 900.0  # a run longer than this fails and its worker is replaced
    drain_timeout_s: float = 60.0  # SIGTERM: finish the job in hand within this, else hand back
    prefetch_jobs: int = Field(default=1, ge=0)  # next jobs' inputs fetched during an edit; 0: off

    # --- inputs ----------------------------------------------------------------------------
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    fetch_timeout_s: float = 20.0
    # comma-separated in the environment: KONTEXT_FETCH_ALLOW_HOSTS=10.0.0.0/8,minio.internal
    fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    fetch_allow_ports: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [80, 443, 8080, 8443]
    )

    # --- uploads (fal storage endpoints, PROTOCOL.md §10) -----------------------------------
    max_upload_bytes: int = 32 * 1024 * 1024  # one file; 413 past this
    upload_retention_s: float = 7 * 24 * 3600  # deleted within an hour after this
    # signs upload tokens and upload URLs; None: a random key in data_dir (created on first
    # use). Give every API node the same value when several machines serve one queue.
    upload_secret: SecretStr | None = None

    # --- content safety (docs/security.md) -------------------------------------------------
    # a local transformers image-classification folder; None: images are not screened
    safety_model: Path | None = None
    safety_device: str | None = None  # None: cpu (the classifier is small)
    # comma-separated in the environment; labels whose probabilities add up to the NSFW score
    safety_nsfw_labels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nsfw", "porn", "hentai", "sexy", "explicit"]
    )
    # NSFW score thresholds of safety_tolerance 1..6 (1 strictest; 6 is the hard floor)
    safety_thresholds: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.20, 0.35, 0.50, 0.65, 0.80, 0.95]
    )
    safety_prompt_blocklist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    safety_blocklist_max_level: int = 2  # the blocklist applies at safety_tolerance <= this

    # --- abuse limits ------------------------------------------------------------------------
    auth_max_failures: int = 10  # bad keys from one client within the window ...
    auth_failure_window_s: float = 60.0
    auth_lockout_s: float = 60.0  # ... refuse it (429 + Retry-After) this long
    # A key found in the store is trusted this long without asking again (status polls then
    # need no store call for authentication); a revoked key is refused within it. 0: ask always
    auth_key_cache_s: float = Field(default=5.0, ge=0, le=300)
    max_streams_per_key: int = 10  # open SSE status streams per API key; 429 past this

    # --- webhooks --------------------------------------------------------------------------
    webhook_max_attempts: int = 10
    webhook_timeout_s: float = 15.0

    # --- engines (docs/bfl-engine.md) ----------------------------------------------------------
    # endpoint id -> "local" (diffusers on our workers) or "bfl" (Black Forest Labs' API), as
    # JSON: KONTEXT_ENGINES='{"fal-ai/flux-pro/kontext/max": "bfl"}'. Unlisted: local.
    engines: dict[str, Literal["local", "bfl"]] = Field(default_factory=dict)
    bfl_base_url: str = "https://api.bfl.ai"
    bfl_api_key: SecretStr | None = None  # sent as x-key to BFL only; never logged or returned
    bfl_max_in_flight: int = Field(default=8, ge=1)  # BFL limits concurrent tasks per key
    bfl_poll_initial_s: float = 0.5  # first wait between polls of a task; grows to the max
    bfl_poll_max_s: float = 5.0
    bfl_request_timeout_s: float = 30.0  # one HTTP request to BFL

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with request_id
    # FastAPI's native OpenTelemetry (spans, HTTP metrics, exception logs) through the global
    # providers an OpenTelemetry distro sets up. Off by default: /metrics and the JSON logs
    # cover operations, and with it on FastAPI asks the providers on every request (~3 % of a
    # submit's CPU even when none is configured).
    opentelemetry: bool = False
    metrics_port: int | None = None  # `worker` only: serve its own /metrics on this port
    metrics_host: str = "127.0.0.1"  # ... bound to this address

    @model_validator(mode="after")
    def _heartbeat_renews_in_time(self) -> Settings:
        # A lease must be renewed before it runs out, with room for a late beat.
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s:g}) must be at most half of lease_s "
                f"({self.lease_s:g}), or every running job loses its lease"
            )
        return self

    @field_validator("memory")
    @classmethod
    def _memory_mode(cls, value: str) -> str:
        return str(parse_memory_mode(value))

    @field_validator(
        "fetch_allow_hosts",
        "fetch_allow_ports",
        "safety_nsfw_labels",
        "safety_thresholds",
        "safety_prompt_blocklist",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def engine_for(self, endpoint: str) -> str:
        """The engine that runs jobs of ``endpoint``: ``"local"`` unless ``engines`` says."""
        return self.engines.get(endpoint, "local")

    def compile_cache_dir(self) -> Path:
        """Where compiled kernels are kept, so that a restart does not compile again."""
        return (self.compile_cache or self.data_dir / "compile-cache").resolve()

    def store_url(self) -> str:
        return self.store or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    def files_url(self) -> str:
        return self.files or f"file://{(self.data_dir / 'files').resolve()}"
