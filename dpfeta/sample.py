"""The sampling stage: build or load the EMA denoiser from a checkpoint, generate the synthetic set in
batches with the configured sampler (EDM Heun or DDIM, classifier-free guidance), write class folders
and a grid. The math is ``diffusion``; this module adds the config, checkpoints and image files.
``sample_shard`` is one shard of the run's sampling stage, run where a GPU is (a Ray task) or here."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dpfeta import checkpoint, cluster, images, precision, rng
from dpfeta import progress as progress_bars
from dpfeta.config import COMPILE_MODES, Config
from dpfeta.diffusion import Denoiser, EDMPrecond, ddim_sampler, edm_sampler, randn
from dpfeta.nn.unet import UNet
from dpfeta.storage import Storage

logger = logging.getLogger(__name__)


def build_denoiser(cfg: Config) -> EDMPrecond:
    """A freshly initialised U-Net wrapped in EDM preconditioning, sized by ``cfg``."""
    return EDMPrecond(UNet.from_config(cfg), cfg.diffusion.sigma_data)


def load_denoiser(directory: Path | str, cfg: Config, *, weights: str = "ema") -> EDMPrecond:
    """Build the denoiser of ``cfg`` and load ``weights`` ("ema" or "model") from a checkpoint.

    ``directory`` is a checkpoint folder or a stage folder holding one as ``checkpoint/``.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"expected weights='ema' or 'model', got {weights!r}")
    directory = checkpoint.find(directory)
    state = checkpoint.load(directory)
    checkpoint.check_model(state["meta"], cfg, directory)
    weights_dict = state[weights] if state[weights] is not None else state["model"]
    if all(key.startswith("net.") for key in weights_dict):  # saved as EDMPrecond, not its U-Net
        weights_dict = {key[len("net.") :]: value for key, value in weights_dict.items()}
    denoiser = build_denoiser(cfg)
    denoiser.net.load_state_dict(weights_dict)
    return denoiser.eval()


def sample_batch(
    denoiser: Denoiser,
    cfg: Config,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    null_label: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Run the sampler named by ``cfg.sample.sampler`` with its settings."""
    s = cfg.sample
    common = dict(
        steps=s.steps,
        sigma_min=s.sigma_min,
        sigma_max=s.sigma_max,
        rho=s.rho,
        guidance=s.guidance,
        null_label=null_label,
    )
    if s.sampler == "edm":
        return edm_sampler(
            denoiser,
            latents,
            labels,
            churn=s.churn,
            s_min=s.s_min,
            s_max=s.s_max,
            s_noise=s.s_noise,
            generator=generator,
            **common,
        )
    if s.sampler == "ddim":
        return ddim_sampler(denoiser, latents, labels, **common)
    raise ValueError(f"config key 'sample.sampler': expected edm or ddim, got {s.sampler!r}")


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class num // C times, the first num % C classes once more."""
    if num < 0 or num_classes < 1:
        raise ValueError(f"expected num >= 0 and num_classes >= 1, got {num} and {num_classes}")
    return torch.arange(num, dtype=torch.int64) % num_classes


# ``sample.compile: auto`` compiles only when the rest of the job, timed on its first batch, would take
# at least this long eager: compiling the U-Net costs ~1 min on a 2-core CPU (less from Inductor's cache)
# and saved 7-33 % of each batch there (bench/README.md, "Roofline"), so shorter jobs would pay more than they save.
COMPILE_PAYBACK_S = 300.0
COMPILE_MIN_GAIN = 0.97  # a compiled batch must take < 0.97 x the eager one, else auto goes back to eager


def last_level_cache_bytes() -> int | None:
    """Size of this CPU's largest cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def cache_rows(denoiser: EDMPrecond, shape: tuple[int, ...], device: torch.device) -> int | None:
    """Rows per network call on a CPU: the largest power of two whose biggest activation tensor fits
    the last-level cache (None: no limit, on a GPU or where the cache size is unknown).

    Measured on a 2-core AVX2 VM (32 MiB L3): the MNIST U-Net (401 KB of activation per image at its
    widest layer) evaluates 45 images/s in calls of 4-64 images and 29 images/s in calls of 256.
    """
    cache = last_level_cache_bytes() if device.type == "cpu" else None
    if cache is None:
        return None
    largest = [0]

    def record(module, inputs, output):
        if torch.is_tensor(output):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in denoiser.modules() if not any(m.children())]
    try:
        with torch.inference_mode():
            denoiser(
                torch.zeros((1, *shape), device=device),
                torch.ones(1, device=device),
                torch.zeros(1, dtype=torch.int64, device=device),
            )
    finally:
        for hook in hooks:
            hook.remove()
    rows = max(1, cache // max(largest[0], 1))
    return 1 << (rows.bit_length() - 1)


class Network:
    """The denoiser the sampler calls: eager or ``torch.compile``d (``sample.compile``), in calls of at
    most ``rows`` images (``cache_rows``; ``sample.batch_size`` stays the unit of sampling).

    ``true`` compiles from the first full batch on; ``auto`` times the first full batch eager and
    compiles when the remaining full batches would take at least ``COMPILE_PAYBACK_S`` eager, then keeps
    the compiled network only if its second batch (the first one pays the compilation) is faster.
    Compiled calls have one shape (no recompilation): a shorter part is padded with copies of its first
    image, whose outputs are dropped (every layer works per image), or runs eager when less than half
    full. Compilation errors (no C++ compiler on a node, an unsupported backend) fall back to eager
    with a warning under ``auto`` and raise under ``true``. Compiled, eager and split calls compute the
    same function; their floats may differ in the last bits (kernels sum in another order).
    """

    def __init__(self, denoiser: EDMPrecond, mode: str, batch_size: int, batches: int, rows: int | None = None):
        if mode not in COMPILE_MODES:
            raise ValueError(f"config key 'sample.compile': expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.eager, self.mode, self.batch_size, self.left, self.rows = denoiser, mode, batch_size, batches, rows
        self.compiled: Callable | None = None
        self.compiled_rows: int | None = None  # the one shape the compiled network sees
        self.eager_s: float | None = None  # seconds of a full eager batch
        self.compiled_batches = 0
        self.failed = False
        self.state = "compile" if mode == "true" else "eager"  # what full batches run
        self.current = "eager"  # what the batch in flight runs

    def for_batch(self, size: int) -> Callable:
        """The network for the next batch of ``size`` images."""
        compiled = size == self.batch_size and self.state == "compile" and not self.failed
        if compiled and self.compiled is None:
            logger.info("sample: compiling the denoiser with torch.compile (sample.compile=%s)", self.mode)
            self.compiled = torch.compile(self.eager, dynamic=False)
        self.current = "compiled" if compiled else "eager"
        return self._call

    def _call(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(n)
        part = min(self.rows or n, n)
        if self.current == "compiled" and self.compiled_rows is None:
            self.compiled_rows = part
        outs = [self._part(x[i : i + part], sigma[i : i + part], labels[i : i + part]) for i in range(0, n, part)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _part(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m, full = x.shape[0], self.compiled_rows
        if self.current != "compiled" or self.failed or 2 * m < full:
            return self.eager(x, sigma, labels)
        pad = full - m
        if pad:
            x, sigma, labels = (torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) for t in (x, sigma, labels))
        try:
            return self.compiled(x, sigma, labels)[:m]
        except Exception as exc:  # noqa: BLE001 - any compiler failure; eager recomputes the same call
            if self.mode == "true":
                raise RuntimeError(
                    f"sample.compile=true: torch.compile failed on this node ({exc}); "
                    "set sample.compile to auto or false"
                ) from exc
            logger.warning("sample: torch.compile failed (%s: %s); sampling eager", type(exc).__name__, exc)
            self.failed = True
            return self.eager(x[:m], sigma[:m], labels[:m])

    def done(self, size: int, seconds: float) -> None:
        """Record the finished batch; decides whether later full batches compile (``auto``)."""
        self.left -= 1
        if size != self.batch_size or self.failed:
            return
        if self.current == "eager":
            self.eager_s = seconds if self.eager_s is None else min(self.eager_s, seconds)
            if self.mode == "auto" and self.state == "eager" and self.compiled is None:
                if seconds * self.left >= COMPILE_PAYBACK_S:
                    logger.info(
                        "sample: %d batches left at %.1f s each eager: compiling (sample.compile=auto)",
                        self.left,
                        seconds,
                    )
                    self.state = "compile"
            return
        self.compiled_batches += 1
        if self.mode != "auto" or self.eager_s is None or self.compiled_batches != 2:
            return  # the first compiled batch paid the compilation; later ones are not judged again
        if seconds >= COMPILE_MIN_GAIN * self.eager_s:
            logger.info("sample: compiled batch %.1f s vs eager %.1f s: back to eager", seconds, self.eager_s)
            self.state = "eager"
        else:
            logger.info(
                "sample: compiled batch %.1f s vs eager %.1f s (x%.2f)", seconds, self.eager_s, self.eager_s / seconds
            )


@torch.no_grad()
def generate(
    denoiser: EDMPrecond,
    cfg: Config,
    num: int,
    *,
    generator: torch.Generator | None,
    progress: bool = True,
    labels: torch.Tensor | None = None,
    out_dir: Path | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num`` images in batches of ``cfg.sample.batch_size`` -> (uint8 [N,C,H,W], int64 [N]).

    Labels default to ``balanced_labels``: the same count per class (as benchmark protocols do; the
    official code draws them uniformly at random); the null class is never drawn.
    With ``out_dir``, writes ``out_dir/images/<label>/<i>.png`` and ``out_dir/grid.png``.
    """
    d = cfg.data
    device = next(denoiser.parameters()).device
    if labels is None:
        labels = balanced_labels(num, d.num_classes)
    labels = labels.to(torch.int64).cpu()
    if len(labels) != num:
        raise ValueError(f"expected {num} labels, got {len(labels)}")
    was_training = denoiser.training
    denoiser.eval()
    batches = labels.split(cfg.sample.batch_size)
    rows = cache_rows(denoiser, (d.channels, d.resolution, d.resolution), device) if batches else None
    network = Network(denoiser, cfg.sample.compile, len(batches[0]) if batches else 0, len(batches), rows)
    out, start, done = [], time.perf_counter(), 0
    for batch_labels in batches:
        like = torch.empty(0, device=device)
        latents = randn((len(batch_labels), d.channels, d.resolution, d.resolution), generator, like)
        net, begin = network.for_batch(len(batch_labels)), time.perf_counter()
        # No autograd bookkeeping at all; the network in run.precision, the sampler state stays fp32.
        with torch.inference_mode(), precision.autocast(cfg.run.precision, device):
            x = sample_batch(net, cfg, latents, batch_labels.to(device), null_label=d.num_classes, generator=generator)
        out.append(images.to_uint8(x))  # functional, outside inference mode: an ordinary tensor
        network.done(len(batch_labels), time.perf_counter() - begin)
        done += len(batch_labels)
        progress_bars.advance("sample", len(batch_labels))
        if progress:
            rate = done / (time.perf_counter() - start)
            logger.info(
                "sample %d/%d images (%.1f img/s, %s %d steps)", done, num, rate, cfg.sample.sampler, cfg.sample.steps
            )
    denoiser.train(was_training)
    result = torch.cat(out) if out else torch.empty(0, d.channels, d.resolution, d.resolution, dtype=torch.uint8)
    if out_dir is not None:
        images.save_class_folders(result, labels, Path(out_dir) / "images")
        images.save_class_grid(result, labels, Path(out_dir) / "grid.png")
    return result, labels


def sample_shard(
    cfg: Config, weights: Storage, out: Storage, marks: Storage, index: int, start: int, labels: np.ndarray
) -> dict:
    """One sampling shard, where a GPU is (a Ray task) or here: read the EMA weights from the storage,
    write ``images/<label>/<start+i>.png`` to ``out`` (each file atomically), then the shard's marker
    ``<index>.json`` to ``marks``. A shard redone after a lost node rewrites the same names."""
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpfeta-sample-") as tmp:
        src = weights.local_path
        if src is None:
            src = Path(tmp) / "weights"
            weights.get_dir("", src)
        denoiser = load_denoiser(src, cfg, weights="ema").to(cluster.device(cfg))
        g = rng.make_generator(cfg.run.seed, stream="sample", rank=index)
        x, y = generate(denoiser, cfg, len(labels), generator=g, labels=torch.as_tensor(np.asarray(labels, np.int64)))
        staged = out.local_path if out.is_local else Path(tmp) / "samples"
        images.save_class_folders(x, y, staged / "images", start=start)
        if not out.is_local:
            for path in sorted((staged / "images").rglob("*.png")):
                out.write_bytes(path.relative_to(staged).as_posix(), path.read_bytes())
    meta = {
        "index": index,
        "start": start,
        "num": int(len(labels)),
        "seconds": round(time.perf_counter() - begin, 1),
        "node": cluster.node_id(),
    }
    marks.write_json(f"{index:05d}.json", meta)
    return meta
