"""Typed configuration of one imaging rig: the single file (`rig.yaml`) a facility engineer edits.

Every field is validated at start-up, so a bad config fails before the microscope starts streaming.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator


class _Strict(BaseModel):
    # Unknown keys are typos in rig.yaml: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Strict):
    """ZeroMQ endpoints and flow control towards the microscope controller."""

    tile_endpoint: str = Field(
        "tcp://127.0.0.1:5555",
        description="Appliance binds a PULL socket here; the controller connects PUSH and sends tiles.",
    )
    feedback_endpoint: str = Field(
        "tcp://127.0.0.1:5556",
        description="Appliance binds a PUSH socket here; the controller connects PULL and receives "
        "per-tile results, errors and retake flags.",
    )
    max_in_flight: int = Field(
        8,
        ge=1,
        le=1024,
        description="Credits: tiles between receive and durable write. At the limit the ingest stops "
        "reading, the ZeroMQ pipe fills and the controller's send blocks (it is slowed, never dropped).",
    )
    receive_hwm: int = Field(2, ge=1, le=1000, description="ZeroMQ RCVHWM in messages (tiles are MBs).")
    feedback_hwm: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Feedback frames held for a controller that is not reading. At the limit tile writes wait, "
        "credits run out and the ingest stops reading (backpressure): no feedback is ever dropped.",
    )
    drain_grace_s: float = Field(
        2.0,
        ge=0.0,
        le=60.0,
        description="On stop: how long the ingest keeps reading after sending `draining`, refusing every "
        "buffered message with error `draining` so none is dropped silently (it ends sooner once the socket "
        "has been quiet for a quarter of this).",
    )
    max_tile_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Largest accepted pixel frame; larger frames are refused."
    )
    max_tile_side: int = Field(32768, ge=16, description="Largest accepted tile height or width (px).")
    implausible_blur_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Safety rule (docs/operating.md): once a section has implausible_blur_min_tiles judged "
        "tiles, a share of soft + retake tiles above this stops restoring for the rest of that section (soft "
        "tiles are written as acquired, flagged restore_suspended) and sends one `alarm` to the controller: "
        "an uncalibrated or mis-calibrated detector must not restore most of a section. 1.0 switches it off.",
    )
    implausible_blur_min_tiles: int = Field(
        50, ge=1, le=1_000_000, description="Judged tiles of a section before the safety rule may trip."
    )


class OutputConfig(_Strict):
    """Where corrected tiles, originals and the QC record are written."""

    directory: Path = Field(Path("appliance-out"), description="Root output directory (created).")
    keep_originals: bool = Field(True, description="Keep the as-acquired tile when it was modified.")
    fsync: bool = Field(True, description="fsync files before a tile counts as done (durability).")


class ReplicaConfig(_Strict):
    """How a Ray Serve deployment is replicated across local GPUs (or CPUs where none)."""

    num_replicas: int = Field(1, ge=1, le=64)
    num_gpus_per_replica: float = Field(
        0.0,
        ge=0.0,
        le=8.0,
        description="GPUs per replica: a fraction of one GPU (replicas share it), or whole GPUs; 0 runs on CPU.",
    )
    num_cpus_per_replica: float = Field(0.5, ge=0.0, le=64.0)
    max_ongoing_requests: int = Field(4, ge=1, le=1024)
    max_queued_requests: int = Field(
        16, ge=1, le=100_000, description="Serve rejects beyond this; the ingest retries, never drops."
    )
    max_batch_size: int = Field(4, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=5.0)

    @model_validator(mode="after")
    def _batch_fits_replica(self) -> ReplicaConfig:
        # A replica never holds more than max_ongoing_requests, so a larger batch could never fill.
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must not exceed max_ongoing_requests "
                f"({self.max_ongoing_requests})"
            )
        return self

    @model_validator(mode="after")
    def _gpu_share_fits_one_gpu(self) -> ReplicaConfig:
        # Ray places a fractional request inside one GPU: 1.5 GPUs could never be scheduled.
        gpus = self.num_gpus_per_replica
        if gpus > 1.0 and not gpus.is_integer():
            raise ValueError(
                f"num_gpus_per_replica ({gpus:g}) must be at most 1 (a share of one GPU) or a whole number"
            )
        return self

    @property
    def inference_threads(self) -> int:
        """Intra-op threads for one replica's model: the CPUs it reserved, at least 1.

        More only contend with the other replicas (on the shared 2-core box one thread beat two for both
        models: detector 31-47 vs 18-49 tiles/s, deblur 0.53 vs 0.30 MP/s).
        """
        return max(1, int(self.num_cpus_per_replica))

    def deployment_options(self) -> dict[str, object]:
        """Ray Serve `.options(...)` for this deployment: replicas pinned, queues bounded."""
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {
                "num_cpus": self.num_cpus_per_replica,
                "num_gpus": self.num_gpus_per_replica,
            },
        }


class DetectorConfig(ReplicaConfig):
    """Blur detector: backend and the thresholds that turn a blur estimate into a label."""

    backend: Literal["auto", "onnx", "classical"] = Field(
        "auto", description="auto = bundled learned model if present, else the classical focus metric."
    )
    model_path: Path | None = Field(None, description="ONNX model; None uses the bundled weights.")
    max_restorable_sigma_px: float = Field(
        3.0,
        gt=0.0,
        le=50.0,
        description="Largest blur (Gaussian-equivalent PSF sigma, px) the deblur model restores well; "
        "beyond it a tile is flagged for retake instead of restored.",
    )
    sharp_sigma_px: float = Field(
        0.8, gt=0.0, le=50.0, description="At or below this estimated blur a tile is `sharp`."
    )
    patch_rows: int = Field(
        32,
        ge=8,
        le=256,
        description="Rows of the detector's sheared patch lattice (appliance/detection/patches.py); with "
        "patches_per_row the patches per tile (default 32 x 4 = 128: two per cell of the 8x8 map, and a whole "
        "row or column of patches inside any strip of 1/16 of a 2400 px tile). Cost scales with the count.",
    )
    patches_per_row: int = Field(4, ge=1, le=64, description="Patches per lattice row; patch_rows / it: a power of 2.")
    local_blur_share: float = Field(
        1.0 / 16.0,
        gt=0.0,
        le=1.0,
        description="Smallest share of a tile whose blur beyond max_restorable_sigma_px makes it `retake`, wherever "
        "it lies (strips of it as thick as this share of a side).",
    )
    local_blur_window_share: float = Field(
        1.0 / 32.0,
        gt=0.0,
        le=1.0,
        description="Share of the tile each local-blur window covers (appliance/detection/local_blur.py): smaller "
        "than local_blur_share so several windows fit inside a blurred region wherever it lies.",
    )
    local_blur_min_contrast: float = Field(
        1.5,
        ge=1.0,
        le=10.0,
        description="A local-blur window counts only when its sigma is at least this many times the whole tile's "
        "(log-mean, +0.5 px): it must stand out, so a uniformly blurred tile near max_restorable_sigma_px keeps "
        "the label of its mean and worst region instead of the worst of thousands of small windows.",
    )
    local_blur_min_patches: float = Field(
        6.0,
        gt=0.0,
        le=64.0,
        description="Reliable patch-equivalents a local-blur window must hold to count (fewer: no verdict from it); "
        "6 measured: 3 let the worst of thousands of thin windows flag 25 % of tilted tiles whose blurriest corner "
        "is 2.5 px (restorable), 6 flags 3 % and still catches every 1/16 region at 4 px (model card).",
    )
    calibration: Path | None = Field(
        None,
        description="Rig calibration (`python -m appliance calibrate`): blur is then measured from this rig's "
        "in-focus baseline. Checked at start-up: the file must load and be made with the running detector "
        "model. None: the detector's own scale (that of its training data).",
    )

    @model_validator(mode="after")
    def _lattice_shears_evenly(self) -> DetectorConfig:
        shifts = self.patch_rows // self.patches_per_row
        if self.patch_rows % self.patches_per_row or shifts & (shifts - 1):
            raise ValueError(
                f"detector.patch_rows ({self.patch_rows}) / detector.patches_per_row ({self.patches_per_row}) must "
                "be a whole power of two (e.g. 32 / 4), so the lattice's rows cover every column line once"
            )
        return self

    @model_validator(mode="after")
    def _window_fits_region(self) -> DetectorConfig:
        if self.local_blur_window_share > self.local_blur_share:
            raise ValueError(
                f"detector.local_blur_window_share ({self.local_blur_window_share:g}) must not exceed "
                f"detector.local_blur_share ({self.local_blur_share:g}): a window larger than the region misses it"
            )
        return self

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> DetectorConfig:
        if self.sharp_sigma_px >= self.max_restorable_sigma_px:
            raise ValueError(
                f"detector.sharp_sigma_px ({self.sharp_sigma_px}) must be below "
                f"detector.max_restorable_sigma_px ({self.max_restorable_sigma_px})"
            )
        return self


class DeblurConfig(ReplicaConfig):
    """Deblur model: backend and tiled-inference geometry."""

    backend: Literal["auto", "onnx", "torch", "classical"] = Field(
        "auto", description="auto = fastest correct learned backend available, else classical Wiener."
    )
    model_path: Path | None = Field(
        None,
        description="Model file; None uses the bundled weights: deblur_gpu.onnx (PSF-aware) with backend auto "
        "where a CUDA GPU is visible and it was exported, else deblur.onnx (appliance.restoration.restorer).",
    )
    patch_size: int = Field(
        512,
        ge=64,
        le=4096,
        description="Side (px) of the square patches tiled inference runs on; a multiple of 16.",
    )
    patch_overlap: int = Field(
        32,
        ge=0,
        le=512,
        description="Context (px) each patch shares with its neighbours, blended out so there are no seams.",
    )
    patch_batch: int = Field(4, ge=1, le=256, description="Patches per model call (raise on a GPU).")

    @model_validator(mode="after")
    def _patch_geometry(self) -> DeblurConfig:
        if self.patch_size % 16 or self.patch_size <= 4 * self.patch_overlap:
            raise ValueError(
                f"deblur.patch_size ({self.patch_size}) must be a multiple of 16 and more than "
                f"4 x deblur.patch_overlap ({self.patch_overlap})"
            )
        return self


class RayConfig(_Strict):
    """Ray cluster to run on; defaults start a local one."""

    address: str | None = Field(None, description="Existing cluster address; None starts a local one.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (None = all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local cluster (None = detect).")


class MetricsConfig(_Strict):
    """Prometheus endpoint of the running appliance (every metric: docs/metrics.md)."""

    enabled: bool = Field(True, description="Serve /metrics over HTTP while the appliance runs.")
    address: str = Field(
        "127.0.0.1:9464",
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
        description="host:port of the endpoint. Loopback by default: a rig opens it to its monitoring host "
        "only (Ansible: deblur_appliance_monitoring_address). Port 0 picks a free port (tests, demo).",
    )

    @property
    def host_port(self) -> tuple[str, int]:
        """(host, port) to bind; brackets of an IPv6 literal removed."""
        host, _, port = self.address.rpartition(":")
        if int(port) > 65535:
            raise ValueError(f"metrics.address {self.address!r}: port {port} is above 65535")
        return host.strip("[]"), int(port)

    @model_validator(mode="after")
    def _port_in_range(self) -> MetricsConfig:
        self.host_port  # noqa: B018 - raises on a bad port, naming the field
        return self


# z85 encodes a 32-byte CURVE key as 40 printable characters (ZeroMQ RFC 32).
Z85_KEY_PATTERN = r"^[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}$"
LOOPBACK_HOSTS = frozenset({"localhost", "lo", "::1", "[::1]"})


class SecurityConfig(_Strict):
    """Who may reach the appliance: ZeroMQ CURVE keys and the local Ray cluster's token (docs/security.md)."""

    curve: bool = Field(
        False,
        description="ZeroMQ CURVE on both sockets: encrypted, and only the pinned controller keys get in. "
        "Off by default for the loopback-only default endpoints; a non-loopback endpoint without CURVE is "
        "refused unless allow_unauthenticated_network is true.",
    )
    server_secret_key_file: Path | None = Field(
        None,
        description="The rig's CURVE certificate with its secret key (`python -m appliance keys generate`, "
        "the NAME.key_secret file, mode 0600). Its public key goes to the controller vendor.",
    )
    controller_public_keys: list[Annotated[str, StringConstraints(pattern=Z85_KEY_PATTERN)]] = Field(
        default_factory=list,
        description="z85 public keys (40 characters) of the controllers allowed to connect (pinned).",
    )
    allow_unauthenticated_network: bool = Field(
        False,
        description="Explicitly allow non-loopback ZeroMQ endpoints without CURVE (anyone who reaches the "
        "ports can send tiles; only the nftables firewall stands between them and the rig).",
    )
    ray_token_file: Path | None = Field(
        None,
        description="Token file of the local Ray cluster's token authentication (created with mode 0600 "
        "when missing). None: Ray's own default, ~/.ray/auth_token of the user running the appliance.",
    )

    @model_validator(mode="after")
    def _curve_has_keys(self) -> SecurityConfig:
        if self.curve and (self.server_secret_key_file is None or not self.controller_public_keys):
            raise ValueError(
                "security.curve is true: set security.server_secret_key_file (the rig's .key_secret file) and "
                "at least one security.controller_public_keys entry (`python -m appliance keys generate`)"
            )
        return self

    @property
    def ray_token_path(self) -> Path:
        """Where the local Ray cluster's token is (created when missing)."""
        return self.ray_token_file if self.ray_token_file is not None else Path.home() / ".ray" / "auth_token"


def endpoint_is_loopback(endpoint: str) -> bool:
    """True for a ZeroMQ endpoint no other machine can reach: tcp on loopback, ipc, inproc."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].split(";")[-1]  # tcp://[source;]host:port
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host in LOOPBACK_HOSTS


class RigConfig(_Strict):
    """Everything the appliance needs to serve one microscope."""

    rig_name: str = Field("rig", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    ingest: IngestConfig = IngestConfig()
    output: OutputConfig = OutputConfig()
    detector: DetectorConfig = DetectorConfig()
    deblur: DeblurConfig = DeblurConfig()
    ray: RayConfig = RayConfig()
    metrics: MetricsConfig = MetricsConfig()
    security: SecurityConfig = SecurityConfig()

    @model_validator(mode="after")
    def _network_endpoints_need_curve(self) -> RigConfig:
        """A ZeroMQ endpoint other machines can reach must be CURVE-authenticated, or allowed explicitly."""
        if self.security.curve or self.security.allow_unauthenticated_network:
            return self
        for field in ("tile_endpoint", "feedback_endpoint"):
            endpoint = getattr(self.ingest, field)
            if not endpoint_is_loopback(endpoint):
                raise ValueError(
                    f"ingest.{field} ({endpoint}) is reachable from the network but security.curve is false: "
                    "turn CURVE on (security.curve, server_secret_key_file, controller_public_keys; "
                    "docs/security.md), bind 127.0.0.1, or set security.allow_unauthenticated_network: true"
                )
        return self

    @model_validator(mode="after")
    def _replicas_fit_the_gpus(self) -> RigConfig:
        """The GPU-share rule: every replica's GPU share placed on ray.num_gpus GPUs, at most 1 per GPU.

        Whole-GPU replicas take whole GPUs; fractional shares are packed first-fit decreasing. Checked when
        the GPU count is given (Ansible always writes it); with ray.num_gpus null Ray detects the GPUs.
        """
        if self.ray.num_gpus is not None and not gpu_shares_fit(self._gpu_shares(), self.ray.num_gpus):
            raise ValueError(
                f"detector.num_replicas x detector.num_gpus_per_replica ({self.detector.num_replicas} x "
                f"{self.detector.num_gpus_per_replica:g}) and deblur.num_replicas x deblur.num_gpus_per_replica "
                f"({self.deblur.num_replicas} x {self.deblur.num_gpus_per_replica:g}) do not fit on "
                f"ray.num_gpus ({self.ray.num_gpus}) GPUs at most 1 per GPU: Ray could never place every replica; "
                "lower the replicas or their GPU shares"
            )
        return self

    def _gpu_shares(self) -> list[float]:
        return [d.num_gpus_per_replica for d in (self.detector, self.deblur) for _ in range(d.num_replicas)]


def gpu_shares_fit(shares: list[float], gpus: int) -> bool:
    """True when replicas asking for `shares` GPUs each can be placed on `gpus` GPUs, at most 1 per GPU."""
    whole = sum(int(share) for share in shares if share >= 1.0)
    free = [1.0] * (gpus - whole) if whole <= gpus else []
    if whole > gpus:
        return False
    for share in sorted((s for s in shares if 0.0 < s < 1.0), reverse=True):
        slot = next((i for i, left in enumerate(free) if left >= share - 1e-9), None)
        if slot is None:
            return False
        free[slot] -= share
    return True


class ConfigError(ValueError):
    """rig.yaml cannot be used; the message names the file, the field and what is wrong."""


def load_rig_config(path: Path) -> RigConfig:
    """Read and validate a rig.yaml; raise ConfigError naming the bad field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return RigConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{path}: invalid config: {problems}") from exc
