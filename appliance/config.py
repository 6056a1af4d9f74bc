"""Typed configuration of one imaging rig: the single file (`rig.yaml`) a facility engineer edits.

Every field is validated at start-up, so a bad config fails before the microscope starts streaming.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)


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
    receive_buffer_bytes: int = Field(
        0,
        ge=0,
        le=1 << 30,
        description="Kernel TCP receive buffer of each tile connection (ZeroMQ RCVBUF), bytes; 0: the OS's own, "
        "autotuned up to net.ipv4.tcp_rmem's maximum (6-32 MiB), which holds several tiles before the "
        "controller's send blocks. Linux doubles the value set.",
    )
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
    drain_timeout_s: float = Field(
        45.0,
        gt=0.0,
        le=3600.0,
        description="On stop: the longest wait for the accepted tiles to be recorded. Past it, tiles held for a "
        "controller that does not read its feedback are recorded anyway (answers it never takes are lost with "
        "the socket; it resends those tiles after the restart and gets `repeat` answers); tiles still "
        "unrecorded after a second such wait are abandoned (`unanswered_at_stop`) and resent by their "
        "controller. Keep drain_grace_s + 2 x this below systemd's TimeoutStopSec (120 s by default).",
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


REPLICA_SHUTDOWN_POLL_S = 0.1


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
            # A stopping replica sleeps this long before it first counts its ongoing requests (Serve's default
            # 2 s). The appliance drains every tile before it stops Serve, so there is nothing to wait for.
            "graceful_shutdown_wait_loop_s": REPLICA_SHUTDOWN_POLL_S,
        }


class OnlineBaselineConfig(_Strict):
    """Per-beam running in-focus baseline and focus-drift alarm (docs/calibration.md)."""

    enabled: bool = Field(
        True,
        description="Track each beam's in-focus blur while the appliance runs: `focus_drift` alarms, and with a "
        "rig calibration each beam's tiles judged against that beam's own baseline (bounded).",
    )
    window: int = Field(200, ge=1, le=100_000, description="Sharp-looking tiles per beam in the running median.")
    min_tiles: int = Field(
        20, ge=1, le=100_000, description="Sharp-looking tiles a beam needs before its baseline is used or tested."
    )
    accept_log_margin: float = Field(
        1.2,
        gt=0.0,
        le=5.0,
        description="A tile counts towards its beam's baseline when its blur reading is within this of the "
        "reference in log(sigma + 0.5 px) (1.2: up to 6.1 px from a 1.5 px reference): readings no in-focus "
        "tile gives do not count. The running median itself ignores a minority of soft tiles; a tighter margin "
        "would also hide a beam that defocused in one step.",
    )
    drift_log_threshold: float = Field(
        0.25,
        gt=0.0,
        le=5.0,
        description="A beam drifts when its running baseline is further than this from the reference in "
        "log(sigma + 0.5 px) (0.25: 1.5 -> 2.07 px); it is also how far a beam's own baseline may move the "
        "labels' zero point from the rig calibration.",
    )

    @model_validator(mode="after")
    def _min_tiles_fit_window(self) -> OnlineBaselineConfig:
        if self.min_tiles > self.window:
            raise ValueError(
                f"detector.online_baseline.min_tiles ({self.min_tiles}) must not exceed "
                f"detector.online_baseline.window ({self.window})"
            )
        return self


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
    online_baseline: OnlineBaselineConfig = OnlineBaselineConfig()

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
    torch_compile: Literal["off", "default", "max-autotune-no-cudagraphs"] = Field(
        "off",
        description="Fuse the torch backend's network with torch.compile in this mode (on a GPU, the backend "
        "`auto` picks). One H100, 2400 x 2400 fp16: 18.1 tiles/s off, 55.9 default (compile ~20 s), 73.0 "
        "max-autotune-no-cudagraphs (~180 s) (README, GPU). Each replica compiles once per tile shape: set "
        "warmup_tile_shape so that happens at start. ONNX Runtime backends (every CPU rig) ignore it.",
    )
    warmup_tile_shape: tuple[int, int] | None = Field(
        None,
        description="[height, width] (px) of this rig's tiles: each replica restores one synthetic tile of this "
        "shape before it takes tiles, so model loading, cuDNN set-up and a torch_compile happen at start "
        "rather than on a section's first soft tile. null: no warm-up.",
    )

    @field_validator("warmup_tile_shape")
    @classmethod
    def _warmup_shape(cls, shape: tuple[int, int] | None) -> tuple[int, int] | None:
        if shape is not None and not all(16 <= side <= 32768 for side in shape):
            raise ValueError(f"deblur.warmup_tile_shape {list(shape)}: each side must be 16-32768 px")
        return shape

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
Z85Key = Annotated[str, StringConstraints(pattern=Z85_KEY_PATTERN)]


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
    controller_public_keys: list[Z85Key] = Field(
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
        # The controller keys are checked per microscope (RigConfig): a microscope may pin its own.
        if self.curve and self.server_secret_key_file is None:
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


MICROSCOPE_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class MicroscopeConfig(_Strict):
    """One microscope served by this appliance: its controller's sockets, its output folder, its keys.

    The detector and deblur deployments (the GPUs) are shared by every microscope; ingest flow control
    (credits), the output folder, the QC record and the feedback socket are each microscope's own.
    """

    name: str = Field(
        ...,
        pattern=MICROSCOPE_NAME_PATTERN,
        description="Short name of the microscope (metrics label `microscope`, log lines, status line).",
    )
    tile_endpoint: str = Field(..., description="Appliance binds PULL here for this microscope's controller.")
    feedback_endpoint: str = Field(..., description="Appliance binds PUSH here for this microscope's controller.")
    output_directory: Path = Field(..., description="This microscope's output root (tiles, QC record, index).")
    detector_calibration: Path | None = Field(
        None,
        description="This microscope's rig calibration (`python -m appliance calibrate` on its own in-focus "
        "tiles); None: detector.calibration.",
    )
    controller_public_keys: list[Z85Key] | None = Field(
        None,
        description="z85 public keys of this microscope's controller (CURVE): only they reach its sockets. "
        "None: security.controller_public_keys.",
    )


def endpoint_address(endpoint: str) -> str | None:
    """What two sockets on this host cannot share: `tcp:PORT` (any host binds it), else the endpoint;
    None for `tcp://host:*`, which picks a free port at start and never collides."""
    transport, _, rest = endpoint.partition("://")
    if transport != "tcp":
        return endpoint
    port = rest.rsplit(":", 1)[-1]
    return None if port == "*" else f"tcp:{port}"


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


class RigConfig(_Strict):
    """Everything the appliance needs to serve its microscopes: one (ingest + output), or several
    (`microscopes`) that share the detector and deblur deployments."""

    rig_name: str = Field("rig", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    ingest: IngestConfig = IngestConfig()
    output: OutputConfig = OutputConfig()
    detector: DetectorConfig = DetectorConfig()
    deblur: DeblurConfig = DeblurConfig()
    ray: RayConfig = RayConfig()
    metrics: MetricsConfig = MetricsConfig()
    security: SecurityConfig = SecurityConfig()
    microscopes: list[MicroscopeConfig] = Field(
        default_factory=list,
        description="Several microscopes on this appliance, each with its own endpoints and output folder "
        "(ingest.* and output.* other than the endpoints and the directory apply to each). Empty: one "
        "microscope named rig_name on ingest.tile_endpoint, ingest.feedback_endpoint and output.directory.",
    )

    @model_validator(mode="after")
    def _microscopes_name_their_own_endpoints(self) -> RigConfig:
        """With `microscopes`, the single-microscope endpoints and folder would be silently unused: refuse them."""
        if not self.microscopes:
            return self
        unused = [f"ingest.{f}" for f in ("tile_endpoint", "feedback_endpoint") if f in self.ingest.model_fields_set]
        unused += ["output.directory"] if "directory" in self.output.model_fields_set else []
        if unused:
            raise ValueError(
                f"{', '.join(unused)} set together with microscopes: each microscope names its own "
                "(microscopes[].tile_endpoint, feedback_endpoint, output_directory); remove them"
            )
        return self

    @model_validator(mode="after")
    def _microscopes_are_distinct(self) -> RigConfig:
        """Names, ports and output folders belong to one microscope each (a shared port would not bind;
        a shared or nested folder would mix two microscopes' tiles and QC records)."""
        scopes = self.served_microscopes()
        _refuse_repeats("name", [(m.name, m.name) for m in scopes])
        endpoints = [(m.name, e) for m in scopes for e in (m.tile_endpoint, m.feedback_endpoint)]
        addresses = [(f"{name} {e}", address) for name, e in endpoints if (address := endpoint_address(e)) is not None]
        _refuse_repeats("endpoint", addresses)
        folders = [(m.name, Path(os.path.abspath(m.output_directory))) for m in scopes]
        for i, (name_a, a) in enumerate(folders):
            for name_b, b in folders[i + 1 :]:
                if _overlaps(a, b):
                    raise ValueError(
                        f"microscopes {name_a!r} and {name_b!r}: output folders {a} and {b} overlap (one is or "
                        "holds the other): give each microscope a folder of its own"
                    )
        return self

    @model_validator(mode="after")
    def _network_endpoints_need_curve(self) -> RigConfig:
        """A ZeroMQ endpoint other machines can reach must be CURVE-authenticated, or allowed explicitly."""
        if self.security.curve or self.security.allow_unauthenticated_network:
            return self
        for where, endpoint in self._endpoint_fields():
            if not endpoint_is_loopback(endpoint):
                raise ValueError(
                    f"{where} ({endpoint}) is reachable from the network but security.curve is false: "
                    "turn CURVE on (security.curve, server_secret_key_file, controller_public_keys; "
                    "docs/security.md), bind 127.0.0.1, or set security.allow_unauthenticated_network: true"
                )
        return self

    @model_validator(mode="after")
    def _curve_pins_every_controller(self) -> RigConfig:
        if not self.security.curve:
            return self
        for index, scope in enumerate(self.microscopes or [None]):
            if scope is None and not self.security.controller_public_keys:
                where = "security.controller_public_keys"
            elif scope is not None and not self.security_for(scope).controller_public_keys:
                where = f"microscopes[{index}].controller_public_keys (or security.controller_public_keys)"
            else:
                continue
            raise ValueError(
                f"security.curve is true: set at least one {where} entry, the controller's z85 public key "
                "(`python -m appliance keys generate`)"
            )
        return self

    def _endpoint_fields(self) -> list[tuple[str, str]]:
        if not self.microscopes:
            return [(f"ingest.{f}", getattr(self.ingest, f)) for f in ("tile_endpoint", "feedback_endpoint")]
        return [
            (f"microscopes[{i}].{f}", getattr(m, f))
            for i, m in enumerate(self.microscopes)
            for f in ("tile_endpoint", "feedback_endpoint")
        ]

    def served_microscopes(self) -> list[MicroscopeConfig]:
        """Every microscope this appliance serves, in order: `microscopes`, or the one of ingest/output.

        The calibration and the controller keys come filled in (a microscope's own, else the rig's).
        """
        if not self.microscopes:
            single = MicroscopeConfig(
                name=self.rig_name,
                tile_endpoint=self.ingest.tile_endpoint,
                feedback_endpoint=self.ingest.feedback_endpoint,
                output_directory=self.output.directory,
            )
            return [self._filled(single)]
        return [self._filled(m) for m in self.microscopes]

    def _filled(self, scope: MicroscopeConfig) -> MicroscopeConfig:
        return scope.model_copy(
            update={
                "detector_calibration": scope.detector_calibration or self.detector.calibration,
                "controller_public_keys": self.security_for(scope).controller_public_keys,
            }
        )

    def ingest_for(self, scope: MicroscopeConfig) -> IngestConfig:
        """ingest.* with this microscope's endpoints."""
        return self.ingest.model_copy(
            update={"tile_endpoint": scope.tile_endpoint, "feedback_endpoint": scope.feedback_endpoint}
        )

    def output_for(self, scope: MicroscopeConfig) -> OutputConfig:
        """output.* with this microscope's folder."""
        return self.output.model_copy(update={"directory": scope.output_directory})

    def detector_for(self, scope: MicroscopeConfig) -> DetectorConfig:
        """detector.* with this microscope's calibration (the start-up check of its file)."""
        calibration = scope.detector_calibration or self.detector.calibration
        return self.detector.model_copy(update={"calibration": calibration})

    def security_for(self, scope: MicroscopeConfig) -> SecurityConfig:
        """security.* with this microscope's controller keys pinned (its own, else the rig's)."""
        keys = scope.controller_public_keys
        return self.security if keys is None else self.security.model_copy(update={"controller_public_keys": keys})

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


def _refuse_repeats(what: str, items: list[tuple[str, str]]) -> None:
    """items: (how to name it, the value that must be unique); raise naming both holders of a repeat."""
    seen: dict[str, str] = {}
    for label, value in items:
        if value in seen:
            raise ValueError(
                f"microscopes: {seen[value]} and {label} use the same {what} ({value}): each needs its own"
            )
        seen[value] = label


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
