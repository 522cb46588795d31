"""Checkpoint round trip and warm-up training, augmentation, resume."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, tiny_config
from opacus.grad_sample import GradSampleModule

from dpfeta import checkpoint
from dpfeta.augment import RandAugment
from dpfeta.images import save_class_folders
from dpfeta.nn import UNet
from dpfeta.sample import build_denoiser, load_denoiser
from dpfeta.warmup import central_arrays, train_warmup

# Opacus hooks on a model whose inputs need no grad: expected and harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

WARMUP = ("warmup.batch_size=4", "warmup.noise_multiplicity=2", "run.seed=0")


class Central:
    """Stand-in for dpfeta.data.ImageSet (images uint8 [N,C,H,W], labels int64 [N], num_classes)."""

    def __init__(self, n=9, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
        self.labels = np.arange(n, dtype=np.int64) % 3
        self.num_classes = 3


def unet_cfg(*overrides):
    """conftest's TINY_UNET with a warm-up of batch 4 x K=2."""
    return tiny_config(*WARMUP, *overrides, base=TINY_UNET)


# Checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_strips_wrappers(tmp_path):
    cfg = unet_cfg()
    denoiser = build_denoiser(cfg)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.normal_()
    wrapped = GradSampleModule(denoiser.net)  # keys "_module.<name>"
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
    wrapped(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 3])).square().mean().backward()
    optimizer.step()
    assert all(k.startswith("_module.") for k in wrapped.state_dict())

    checkpoint.save(
        tmp_path / "ck",
        model=wrapped,
        ema=denoiser.net,
        optimizer=optimizer,
        meta={"step": 7, "config": cfg.to_dict()},
        extra={"generator": torch.Generator().get_state()},
    )
    state = checkpoint.load(tmp_path / "ck")
    assert state["meta"]["step"] == 7 and json.loads((tmp_path / "ck" / "meta.json").read_text())["step"] == 7
    assert set(state["model"]) == set(denoiser.net.state_dict()) == set(state["ema"])
    for key, value in denoiser.net.state_dict().items():
        assert torch.equal(state["model"][key], value)
    fresh_opt = torch.optim.Adam(UNet.from_config(cfg).parameters(), lr=1e-3)
    fresh_opt.load_state_dict(state["optimizer"])
    assert fresh_opt.state_dict()["state"][0]["step"] == 1

    loaded = load_denoiser(tmp_path / "ck", cfg)
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, y), denoiser.eval()(x, sigma, y))
    with pytest.raises(ValueError, match="model="):
        load_denoiser(tmp_path / "ck", unet_cfg("model.channels=16"))


def test_checkpoint_survives_an_interrupted_swap(tmp_path):
    net = torch.nn.Linear(2, 2)
    checkpoint.save(tmp_path / "ck", model=net, meta={"step": 1})
    (tmp_path / "ck").rename(tmp_path / "ck.old")  # crash between the two renames
    assert checkpoint.exists(tmp_path / "ck") and checkpoint.load(tmp_path / "ck")["meta"]["step"] == 1
    checkpoint.save(tmp_path / "ck", model=net, meta={"step": 2})
    assert checkpoint.load(tmp_path / "ck")["meta"]["step"] == 2 and not (tmp_path / "ck.old").exists()
    assert checkpoint.strip_prefixes({"_module.module.a.b": 1, "net.module.c": 2}) == {"a.b": 1, "net.module.c": 2}
    with pytest.raises(ValueError, match="meta.json"):
        checkpoint.load(tmp_path / "nothing")


# Warm-up --------------------------------------------------------------------------------------


def test_augment_depends_only_on_the_generator():
    images = torch.from_numpy(Central(16).images)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    augment = RandAugment(num_ops=2, max_magnitude=9)
    a = augment(images, torch.Generator().manual_seed(4))
    b = augment(images, torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == images.shape
    assert not torch.equal(a, images)
    assert RandAugment(num_ops=2, max_magnitude=0)(images, torch.Generator()) is images


def test_central_arrays_validation_and_folder_input(tmp_path):
    cfg = unet_cfg()
    c = Central()
    save_class_folders(c.images, c.labels, tmp_path / "central" / "images")
    images, labels = central_arrays(tmp_path / "central", cfg)
    assert images.shape == (9, 1, 8, 8) and sorted(labels.tolist()) == sorted(c.labels.tolist())
    with pytest.raises(ValueError, match="data.resolution"):
        central_arrays(c, unet_cfg("data.resolution=16"))
    with pytest.raises(ValueError, match="num_classes"):
        central_arrays(c, unet_cfg("data.num_classes=4"))


def test_warmup_resume_equals_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    cfg = unet_cfg("warmup.steps=5", "warmup.log_every=1", "warmup.checkpoint_every=2")
    straight = train_warmup(cfg, Central(), tmp_path / "a")
    assert straight["step"] == 5 and np.isfinite(straight["loss"])

    reports = []

    def crash_at_3(metrics):
        reports.append(metrics)
        if metrics["step"] == 3:
            raise RuntimeError("simulated failure")

    with pytest.raises(RuntimeError):
        train_warmup(cfg, Central(), tmp_path / "b", reporter=crash_at_3)
    assert checkpoint.load(tmp_path / "b" / "checkpoint")["meta"]["step"] == 2
    resumed = train_warmup(cfg, Central(), tmp_path / "b", reporter=reports.append)
    assert resumed["steps_run"] == 3 and [r["step"] for r in reports] == [1, 2, 3, 3, 4, 5]
    assert set(reports[0]) == {"step", "nimg", "loss", "sec_per_step"}

    a, b = checkpoint.load(tmp_path / "a" / "checkpoint"), checkpoint.load(tmp_path / "b" / "checkpoint")
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["meta"]["step"] == b["meta"]["step"] == 5 and a["meta"]["config"] == cfg.public_dict()
    assert train_warmup(cfg, Central(), tmp_path / "b")["steps_run"] == 0  # finished: nothing to do


def test_warmup_refuses_to_resume_a_different_model(tmp_path):
    train_warmup(unet_cfg("warmup.steps=1"), Central(), tmp_path)
    with pytest.raises(ValueError, match="cannot resume"):
        train_warmup(unet_cfg("warmup.steps=2", "model.channels=16"), Central(), tmp_path)


def test_cli_warmup_then_sample(tmp_path, capsys):
    from dpfeta import cli

    c = Central(n=6)
    save_class_folders(c.images, c.labels, tmp_path / "central" / "images")
    (tmp_path / "c.yaml").write_text(
        "data: {resolution: 8, num_classes: 3}\n"
        "model: {channels: 8, channel_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [4], emb_channels: 16}\n"
        "warmup: {steps: 2, batch_size: 4, log_every: 1}\n"
        "sample: {steps: 2, batch_size: 3}\nrun: {seed: 0}\n"
    )
    common = ["--config", str(tmp_path / "c.yaml")]
    args = ["warmup", *common, "--central", str(tmp_path / "central"), "--out", str(tmp_path / "w")]
    assert cli.main(args) == 2  # central images without their ledger: refused, nothing trained
    assert "ledger.json" in capsys.readouterr().err and not (tmp_path / "w").exists()
    from dpfeta import privacy

    spent = privacy.Ledger(accountant="rdp", delta=1e-5, n=600)
    spent.add("central", noise_multiplier=5.0, sample_rate=0.1, count=2, taken=2)
    spent.save(tmp_path / "central" / "ledger.json")
    assert cli.main(args) == 0
    assert "step 2/2" in capsys.readouterr().out
    # the warm-up carries the central spend on: its folder, its checkpoint and the samples
    assert privacy.Ledger.load(tmp_path / "w" / "ledger.json").epsilon() == pytest.approx(spent.epsilon())
    assert checkpoint.load(tmp_path / "w" / "checkpoint")["meta"]["ledger"] == spent.state_dict()
    assert (
        cli.main(["sample", *common, "--checkpoint", str(tmp_path / "w"), "--out", str(tmp_path / "s"), "--num", "5"])
        == 0
    )
    assert "wrote 5 images" in capsys.readouterr().out
    assert privacy.Ledger.load(tmp_path / "s" / "ledger.json").epsilon() == pytest.approx(spent.epsilon())
    assert len(list((tmp_path / "s" / "images").glob("*/*.png"))) == 5 and (tmp_path / "s" / "grid.png").is_file()
