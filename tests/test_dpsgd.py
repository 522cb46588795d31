"""DP-SGD math in one process: K-folded per-example gradients, clipping, noise, sampling, resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, tiny_config
from torch import nn

from dpfeta import checkpoint, config, dpsgd, finetune, privacy, rng
from dpfeta.data import ImageSet
from dpfeta.diffusion import EDMPrecond
from dpfeta.nn import UNet

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def dp_cfg(**updates) -> config.Config:
    """conftest's TINY_UNET with a DP-SGD plan of a few steps; ``a__b=v`` overrides ``a.b``."""
    base = {
        "central.rounds": 0,
        "central.batch_size": 4,
        "finetune.batch_size": 4,
        "finetune.epochs": 1.0,
        "finetune.noise_multiplicity": 2,
        "finetune.physical_batch_size": 3,
        "finetune.checkpoint_every": 2,
        "finetune.log_every": 1,
        "privacy.epsilon": 1000.0,
        "privacy.noise_multiplier": 1.0,
        "run.seed": 0,
    }
    base.update({k.replace("__", "."): v for k, v in updates.items()})
    return config.replace(tiny_config(base=TINY_UNET), base)


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet.from_config(dp_cfg())
    with torch.no_grad():  # zero-initialised output layers would hide most gradients
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def fixed_rows(batch: int, K: int, seed: int = 1, nan_example: int | None = None):
    """Images and a deterministic per-row EDM loss (noise levels and noise drawn once per row).

    ``rows(module, images, index, draws=range(K))``: ``images`` are the clean images of examples
    ``index`` (passed as the labels); the rows of example b are its draws ``draws``, contiguous.
    ``nan_example``: that image is NaN.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 3, (batch,), generator=g)
    sigma = (torch.randn(batch * K, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(batch * K, 1, 8, 8, generator=g) * sigma[:, None, None, None]
    if nan_example is not None:
        x[nan_example] = float("nan")

    def rows(module: nn.Module, images: torch.Tensor, index: torch.Tensor, draws: range = range(K)) -> torch.Tensor:
        r = (index[:, None] * K + torch.tensor(list(draws))).flatten()
        xr = images.repeat_interleave(len(draws), 0)
        out = EDMPrecond(module, 0.5)(xr + noise[r], sigma[r], y[index].repeat_interleave(len(draws), 0))
        return ((out - xr) ** 2).flatten(1).mean(1)

    return x, rows


def naive_per_example(net: nn.Module, x: torch.Tensor, rows) -> torch.Tensor:
    """Gradient of each example's K-averaged loss, one example at a time."""
    out = []
    for b in range(len(x)):
        net.zero_grad()
        rows(net, x[b : b + 1], torch.tensor([b])).mean().backward()
        out.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    return torch.stack(out)


def privatised(
    private: dpsgd.DPSGD, x: torch.Tensor, index: torch.Tensor, rows
) -> tuple[torch.Tensor, dpsgd.StepStats]:
    stats = private.privatise(x[index], index, rows)
    return torch.cat([p.grad.flatten() for p in private.params]), stats


@pytest.mark.parametrize("K", [1, 3, 9])  # K < 8 and K >= 8 take different conv paths
def test_folded_per_example_gradients_equal_a_naive_loop(K):
    batch, net = 3, tiny_unet()
    x, rows = fixed_rows(batch, K)
    reference = naive_per_example(net, x, rows)
    module = dpsgd.FoldedGradSampleModule(copy.deepcopy(net), noise_multiplicity=K)
    rows(module, x, torch.arange(batch)).view(batch, K).mean(1).sum().backward()
    got = torch.cat([p.grad_sample.reshape(batch, -1) for p in module._module.parameters()], 1)
    assert got.shape == reference.shape
    assert torch.allclose(got, reference, atol=1e-6, rtol=1e-4), (got - reference).abs().max()


def test_privatised_sum_equals_the_naive_sum_of_clipped_gradients():
    batch, K, C = 5, 3, 0.05
    net = tiny_unet()
    x, rows = fixed_rows(batch, K)
    per_example = naive_per_example(net, x, rows)
    norms = per_example.norm(dim=1)
    assert (norms > C).any() and (norms < C).any(), norms  # both regimes are exercised
    expected = (per_example * torch.clamp(C / (norms + 1e-6), max=1.0)[:, None]).sum(0) / 2.5
    private = dpsgd.DPSGD(
        copy.deepcopy(net),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=2.5,
        noise_multiplicity=K,
        physical_batch_size=2,
        noise_generator=None,
    )
    got, stats = privatised(private, x, torch.arange(batch), rows)
    assert len(private._backward_to) < len(private.params) // 2  # the short backward pass was used
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4)
    assert stats.examples == batch and stats.clipped == int((norms > C).sum()) and stats.workers == 1

    # A loss that does not read the images it is given still gets every gradient (full backward).
    fallback = dpsgd.DPSGD(
        copy.deepcopy(net),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=2.5,
        noise_multiplicity=K,
        physical_batch_size=2,
        noise_generator=None,
    )
    got, _ = privatised(
        fallback, x, torch.arange(batch), lambda m, images, index, draws: rows(m, x[index], index, draws)
    )
    assert len(fallback._backward_to) == len(fallback.params)
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4)


def test_clipped_norms_are_at_most_C_and_non_finite_gradients_are_dropped():
    batch, K, C = 4, 2, 0.01
    net = tiny_unet()
    x, rows = fixed_rows(batch, K)
    private = dpsgd.DPSGD(
        net,
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=1.0,
        noise_multiplicity=K,
        physical_batch_size=1,
        noise_generator=None,
    )
    for b in range(batch):  # one example alone: the update is its clipped gradient
        got, stats = privatised(private, x, torch.tensor([b]), rows)
        assert got.norm() <= C and got.norm() > 0.999 * C and stats.clipped == 1

    x_nan, rows_nan = fixed_rows(batch, K, nan_example=1)
    with_nan, stats = privatised(private, x_nan, torch.tensor([0, 1, 2]), rows_nan)
    without, _ = privatised(private, x, torch.tensor([0, 2]), rows)
    assert torch.isfinite(with_nan).all() and torch.allclose(with_nan, without)
    assert stats.clipped == 3 and stats.examples == 3
    assert dpsgd.clip_factors(torch.tensor([float("inf"), float("nan"), 0.0]), 1.0).tolist() == [0.0, 0.0, 1.0]


def test_micro_batch_size_does_not_change_the_update():
    batch, K = 16, 2
    net = tiny_unet()
    x, rows = fixed_rows(batch, K)
    updates = []
    for physical in (4, 16):
        model = copy.deepcopy(net)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        private = dpsgd.DPSGD(
            model,
            noise_multiplier=1.0,
            max_grad_norm=0.1,
            expected_batch_size=8.0,
            noise_multiplicity=K,
            physical_batch_size=physical,
            noise_generator=torch.Generator().manual_seed(7),
        )
        private.privatise(x, torch.arange(batch), rows)
        optimizer.step()
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(updates[0], updates[1], atol=1e-6)


class ZeroSignal(nn.Module):
    """A model whose loss does not depend on its parameters' values: every gradient is zero."""

    def __init__(self, size: int = 4096):
        super().__init__()
        self.linear = nn.Linear(size // 8, 8, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def zero_rows(module, images, labels, *args):
    """Per-row loss (K = 2 rows per example) through the model, with a zero gradient."""
    return module(torch.ones(len(images) * 2, 512)).sum(1) * 0.0


def test_noise_is_sigma_C_over_qN_also_on_an_empty_batch():
    sigma, C, expected_batch = 2.0, 0.5, 10.0
    private = dpsgd.DPSGD(
        ZeroSignal(),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=expected_batch,
        noise_multiplicity=2,
        physical_batch_size=4,
        noise_generator=torch.Generator().manual_seed(3),
    )
    for batch in (6, 0):
        stats = private.privatise(torch.zeros(batch, 1), torch.zeros(batch), zero_rows)
        noise = private.params[0].grad.flatten()
        assert stats.examples == batch
        assert abs(noise.std().item() / (sigma * C / expected_batch) - 1) < 0.05
        assert abs(noise.mean().item()) < 4 * sigma * C / expected_batch / math.sqrt(noise.numel())


def test_poisson_sampler_includes_each_record_with_probability_q():
    n, q, steps = 400, 0.1, 1500
    counts = torch.zeros(n)
    sampler = dpsgd.PoissonSampler(n, sample_rate=q, generator=rng.make_generator(0, stream="sample", rank=0, step=0))
    for _ in range(steps):
        counts[sampler.sample()] += 1
    frequency = counts / steps
    assert abs(frequency.mean().item() - q) < 0.003
    assert (frequency - q).abs().max().item() < 5 * math.sqrt(q * (1 - q) / steps)
    # Expected local batch 0.5: empty batches are returned, never skipped.
    small = dpsgd.PoissonSampler(5, sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    sizes = [len(small.sample()) for _ in range(200)]
    assert sizes.count(0) > 100 and len(sizes) == 200


def test_generators_are_distinct_per_rank_and_stream_and_fresh_without_seed():
    def draw(**kw):
        return torch.rand(4, generator=rng.make_generator(**kw)).tolist()

    base = dict(seed=5, stream="sample", rank=0, step=0)
    assert draw(**base) == draw(**base)
    for change in ({"rank": 1}, {"stream": "noise"}, {"step": 4}):
        assert draw(**{**base, **change}) != draw(**base)
    assert draw(**{**base, "seed": None}) != draw(**{**base, "seed": None})


def images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64), 3)


def test_loop_resumes_from_its_checkpoint_to_exactly_T(tmp_path):
    cfg = dp_cfg()
    train = images(12)
    plan = privacy.plan(cfg, len(train))  # q = 4/12, T = 3... from epochs 1
    assert plan.steps == 3
    reporter = finetune.LocalReporter(tmp_path / "ckpt")

    def fail(step):
        if step == 2:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        finetune.train_finetune(
            cfg, train, plan=plan, init_dir=None, resume_dir=None, reporter=reporter, before_step=fail
        )
    assert checkpoint.load(reporter.resume_dir())["meta"]["step"] == 2
    final = finetune.train_finetune(
        cfg, train, plan=plan, init_dir=None, resume_dir=reporter.resume_dir(), reporter=reporter
    )
    state = checkpoint.load(reporter.resume_dir())
    meta = state["meta"]
    assert final["step"] == meta["step"] == plan.steps and meta["attempt_first_step"] == 2
    assert meta["noise_multiplier"] == plan.noise_multiplier and set(state) >= {"model", "ema", "optimizer"}
    ledger = privacy.Ledger.from_state_dict(meta["ledger"])
    assert ledger.get("dpsgd").taken == plan.steps
    assert final["epsilon"] == pytest.approx(plan.epsilon, rel=1e-9)
    assert [h["step"] for h in reporter.history] == [1, 2, 3]
    assert {"nondp/loss", "nondp/clip_fraction", "epsilon", "nimg", "sec_per_step"} <= set(final)
    assert final["nimg"] == round(3 * 4)
    # A changed plan cannot resume: sigma is decided once.
    other = privacy.plan(dp_cfg(privacy__noise_multiplier=2.0), len(train))
    with pytest.raises(ValueError, match="sigma is decided once"):
        finetune.train_finetune(
            cfg, train, plan=other, init_dir=None, resume_dir=reporter.resume_dir(), reporter=reporter
        )


def test_warm_start_takes_raw_weights_with_fresh_ema_and_release_mode_hides_nondp(tmp_path):
    cfg = dp_cfg(finetune__lr=0.0, tracking__nondp=False, finetune__checkpoint_every=0)
    warm, other = tiny_unet(1), tiny_unet(2)
    checkpoint.save(tmp_path / "warmup" / "checkpoint", model=warm, ema=other, meta={"config": cfg.to_dict()})
    plan = privacy.plan(cfg, 12)
    reporter = finetune.LocalReporter(tmp_path / "ckpt")
    final = finetune.train_finetune(
        cfg, images(12), plan=plan, init_dir=tmp_path / "warmup", resume_dir=None, reporter=reporter
    )
    assert not any(k.startswith("nondp/") for k in final)
    state = checkpoint.load(reporter.resume_dir())
    for name, value in warm.state_dict().items():  # lr 0: raw and EMA weights stay the warm-up's raw ones
        assert torch.equal(state["model"][name], value) and torch.equal(state["ema"][name], value)


# --------------------------------------------------------------------------------------------
# Memory independent of K: micro-batches count rows, an example's draws may be split
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("physical", [1, 2, 4, 9, 13, 64])
def test_micro_batches_cover_every_row_once_within_the_row_budget(physical):
    batch, K = 5, 9
    private = dpsgd.DPSGD(
        tiny_unet(),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=1.0,
        noise_multiplicity=K,
        physical_batch_size=physical,
        noise_generator=None,
    )
    seen = []
    for examples, draws in private.micro_batches(batch):
        size = len(range(batch)[examples])
        assert 1 <= size * len(draws) <= physical
        seen += [(b, k) for b in range(batch)[examples] for k in draws]
    assert sorted(seen) == [(b, k) for b in range(batch) for k in range(K)]


@pytest.mark.parametrize("physical", [1, 4, 9, 27])  # K=9: 9 parts, 3 parts (4+4+1), whole, 3 examples
def test_draws_split_across_micro_batches_equal_the_naive_per_example_loop(physical):
    batch, K, C = 4, 9, 0.26
    net = tiny_unet()
    x, rows = fixed_rows(batch, K)
    per_example = naive_per_example(net, x, rows)
    norms = per_example.norm(dim=1)
    assert (norms > C).any() and (norms < C).any(), norms
    expected = (per_example * torch.clamp(C / (norms + 1e-6), max=1.0)[:, None]).sum(0) / 3.0
    private = dpsgd.DPSGD(
        copy.deepcopy(net),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=3.0,
        noise_multiplicity=K,
        physical_batch_size=physical,
        noise_generator=None,
    )
    assert max(len(range(batch)[e]) * len(d) for e, d in private.micro_batches(batch)) <= physical
    got, stats = privatised(private, x, torch.arange(batch), rows)
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4), (got - expected).abs().max()
    assert stats.examples == batch and stats.clipped == int((norms > C).sum())
    naive_loss = sum(rows(net, x[b : b + 1], torch.tensor([b])).mean().item() for b in range(batch))
    assert stats.loss_sum == pytest.approx(naive_loss, rel=1e-5)


def test_split_draws_of_a_non_finite_example_drop_the_whole_example():
    batch, K, C = 3, 4, 0.01
    net = tiny_unet()
    x_nan, rows_nan = fixed_rows(batch, K, nan_example=1)
    x, rows = fixed_rows(batch, K)
    private = dpsgd.DPSGD(
        net,
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=1.0,
        noise_multiplicity=K,
        physical_batch_size=3,
        noise_generator=None,
    )
    with_nan, stats = privatised(private, x_nan, torch.arange(batch), rows_nan)
    without, _ = privatised(private, x, torch.tensor([0, 2]), rows)
    assert torch.isfinite(with_nan).all() and torch.allclose(with_nan, without)
    assert stats.clipped == 3 and stats.examples == 3


# --------------------------------------------------------------------------------------------
# bf16 compute, fp32 privacy arithmetic
# --------------------------------------------------------------------------------------------


def test_bf16_per_example_gradients_are_fp32_and_close_to_fp32_ones():
    batch, K = 3, 3
    net = tiny_unet()
    x, rows = fixed_rows(batch, K)
    reference = naive_per_example(net, x, rows)
    module = dpsgd.FoldedGradSampleModule(copy.deepcopy(net), noise_multiplicity=K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rows(module, x, torch.arange(batch)).view(batch, K).mean(1).sum()
    loss.backward()
    got = torch.cat([p.grad_sample.reshape(batch, -1) for p in module._module.parameters()], 1)
    assert {p.grad_sample.dtype for p in module._module.parameters()} == {torch.float32}
    cosine = torch.nn.functional.cosine_similarity(got, reference, dim=1)
    assert (cosine > 0.995).all(), cosine  # bf16 rounding only ...
    assert not torch.allclose(got, reference, atol=1e-6, rtol=1e-4)  # ... but it did compute in bf16
    assert torch.allclose(got.norm(dim=1), reference.norm(dim=1), rtol=0.02)


def test_bf16_path_clips_fp32_vectors_to_C_and_adds_fp32_noise():
    batch, K, C = 4, 2, 0.01
    private = dpsgd.DPSGD(
        tiny_unet(),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=1.0,
        noise_multiplicity=K,
        physical_batch_size=2,
        noise_generator=None,
        precision="bf16",
    )
    assert private.precision == "bf16"
    clipped = []
    original = private._clip_and_add

    def spy(grads, losses, total, stats):  # what is clipped: fp32 vectors, clipped norm <= C in fp32
        assert {g.dtype for g in grads} == {torch.float32}
        norms = torch.cat(grads, dim=1).norm(dim=1)
        clipped.append((norms * dpsgd.clip_factors(norms, C)).max().item())
        original(grads, losses, total, stats)

    private._clip_and_add = spy
    x, rows = fixed_rows(batch, K)
    for b in range(batch):  # one example alone: the update is its clipped gradient
        got, stats = privatised(private, x, torch.tensor([b]), rows)
        assert got.dtype == torch.float32 and stats.clipped == 1
        assert 0.999 * C < got.norm().item() <= C
    assert len(clipped) == batch and max(clipped) <= C

    sigma, expected_batch = 2.0, 10.0
    noisy = dpsgd.DPSGD(
        ZeroSignal(),
        noise_multiplier=sigma,
        max_grad_norm=0.5,
        expected_batch_size=expected_batch,
        noise_multiplicity=2,
        physical_batch_size=4,
        noise_generator=torch.Generator().manual_seed(3),
        precision="bf16",
    )
    noisy.privatise(torch.zeros(6, 1), torch.zeros(6), zero_rows)
    noise = noisy.params[0].grad.flatten()
    assert noise.dtype == torch.float32
    assert abs(noise.std().item() / (sigma * 0.5 / expected_batch) - 1) < 0.05
    assert (noise != noise.bfloat16().float()).float().mean() > 0.95  # fp32 draws, not bf16-rounded
