"""U-Net: reference parameter counts, shapes, Opacus hooks coverage, per-sample gradients."""

import copy

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from dpfeta import config
from dpfeta.config import ModelConfig
from dpfeta.diffusion import EDMPrecond, edm_loss_rows
from dpfeta.nn import UNet, count_parameters, ema_decay, update_ema

# Opacus hooks on a model whose inputs need no grad: expected and harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

TINY = ModelConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), emb_channels=16)


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(resolution=8, in_channels=1, num_classes=3, model=TINY)
    with torch.no_grad():  # zero-initialised output layers would make most gradients vanish
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net


@pytest.mark.parametrize(
    "resolution,in_channels,num_classes,mult,attn,expected",
    [
        (28, 1, 10, (2, 2), (14,), 1_485_217),  # DP-FETA MNIST/F-MNIST ("ch22_at14")
        (32, 3, 2, (2, 2), (16,), 1_486_691),  # CelebA32-cond
        (32, 3, 2, (1, 2, 2), (16,), 1_754_243),  # Camelyon32
        (28, 1, 10, (1, 2, 2), (7,), 1_753_345),  # DPDM reference MNIST
    ],
)
def test_parameter_counts_match_reference(resolution, in_channels, num_classes, mult, attn, expected):
    net = UNet(
        resolution=resolution,
        in_channels=in_channels,
        num_classes=num_classes,
        model=ModelConfig(channels=32, channel_mult=mult, attn_resolutions=attn),
    )
    assert count_parameters(net) == expected


def test_forward_shape_and_null_class():
    net = tiny_unet()
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.randn(3), torch.tensor([0, 2, 3]))  # 3 = null class
    assert out.shape == x.shape
    with pytest.raises(IndexError):
        net(x, torch.randn(3), torch.tensor([0, 1, 4]))


def test_from_config_and_bad_resolution():
    cfg = config.load(None, ["data.resolution=16", "model.channel_mult=[1,2,2]"])
    assert UNet.from_config(cfg).resolution == 16
    with pytest.raises(ValueError, match="divisible"):
        UNet(resolution=10, in_channels=1, num_classes=2, model=ModelConfig(channel_mult=(1, 2, 2)))


def test_opacus_validator_clean_and_every_parameter_has_a_hooks_rule():
    net = tiny_unet()
    assert ModuleValidator.validate(net, strict=False) == []
    with_params = [m for m in net.modules() if any(True for _ in m.parameters(recurse=False))]
    assert {type(m) for m in with_params} <= set(GradSampleModule.GRAD_SAMPLERS)


def _naive_per_example_grads(model: nn.Module, losses_fn, batch: int) -> list[list[torch.Tensor]]:
    grads = []
    for b in range(batch):
        model.zero_grad()
        losses_fn()[b].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def test_opacus_hooks_per_sample_grads_equal_naive_loop():
    torch.manual_seed(1)
    denoiser = EDMPrecond(tiny_unet(), sigma_data=0.5)
    reference = copy.deepcopy(denoiser)
    x, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    sigma, labels = torch.tensor([0.05, 0.5, 2.0, 20.0]), torch.tensor([0, 1, 2, 3])

    def losses(model):
        return ((model(x, sigma, labels) - target) ** 2).flatten(1).sum(1)

    gsm = GradSampleModule(denoiser, batch_first=True, loss_reduction="sum")
    losses(gsm).sum().backward()
    naive = _naive_per_example_grads(reference, lambda: losses(reference), 4)
    params = list(gsm.parameters())
    assert len(params) == len(list(reference.parameters()))
    worst = 0.0
    for i, p in enumerate(params):
        assert p.grad_sample is not None and p.grad_sample.shape == (4, *p.shape)
        for b in range(4):
            worst = max(worst, (p.grad_sample[b] - naive[b][i]).abs().max().item())
    print(f"max |hooks - naive| = {worst:.2e}")
    assert worst <= 1e-5
    assert max(g.abs().max().item() for g in naive[0]) > 1e-2  # gradients are not trivially zero


def test_k_rows_folded_to_examples_equal_per_example_edm_loss_grads():
    """B*K per-row grads from hooks, averaged over K, equal d(per-example EDM loss)/d(theta)."""
    batch, K = 3, 4
    denoiser = EDMPrecond(tiny_unet(2), sigma_data=0.5)
    reference = copy.deepcopy(denoiser)
    images, labels = torch.rand(batch, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2])
    kwargs = dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, label_drop_prob=0.3, num_classes=3, K=K)

    gsm = GradSampleModule(denoiser, batch_first=True, loss_reduction="sum")
    rows = edm_loss_rows(gsm, images, labels, generator=torch.Generator().manual_seed(5), **kwargs)
    (rows / K).sum().backward()
    naive = _naive_per_example_grads(
        reference,
        lambda: (
            edm_loss_rows(reference, images, labels, generator=torch.Generator().manual_seed(5), **kwargs)
            .view(batch, K)
            .mean(1)
        ),
        batch,
    )
    for i, p in enumerate(gsm.parameters()):
        folded = p.grad_sample.view(batch, K, *p.shape).sum(1)
        for b in range(batch):
            assert torch.allclose(folded[b], naive[b][i], atol=1e-5, rtol=0)


def test_ema_warmup_decay_and_update():
    assert ema_decay(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay(10_000, 0.999) == 0.999
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    d = update_ema(ema, model, num_updates=1, decay=0.999)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 1 - d))
