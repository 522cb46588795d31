"""EDM preconditioning, loss and samplers against closed forms, oracles and mocks."""

import math

import pytest
import torch
from conftest import TINY_UNET, tiny_config

from dpfeta import config
from dpfeta.diffusion import EDMPrecond, ddim_sampler, edm_loss, edm_loss_rows, edm_sampler, guided, time_grid
from dpfeta.images import load_class_folders
from dpfeta.sample import build_denoiser, generate

SD = math.sqrt(1 / 3)
LOSS = dict(P_mean=-1.2, P_std=1.2, sigma_data=SD, num_classes=3)


class ZeroNet(torch.nn.Module):
    """F = 0 (so D = c_skip x); records what the denoiser feeds it."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, labels):
        self.calls.append((x.clone(), c_noise.clone(), labels.clone()))
        return torch.zeros_like(x)


def unet_cfg(*overrides):
    return tiny_config(*overrides, base=TINY_UNET)


# Preconditioning ------------------------------------------------------------------------------


def test_preconditioning_limits_and_closed_forms():
    pre = EDMPrecond(ZeroNet(), SD)
    c_skip, c_out, c_in, c_noise = pre.coefficients(torch.tensor([1e-6, 1e-4], dtype=torch.float64))
    assert torch.allclose(c_skip, torch.ones(2, dtype=torch.float64), atol=1e-7)
    assert torch.all(c_out < 1e-4 + 1e-12) and torch.all(c_out > 0)
    sigma = torch.tensor([0.002, 0.1, SD, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    assert torch.allclose(c_in, 1 / torch.sqrt(sigma**2 + SD**2), rtol=1e-12)
    assert torch.allclose(c_noise, torch.log(sigma) / 4, rtol=1e-12)
    assert torch.allclose(c_skip, SD**2 / (sigma**2 + SD**2), rtol=1e-12)
    assert torch.allclose(c_out, sigma * SD / torch.sqrt(sigma**2 + SD**2), rtol=1e-12)
    assert c_skip[-1] < 1e-4 and abs(c_out[-1] - SD) < 1e-4  # sigma -> inf


def test_precond_forward_scales_input_and_output():
    net = ZeroNet()
    pre = EDMPrecond(net, SD)
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 3.0])
    out = pre(x, sigma, torch.tensor([0, 3]))
    scale = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(out, SD**2 / (scale**2 + SD**2) * x)
    x_in, c_noise, labels = net.calls[0]
    assert torch.allclose(x_in, x / torch.sqrt(scale**2 + SD**2))
    assert torch.allclose(c_noise, sigma.log() / 4) and labels.tolist() == [0, 3]
    pre(x, torch.tensor(2.0), torch.tensor([0, 1]))  # a scalar sigma broadcasts over the batch
    assert net.calls[1][1].shape == (2,)


# Loss -----------------------------------------------------------------------------------------


def test_loss_shape_rows_and_k_equals_mean_of_single_draws():
    denoiser = build_denoiser(unet_cfg()).eval()
    images, labels = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1])
    K = 4
    loss = edm_loss(
        denoiser, images, labels, label_drop_prob=0.0, K=K, generator=torch.Generator().manual_seed(3), **LOSS
    )
    rows = edm_loss_rows(
        denoiser, images, labels, label_drop_prob=0.0, K=K, generator=torch.Generator().manual_seed(3), **LOSS
    )
    singles = edm_loss(
        denoiser,
        images.repeat_interleave(K, 0),
        labels.repeat_interleave(K, 0),
        label_drop_prob=0.0,
        K=1,
        generator=torch.Generator().manual_seed(3),
        **LOSS,
    )
    assert loss.shape == (5,) and rows.shape == (5 * K,)
    assert torch.allclose(loss, rows.view(5, K).mean(1), atol=1e-6)
    assert torch.allclose(loss, singles.view(5, K).mean(1), atol=1e-5)
    assert rows.view(5, K).std(1).min() > 0  # the K draws differ


def test_loss_value_matches_formula_with_replayed_draws():
    images, labels = torch.rand(3, 1, 4, 4) * 2 - 1, torch.tensor([0, 1, 2])
    K = 2
    loss = edm_loss(
        EDMPrecond(ZeroNet(), SD),
        images,
        labels,
        label_drop_prob=0.1,
        K=K,
        generator=torch.Generator().manual_seed(7),
        **LOSS,
    )
    g = torch.Generator().manual_seed(7)  # replay: sigma, noise, label drop
    x = images.repeat_interleave(K, 0)
    sigma = (torch.randn(6, 1, 1, 1, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(x.shape, generator=g) * sigma
    weight = (sigma**2 + SD**2) / (sigma * SD) ** 2
    denoised = SD**2 / (sigma**2 + SD**2) * (x + noise)
    expected = (weight * (denoised - x) ** 2).flatten(1).mean(1).view(3, K).mean(1)
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_label_drop_is_per_example_and_sigma_is_lognormal():
    net = ZeroNet()
    batch, K = 4000, 3
    edm_loss(
        EDMPrecond(net, SD),
        torch.zeros(batch, 1, 2, 2),
        torch.zeros(batch, dtype=torch.long),
        label_drop_prob=0.25,
        K=K,
        generator=torch.Generator().manual_seed(0),
        **LOSS,
    )
    _, c_noise, labels = net.calls[0]
    labels = labels.view(batch, K)
    assert torch.all(labels == labels[:, :1])  # one drop decision per example, repeated K times
    dropped = (labels[:, 0] == 3).float().mean().item()
    assert abs(dropped - 0.25) < 0.03 and set(labels.unique().tolist()) == {0, 3}
    log_sigma = 4 * c_noise
    assert abs(log_sigma.mean().item() + 1.2) < 0.05 and abs(log_sigma.std().item() - 1.2) < 0.05


def test_loss_is_reproducible_under_the_generator():
    denoiser = EDMPrecond(ZeroNet(), SD)
    images, labels = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])

    def run(seed):
        return edm_loss(
            denoiser, images, labels, label_drop_prob=0.1, K=2, generator=torch.Generator().manual_seed(seed), **LOSS
        )

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    with pytest.raises(ValueError, match="K >= 1"):
        edm_loss(denoiser, images, labels, label_drop_prob=0.1, K=0, generator=None, **LOSS)


# Samplers -------------------------------------------------------------------------------------


def test_time_grid_endpoints_and_shape():
    t = time_grid(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert t.shape == (19,) and t[0].item() == pytest.approx(80.0, rel=1e-12)
    assert t[-2].item() == pytest.approx(0.002, rel=1e-12) and t[-1].item() == 0.0
    assert torch.all(t[1:] < t[:-1])
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # i/(N-1) = 1/2 at N = 3
    assert time_grid(3, sigma_min=0.002, sigma_max=80.0, rho=7.0)[1].item() == pytest.approx(mid, rel=1e-12)


SAMPLER = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance=0.0, null_label=3)
CHURN = dict(s_min=0.05, s_max=50.0, s_noise=1.0)


@pytest.mark.parametrize("churn", [0.0, 10.0, 200.0])
def test_edm_sampler_with_oracle_denoiser_returns_x0(churn):
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1

    def oracle(x, sigma, labels):
        return x0.expand_as(x)

    out = edm_sampler(
        oracle,
        torch.randn(6, 1, 4, 4),
        torch.zeros(6, dtype=torch.long),
        steps=12,
        churn=churn,
        generator=torch.Generator().manual_seed(0),
        **CHURN,
        **SAMPLER,
    )
    assert (out - x0).abs().max().item() <= 1e-5


def test_ddim_sampler_with_oracle_denoiser_returns_x0():
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    out = ddim_sampler(
        lambda x, s, y: x0.expand_as(x), torch.randn(6, 1, 4, 4), torch.zeros(6, dtype=torch.long), steps=12, **SAMPLER
    )
    assert torch.allclose(out, x0)


def test_ddim_on_gaussian_data_follows_the_exact_ode():
    """Data ~ N(0, s^2): D(x, t) = s^2/(s^2+t^2) x; the ODE solution is x_T * s / sqrt(s^2+T^2)."""
    s = 0.5
    latents = torch.randn(1000, 1, 1, 1, dtype=torch.float64)
    out = ddim_sampler(
        lambda x, t, y: s**2 / (s**2 + t.view(-1, 1, 1, 1) ** 2) * x,
        latents,
        torch.zeros(1000, dtype=torch.long),
        steps=400,
        **SAMPLER,
    )
    exact = latents * 80.0 * s / math.sqrt(s**2 + 80.0**2)
    assert (out - exact).abs().max().item() < 2e-2
    assert abs(out.std().item() - s * latents.std().item()) < 1e-2


def test_cfg_zero_equals_unguided_and_formula():
    denoiser = build_denoiser(unet_cfg()).eval()
    x, sigma, y = torch.randn(4, 1, 8, 8), torch.full((4,), 1.5), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        cond, uncond = denoiser(x, sigma, y), denoiser(x, sigma, torch.full_like(y, 3))
        assert guided(denoiser, 0.0, 3) is denoiser
        assert torch.allclose(guided(denoiser, 0.7, 3)(x, sigma, y), 1.7 * cond - 0.7 * uncond, atol=1e-5)
        common = dict(steps=4, churn=10.0, **CHURN, sigma_min=0.002, sigma_max=80.0, rho=7.0, null_label=3)
        latents = torch.randn(4, 1, 8, 8)
        plain = edm_sampler(denoiser, latents, y, guidance=0.0, generator=torch.Generator().manual_seed(1), **common)
        tiny_w = edm_sampler(denoiser, latents, y, guidance=1e-7, generator=torch.Generator().manual_seed(1), **common)
    assert torch.allclose(plain, tiny_w, atol=1e-4)


@pytest.mark.parametrize("sampler", ["edm", "ddim"])
def test_generate_batches_labels_and_files(tmp_path, sampler):
    cfg = unet_cfg(f"sample.sampler={sampler}", "sample.steps=3", "sample.batch_size=4")
    denoiser = build_denoiser(cfg)
    imgs, labels = generate(
        denoiser, cfg, 10, generator=torch.Generator().manual_seed(0), progress=False, out_dir=tmp_path
    )
    assert imgs.shape == (10, 1, 8, 8) and imgs.dtype == torch.uint8
    assert labels.shape == (10,) and labels.min() >= 0 and labels.max() < 3
    again, _ = generate(denoiser, cfg, 10, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(imgs, again)
    read, read_labels = load_class_folders(tmp_path / "images")
    assert len(read) == 10 and sorted(read_labels.tolist()) == sorted(labels.tolist())
    assert (tmp_path / "grid.png").is_file()


# sample.compile ---------------------------------------------------------------------------------


def _sample(cfg, num=8, seed=0):
    return generate(
        build_denoiser(cfg).requires_grad_(False),
        cfg,
        num,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )[0]


@pytest.mark.long  # ~45 s each: Inductor compiles the U-Net's C++ kernels
@pytest.mark.parametrize("sampler,guidance", [("edm", 0.5), ("ddim", 0.0)])
def test_compiled_sampling_matches_eager(sampler, guidance):
    from torch._dynamo.utils import counters

    common = [
        f"sample.sampler={sampler}",
        f"sample.guidance={guidance}",
        "sample.steps=4",
        "sample.churn=10",
        "sample.batch_size=4",
        "run.seed=0",
    ]
    torch.manual_seed(0)
    eager = _sample(unet_cfg(*common, "sample.compile=false"), num=10)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    compiled = _sample(unet_cfg(*common, "sample.compile=true"), num=10)
    assert counters["stats"]["unique_graphs"] >= 1  # the denoiser really ran compiled
    # Same generator draws, same network function: the images agree up to one uint8 level of rounding.
    diff = (compiled.int() - eager.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_auto_compiles_only_when_the_rest_of_the_job_pays_for_it(monkeypatch):
    from dpfeta import sample

    denoiser = build_denoiser(unet_cfg())
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # no compilation: the decisions only

    def batch(net, size, seconds):
        net.for_batch(size)
        current = net.current
        net.done(size, seconds)
        return current

    # 40 full batches at 10 s: 390 s left >= COMPILE_PAYBACK_S -> compiled from the second batch on.
    net = sample.Network(denoiser, "auto", 4, 40)
    assert batch(net, 4, 10.0) == "eager"
    assert batch(net, 4, 30.0) == "compiled"  # pays the compilation: not judged
    assert batch(net, 4, 9.9) == "compiled"  # not faster than 0.97 x eager -> back to eager
    assert batch(net, 4, 10.0) == "eager"
    # A short job: 5 batches at 10 s (40 s left) never compiles.
    short = sample.Network(denoiser, "auto", 4, 5)
    assert [batch(short, 4, 10.0) for _ in range(5)] == ["eager"] * 5
    # A faster compiled batch is kept; a shorter last batch runs eager.
    kept = sample.Network(denoiser, "auto", 4, 60)
    assert [batch(kept, 4, t) for t in (10.0, 40.0, 7.0, 7.0)] == ["eager", "compiled", "compiled", "compiled"]
    assert batch(kept, 3, 5.0) == "eager"
    # false never compiles; true compiles from the first full batch.
    assert batch(sample.Network(denoiser, "false", 4, 1000), 4, 1000.0) == "eager"
    assert batch(sample.Network(denoiser, "true", 4, 1), 4, 0.1) == "compiled"
    with pytest.raises(ValueError, match="sample.compile"):
        sample.Network(denoiser, "yes", 4, 1)


def test_network_calls_split_and_padded_equal_one_call():
    """Calls of at most ``rows`` images, the compiled shape padded: the same outputs as one eager call."""
    from dpfeta import sample

    torch.manual_seed(0)
    denoiser = build_denoiser(unet_cfg("model.dropout=0.0")).eval()
    shapes = []

    def fixed_shape(module, **kw):  # stands in for the compiled network: records the shapes it is given
        def call(x, sigma, labels):
            shapes.append(x.shape[0])
            return module(x, sigma, labels)

        return call

    x, sigma, labels = torch.randn(11, 1, 8, 8), torch.rand(11) + 0.1, torch.arange(11) % 3
    with torch.inference_mode():
        whole = denoiser(x, sigma, labels)
        split = sample.Network(denoiser, "false", 11, 1, rows=4)
        split.for_batch(11)
        assert torch.allclose(split._call(x, sigma, labels), whole, atol=1e-5)
        torch_compile = torch.compile
        try:
            torch.compile = fixed_shape
            net = sample.Network(denoiser, "true", 11, 2, rows=4)
            net.for_batch(11)
            out = net._call(x, sigma, labels)  # parts of 4, 4, 3 (padded to 4)
            net.done(11, 1.0)
            net.for_batch(11)
            short = net._call(x[:5], sigma[:5], labels[:5])  # 4 compiled, then 1 (< half of 4) eager
        finally:
            torch.compile = torch_compile
    assert torch.allclose(out, whole, atol=1e-5) and torch.allclose(short, whole[:5], atol=1e-5)
    assert shapes == [4, 4, 4, 4]
    assert sample.cache_rows(denoiser, (1, 8, 8), torch.device("cpu")) in (None, *[1 << k for k in range(40)])


def test_compile_failure_falls_back_to_eager_under_auto_and_raises_under_true(monkeypatch, caplog):
    from dpfeta import sample

    def broken(module, **kw):
        def call(*args):
            raise RuntimeError("InductorError: no C++ compiler")

        return call

    common = ["sample.steps=3", "sample.batch_size=4", "sample.guidance=0.5"]
    cfg = unet_cfg(*common, "sample.compile=false")
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg).requires_grad_(False)
    eager = generate(denoiser, cfg, 8, generator=torch.Generator().manual_seed(0), progress=False)[0]
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(sample, "COMPILE_PAYBACK_S", 0.0)  # auto compiles from the second batch
    auto = config.replace(cfg, {"sample.compile": "auto"})
    with caplog.at_level("WARNING", logger="dpfeta.sample"):
        again = generate(denoiser, auto, 8, generator=torch.Generator().manual_seed(0), progress=False)[0]
    assert torch.equal(again, eager)  # the failed call was recomputed eager with the same inputs
    assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text
    forced = config.replace(cfg, {"sample.compile": "true"})
    with pytest.raises(RuntimeError, match="sample.compile=true: torch.compile failed"):
        generate(denoiser, forced, 8, generator=torch.Generator().manual_seed(0), progress=False)


def test_sample_compile_key_is_validated():
    with pytest.raises(ValueError, match="config key 'sample.compile': expected one of auto, true, false, got 'fast'"):
        unet_cfg("sample.compile=fast")
    assert unet_cfg("sample.compile=true").sample.compile == "true"  # YAML's boolean read as the name
