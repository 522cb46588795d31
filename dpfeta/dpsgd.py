"""DP-SGD with noise multiplicity, Poisson sampling and one noise draw per logical step.

The only module that imports Opacus. One logical step (docs/privacy.md §2 M2, §4, §5):

1. every worker draws a Bernoulli(q) mask over its own disjoint shard (``PoissonSampler``);
2. the local batch of B examples, B*K rows, is cut into physical micro-batches of at most
   ``physical_batch_size`` rows (a pure memory knob): whole examples when K <= that size, else each
   example's K rows in several parts whose gradients are summed in fp32 before clipping, so memory
   depends on the rows per micro-batch, not on K;
3. per micro-batch, Opacus' hooks give the gradient of each example's loss, where the loss of an
   example is the mean of its K noise-draw rows: the rows are folded inside every layer hook
   (``FoldedGradSampleModule``), so memory holds one gradient per example, never per row; the
   backward pass skips the batch-summed conv/linear weight gradients that DP-SGD never uses;
   with ``precision="bf16"`` the forward runs under bf16 autocast and the backward in the dtypes it
   left, and every per-example gradient is converted to fp32 as the hook produces it;
4. each fp32 per-example gradient is clipped to norm C, the norm computed in fp32 on that very
   vector (a NaN/inf gradient is zeroed and counted as clipped), and added to a fp32 running sum;
5. the noise rank adds N(0, sigma^2 C^2) to its sum (exactly once for the whole group), the sums are
   all-reduced (SUM) across workers, and the result is divided by the public q N, never by the
   realised batch size.

Noise and sampling generators come from OS entropy unless a seed is given (tests, reproduction);
seeds are never logged.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample
from opacus.utils.module_utils import trainable_parameters
from opacus.validators import ModuleValidator
from torch import nn

logger = logging.getLogger(__name__)

# loss_rows(module, images [b], labels [b], draws) -> [b * len(draws)]: the per-row losses of noise
# draws ``draws`` (a sub-range of range(K)) of each example, rows of example i contiguous.
LossRows = Callable[[nn.Module, torch.Tensor, torch.Tensor, range], torch.Tensor]
CLIP_EPS = 1e-6  # clip factor min(1, C / (||g|| + eps)), as Opacus and the DPDM fork


# --------------------------------------------------------------------------------------------
# Poisson sampling over one worker's shard
# --------------------------------------------------------------------------------------------


class PoissonSampler:
    """Independent Bernoulli(q) inclusion of every record of a shard, fresh at every step.

    With disjoint shards covering the training split and q the *global* rate, the union of all
    workers' draws is a Poisson(q) sample of the whole split. An empty draw is returned, never skipped.
    """

    def __init__(self, num_records: int, *, sample_rate: float, generator: torch.Generator):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"expected a sample rate in (0, 1], got {sample_rate!r}")
        self.num_records, self.sample_rate, self.generator = int(num_records), float(sample_rate), generator

    def sample(self) -> torch.Tensor:
        """Indices (int64, sorted) of this step's local batch; possibly empty."""
        # float64 uniforms: an fp32 comparison includes a record with probability ceil(q 2^24) / 2^24 > q
        mask = torch.rand(self.num_records, generator=self.generator, dtype=torch.float64) < self.sample_rate
        return mask.nonzero().flatten()


def gaussian_noise(numel: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """``numel`` draws of N(0, std^2) in float64, on the generator's device (docs/privacy.md §5).

    Not fp32: torch draws an fp32 normal by Box-Muller on 24-bit uniforms, so every draw is bounded by
    sqrt(2 ln 2^24) = 5.77 std and its radius takes lattice values, which breaks the Gaussian mechanism's
    (epsilon, delta) argument. In float64 the uniforms have 53 bits (bound 8.57 std, gaps at the 2^-53
    level). The generator is seeded from OS entropy (``rng.make_generator``) unless ``run.seed`` is set.
    """
    return torch.normal(
        0.0, float(std), (int(numel),), generator=generator, device=generator.device, dtype=torch.float64
    )


# --------------------------------------------------------------------------------------------
# Per-example gradients of the K-averaged loss
# --------------------------------------------------------------------------------------------


def _regroup(t: torch.Tensor, examples: int, *, features: bool) -> torch.Tensor:
    """[B*K, ..., F] -> [B, K*..., F] (or [B*K, ...] -> [B, K*...] without a feature dim):
    the rows of one example become one longer sequence."""
    return t.reshape(examples, -1, t.shape[-1]) if features else t.reshape(examples, -1)


def _fold(grad_sample: torch.Tensor, examples: int) -> torch.Tensor:
    """Per-row [B*K, *shape] -> per-example [B, *shape] (sum over each example's rows)."""
    return grad_sample.reshape(examples, -1, *grad_sample.shape[1:]).sum(1)


def _conv2d_per_example(
    layer: nn.Conv2d, activations: torch.Tensor, backprops: torch.Tensor, examples: int
) -> dict[nn.Parameter, torch.Tensor]:
    """Conv2d gradients summed over the rows of each example, as weight-gradient convolutions.

    Few rows per example (K < 8): one grouped convolution with the examples as groups; many rows:
    one convolution per example. Both cost about one ordinary weight gradient on CPU (measured),
    where Opacus' unfold + einsum costs several.
    """
    rows, channels, *size = activations.shape
    k = rows // examples
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    out = {}
    if layer.weight.requires_grad:
        shape = layer.weight.shape
        if k < 8:
            x = activations.view(examples, k, channels, *size).transpose(0, 1).reshape(k, -1, *size)
            g = backprops.view(examples, k, *backprops.shape[1:]).transpose(0, 1)
            g = g.reshape(k, -1, *backprops.shape[2:])
            weight = torch.nn.grad.conv2d_weight(
                x, (examples * shape[0], *shape[1:]), g, groups=examples * layer.groups, **conv
            )
        else:
            weight = torch.stack(
                [
                    torch.nn.grad.conv2d_weight(x, shape, g, groups=layer.groups, **conv)
                    for x, g in zip(activations.split(k), backprops.split(k))
                ]
            )
        out[layer.weight] = weight.reshape(examples, *shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(examples, -1, backprops.shape[1], backprops[0, 0].numel()).sum((1, 3))
    return out


class FoldedGradSampleModule(GradSampleModule):
    """Opacus ``GradSampleModule`` (hooks) whose ``p.grad_sample`` is per *example*, not per row.

    The module sees B*K rows, rows ``b*K .. b*K+K-1`` being the K noise draws of example b. Each
    layer hook sums the per-row contributions of an example right away: Linear and Embedding by
    treating an example's K rows as one longer sequence (Opacus' own sampler, fewer and larger
    matmuls), Conv2d by one einsum over (row, position), every other layer with Opacus' sampler
    followed by the sum. Backpropagate the sum of per-example losses (each the mean over its K
    rows) with ``loss_reduction="sum"``; then ``p.grad_sample[b]`` is the gradient of example b's
    K-averaged loss, and memory holds B (not B*K) gradients.
    """

    def __init__(self, module: nn.Module, *, noise_multiplicity: int, force_functorch: bool = False):
        if noise_multiplicity < 1:
            raise ValueError(f"expected noise_multiplicity K >= 1, got {noise_multiplicity}")
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise ValueError(
                f"expected a module without layers that mix examples (docs/privacy.md §5), "
                f"Opacus' validator found: {errors}"
            )
        self.noise_multiplicity = int(noise_multiplicity)
        super().__init__(module, batch_first=True, loss_reduction="sum", strict=True, force_functorch=force_functorch)

    def _per_example(
        self, module: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor, examples: int
    ) -> dict[nn.Parameter, torch.Tensor]:
        """fp32 per-example gradients of ``module``'s parameters.

        Conv2d and Linear compute in the dtype of their output gradient (bf16 under autocast: the
        matrix products accumulate in fp32 and round once) and convert the result to fp32; the small
        layers (GroupNorm, Embedding, functorch fallbacks) compute in fp32 throughout.
        """
        kind = type(module)
        if not self.force_functorch:
            if kind is nn.Linear:
                inputs = _regroup(activations[0].to(backprops.dtype), examples, features=True)
                grads = self.GRAD_SAMPLERS[kind](module, [inputs], _regroup(backprops, examples, features=True))
                return {p: g.float() for p, g in grads.items()}
            if kind is nn.Conv2d and not isinstance(module.padding, str):
                grads = _conv2d_per_example(module, activations[0].to(backprops.dtype), backprops, examples)
                return {p: g.float() for p, g in grads.items()}
        backprops = backprops.float()
        activations = [a.float() if a.is_floating_point() else a for a in activations]
        if kind is nn.Embedding and not self.force_functorch:
            inputs = _regroup(activations[0], examples, features=False)
            return self.GRAD_SAMPLERS[kind](module, [inputs], _regroup(backprops, examples, features=True))
        sampler = (
            self.GRAD_SAMPLERS.get(kind, ft_compute_per_sample_gradient)
            if not self.force_functorch
            else ft_compute_per_sample_gradient
        )
        return {p: _fold(gs, examples) for p, gs in sampler(module, activations, backprops).items()}

    def capture_backprops_hook(
        self, module: nn.Module, _forward_input, forward_output, loss_reduction: str, batch_first: bool
    ) -> None:
        """Opacus' hook, with per-example (K-folded) gradients instead of per-row ones."""
        if not self.hooks_enabled:
            return
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=forward_output[0].detach(), loss_reduction=loss_reduction, batch_first=batch_first
        )
        rows = module.max_batch_len
        assert rows % self.noise_multiplicity == 0, (rows, self.noise_multiplicity)
        examples = rows // self.noise_multiplicity
        for param, gs in self._per_example(module, activations, backprops, examples).items():
            if hasattr(param, "_current_grad_sample"):  # a parameter used twice in one forward
                param._current_grad_sample = param._current_grad_sample + gs
            else:
                param._current_grad_sample = gs  # fresh tensor: no zero-fill and copy as in Opacus
        for _, p in trainable_parameters(module):
            p._forward_counter -= 1
            if p._forward_counter == 0:
                promote_current_grad_sample(p)
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
            del module.max_batch_len

    def reset(self) -> None:
        """Forget a half-done backward pass: stored activations, counters, per-example gradients."""
        for module in self._module.modules():
            for name in ("activations", "max_batch_len"):
                if hasattr(module, name):
                    delattr(module, name)
        for p in self._module.parameters():
            p._forward_counter, p.grad_sample = 0, None
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample


# --------------------------------------------------------------------------------------------
# Clipping, accumulation, noise
# --------------------------------------------------------------------------------------------


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / (||g|| + 1e-6)) per example; 0 for a non-finite norm (the example is dropped)."""
    factors = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


@dataclass
class StepStats:
    """Group totals of one logical step. ``examples``/``loss_sum``/``clipped`` are NOT DP."""

    examples: int  # realised batch size over the group (private: report under nondp/ only)
    clipped: int  # examples whose gradient was scaled down or dropped (non-finite)
    loss_sum: float  # sum of finite per-example losses
    workers: int  # ranks that took this step (lock-step check: the world size)


class DPSGD:
    """Turns a local Poisson batch into the privatised gradient ``p.grad`` of one logical step.

    ``expected_batch_size`` is the public q N of the whole group (not per worker). Exactly one
    worker (``noise_rank``) adds N(0, (sigma C)^2) before the all-reduce; with torch.distributed
    uninitialised the group is this process alone. ``physical_batch_size`` counts rows (examples x
    K) per micro-batch. ``precision`` ("fp32" or "bf16": the resolved ``run.precision``) applies to
    the network's forward and backward only.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        noise_multiplicity: int,
        physical_batch_size: int,
        noise_generator: Optional[torch.Generator],
        grad_sample_mode: str = "hooks",
        noise_rank: int = 0,
        precision: str = "fp32",
    ):
        if grad_sample_mode not in ("hooks", "functorch"):
            raise ValueError(f"expected grad_sample_mode hooks or functorch, got {grad_sample_mode!r}")
        if noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size <= 0:
            raise ValueError(
                f"expected noise_multiplier >= 0, max_grad_norm > 0 and "
                f"expected_batch_size > 0, got {noise_multiplier}, {max_grad_norm}, "
                f"{expected_batch_size}"
            )
        if physical_batch_size < 1:
            raise ValueError(f"expected physical_batch_size >= 1 (rows per micro-batch), got {physical_batch_size}")
        self.module = FoldedGradSampleModule(
            module, noise_multiplicity=noise_multiplicity, force_functorch=grad_sample_mode == "functorch"
        )
        self.params = [p for p in module.parameters() if p.requires_grad]
        wrong = [p.dtype for p in self.params if p.dtype != torch.float32]
        if wrong:
            raise ValueError(f"expected fp32 parameters for clipping and noise (docs/privacy.md §5), got {wrong[0]}")
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.K, self.physical_batch_size = int(noise_multiplicity), int(physical_batch_size)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"expected precision fp32 or bf16 (resolve run.precision=auto first), got {precision!r}")
        self.device = self.params[0].device
        self.precision = precision
        self.rank = dist.get_rank() if _distributed() else 0
        self.noise_rank = int(noise_rank)
        if self.rank == self.noise_rank and noise_multiplier > 0 and noise_generator is None:
            raise ValueError("the noise rank needs a noise generator")
        self.noise_generator = noise_generator
        self.numel = sum(p.numel() for p in self.params)
        # Backpropagate only as far as the hooks need: to the (float) images and to the parameters
        # of layers other than Conv2d and Linear. Every conv/linear input or output gradient is
        # then still computed (so every hook fires), but not their batch-summed weight and bias
        # gradients, which DP-SGD never uses (oneDNN computes the weight gradient whenever the
        # bias gradient is asked for). A loss where some hook does not fire falls back to all.
        skipped = {
            id(p) for m in module.modules() if type(m) in (nn.Conv2d, nn.Linear) for p in m.parameters(recurse=False)
        }
        self._backward_to = [p for p in self.params if id(p) not in skipped]

    def micro_batches(self, examples: int) -> list[tuple[slice, range]]:
        """The (examples, draws) of each micro-batch: at most ``physical_batch_size`` rows each.

        K <= rows: floor(rows / K) whole examples per micro-batch. K > rows: one example per
        micro-batch and its K draws in consecutive parts of ``physical_batch_size`` draws.
        """
        per = self.physical_batch_size // self.K
        if per >= 1:
            return [(slice(start, start + per), range(self.K)) for start in range(0, examples, per)]
        parts = [
            range(start, min(start + self.physical_batch_size, self.K))
            for start in range(0, self.K, self.physical_batch_size)
        ]
        return [(slice(b, b + 1), draws) for b in range(examples) for draws in parts]

    def privatise(self, images: torch.Tensor, labels: torch.Tensor, loss_rows: LossRows) -> StepStats:
        """Set every ``p.grad`` to (sum_group clip(g_i) + N(0, sigma^2 C^2)) / (q N); return group stats.

        ``loss_rows(module, images, labels, draws) -> [b*len(draws)]`` is the per-row loss of a
        micro-batch (see ``LossRows``).
        """
        # [clipped gradient sum | loss_sum, examples, clipped, workers] in fp32.
        buffer = torch.zeros(self.numel + 4, dtype=torch.float32, device=self.device)
        total, stats = buffer[: self.numel], buffer[self.numel :]
        stats[3] = 1.0

        # Accumulate clipped per-example gradients over the physical micro-batches; an example whose
        # draws are split sums its parts in fp32 (``partial``) and is clipped after its last part.
        partial = partial_loss = None
        for examples, draws in self.micro_batches(len(images)):
            grads, losses = self._per_example(images[examples], labels[examples], draws, loss_rows)
            if len(draws) == self.K:
                self._clip_and_add(grads, losses, total, stats)
                continue
            flat = torch.cat(grads, dim=1)
            partial, partial_loss = (flat, losses) if draws.start == 0 else (partial + flat, partial_loss + losses)
            if draws.stop == self.K:
                self._clip_and_add([partial], partial_loss, total, stats)
                partial = partial_loss = None

        # Noise once for the group, then sum over workers.
        if self.rank == self.noise_rank and self.noise_multiplier > 0:
            noise = gaussian_noise(self.numel, self.noise_multiplier * self.max_grad_norm, self.noise_generator)
            total.copy_((total.double() + noise.to(self.device)).float())  # added in float64, then rounded
        if _distributed():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)

        # Divide by the public expected batch q N and hand the result to the optimiser.
        total /= self.expected_batch_size
        offset = 0
        for p in self.params:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        loss_sum, examples, clipped, workers = stats.tolist()
        return StepStats(examples=round(examples), clipped=round(clipped), loss_sum=loss_sum, workers=round(workers))

    def _per_example(
        self, images: torch.Tensor, labels: torch.Tensor, draws: range, loss_rows: LossRows
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """fp32 gradients [b, numel_p] per parameter, and losses [b], of sum_{k in draws} row_k / K."""
        batch = len(images)
        if images.is_floating_point():
            images = images.detach().requires_grad_()
        self.module.noise_multiplicity = len(draws)  # rows per example in this micro-batch
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            rows = loss_rows(self.module, images, labels, draws)
        if rows.shape != (batch * len(draws),):
            raise ValueError(
                f"expected the per-row loss of shape [{batch * len(draws)}] (examples x draws), got {tuple(rows.shape)}"
            )
        per_example = rows.float().view(batch, len(draws)).sum(1) / self.K
        targets = ([images] if images.requires_grad else []) + self._backward_to or self.params
        with warnings.catch_warnings():  # the first layer's hook fires on its output: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.autograd.grad(per_example.sum(), targets, allow_unused=True)
        if any(p.grad_sample is None for p in self.params):
            if len(self._backward_to) == len(self.params):
                raise RuntimeError("no per-example gradient for some parameters: are they used in forward?")
            logger.info(
                "dpsgd: some layers are not between the images and the loss; backpropagating to "
                "every parameter from now on"
            )
            self.module.reset()
            self._backward_to = list(self.params)
            return self._per_example(images.detach(), labels, draws, loss_rows)
        grads = [p.grad_sample.reshape(batch, -1) for p in self.params]
        for p in self.params:
            p.grad_sample = None
        assert all(g.dtype == torch.float32 for g in grads), {g.dtype for g in grads}
        return grads, per_example.detach()

    def _clip_and_add(
        self, grads: list[torch.Tensor], losses: torch.Tensor, total: torch.Tensor, stats: torch.Tensor
    ) -> None:
        """Clip each example's fp32 gradient (the concatenation of ``grads``' rows) to C; add to ``total``."""
        norms = torch.stack([g.pow(2).sum(1) for g in grads], dim=1).sum(1).sqrt()
        factors = clip_factors(norms, self.max_grad_norm)
        finite = torch.isfinite(norms)
        all_finite = bool(finite.all())
        offset = 0
        for g in grads:
            if not all_finite:  # a dropped example has factor 0, but 0 * NaN would be NaN
                g = torch.where(finite[:, None], g, torch.zeros_like(g))
            total[offset : offset + g.shape[1]] += factors @ g
            offset += g.shape[1]

        finite_loss = torch.isfinite(losses)
        stats[0] += losses[finite_loss].sum()
        stats[1] += len(losses)
        stats[2] += ((norms > self.max_grad_norm) | ~finite).sum()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
