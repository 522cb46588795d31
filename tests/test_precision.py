"""run.precision (fp32 | bf16 | auto) and the sampling speed work: what changes and what must not."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_UNET, tiny_config

from dpfeta import config, images, precision, sample, warmup


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def unet_cfg(**updates) -> config.Config:
    """conftest's TINY_UNET; ``a__b=v`` overrides ``a.b``."""
    return config.replace(tiny_config(base=TINY_UNET), {k.replace("__", "."): v for k, v in updates.items()})


def tiny_denoiser(seed: int = 0) -> sample.EDMPrecond:
    torch.manual_seed(seed)
    denoiser = sample.build_denoiser(unet_cfg())
    with torch.no_grad():  # zero-initialised output layers would make every sample the same
        for p in denoiser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return denoiser.eval()


def test_precision_key_is_typed_and_resolved():
    assert config.Config().run.precision == "fp32"  # measured: bf16 did not pay on CPU or H200 (bench/README.md)
    with pytest.raises(ValueError, match="run.precision"):
        unet_cfg(run__precision="fp16")
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    auto = precision.resolve("auto", "cpu")
    # auto never picks an emulated bf16: without a native path it is fp32, without timing anything.
    assert auto == "fp32" or precision.bf16_native("cpu")
    with pytest.raises(ValueError, match="run.precision"):
        precision.resolve("half", "cpu")
    assert isinstance(precision.autocast("fp32", "cpu"), type(precision.autocast("auto", "cpu"))) or auto == "bf16"


def test_matmul_rate_is_a_positive_flop_rate():
    rate = precision.matmul_rate(torch.float32, "cpu", size=128, seconds=0.05)
    assert 1e6 < rate < 1e14


def reference_generate(denoiser, cfg, num, generator):
    """generate() as it was before the speed work: fp32, torch.no_grad, one sampler call per batch."""
    d = cfg.data
    labels = torch.arange(num) % d.num_classes  # balanced labels (issue 15), as generate() draws them now
    out = []
    with torch.no_grad():
        for y in labels.split(cfg.sample.batch_size):
            latents = torch.randn((len(y), d.channels, d.resolution, d.resolution), generator=generator)
            x = sample.sample_batch(denoiser, cfg, latents, y, null_label=d.num_classes, generator=generator)
            out.append(images.to_uint8(x))
    return torch.cat(out), labels


@pytest.mark.parametrize("sampler,guidance", [("edm", 0.0), ("edm", 1.0), ("ddim", 0.0)])
def test_generate_in_fp32_gives_the_same_images_as_before_the_speed_work(sampler, guidance):
    cfg = unet_cfg(
        sample__sampler=sampler, sample__guidance=guidance, sample__steps=4, sample__batch_size=3, run__precision="fp32"
    )
    denoiser = tiny_denoiser()
    got, got_labels = sample.generate(denoiser, cfg, 7, generator=torch.Generator().manual_seed(5), progress=False)
    want, want_labels = reference_generate(denoiser, cfg, 7, torch.Generator().manual_seed(5))
    assert torch.equal(got_labels, want_labels)
    assert torch.equal(got, want)  # bit-identical uint8 images
    assert not got.is_inference() and got.float().std() > 10  # ordinary tensors, not a constant image


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_sampling_keeps_fp32_state_and_stays_close_to_fp32(device):
    cfg = unet_cfg(sample__sampler="ddim", sample__steps=4, sample__batch_size=4)
    denoiser = tiny_denoiser().to(device)
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.tensor([0, 1, 2, 0], device=device)
    results = {}
    for prec in ("fp32", "bf16"):
        with torch.inference_mode(), precision.autocast(prec, device):
            results[prec] = sample.sample_batch(denoiser, cfg, latents, labels, null_label=3, generator=None)
    assert results["bf16"].dtype == torch.float32
    diff = (results["bf16"] - results["fp32"]).abs().max().item()
    assert 0 < diff < 0.05 * results["fp32"].abs().max().item(), diff


def test_bf16_warmup_step_updates_fp32_weights_with_a_loss_close_to_fp32():
    losses = {}
    for prec in ("fp32", "bf16"):
        cfg = unet_cfg(run__precision=prec, warmup__batch_size=8, warmup__randaug_magnitude=0)
        denoiser = tiny_denoiser()
        before = [p.detach().clone() for p in denoiser.parameters()]
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        losses[prec], _ = warmup._train_step(denoiser, optimizer, x, y, cfg, torch.Generator().manual_seed(1))
        assert all(p.dtype == torch.float32 for p in denoiser.parameters())
        assert all(not torch.equal(a, b) for a, b in zip(before, denoiser.parameters()) if b.requires_grad)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02) and losses["bf16"] != losses["fp32"]
