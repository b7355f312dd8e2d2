"""Self-supervised adaptation of a diffusion prior to one measurement: LoRA and the SCD adaptation loss.

Paper: Barbano, Denker, Chung, Ryu, Ye, Jin, Arridge, "Steerable Conditional Diffusion for Out-of-Distribution
Adaptation in Medical Image Reconstruction" (SCD); reference code ``alexdenker/SteerableConditionalDiffusion@8dc57fa``
(``adapt/lora.py``, ``adapt/adaptation.py``, ``algos/scd.py``). Used by :mod:`medrecon.methods.scd` (whole-image
prior) and :mod:`medrecon.methods.padis_ood` (PaDIS patch prior, Hu, Song, Fessler, Shen, arXiv 2410.11730).

What the reference does and this module does too:

* **LoRA.** Every Conv1d/Conv2d/Linear of the UNet (except the timestep/class embeddings: the reference injects
  into input_blocks, middle_block, output_blocks and out) gets a residual ``scale * up(down(x))``: ``down`` has
  the base layer's geometry with ``rank`` outputs (a conv of the same kernel, stride, padding), ``up`` is a 1x1
  conv / linear map rank -> out, initialised to **zero**, so an adapter starts as exactly the base network.
  The base weights are frozen; only ``down``/``up`` train. ``scale`` is switched between 0 (the base network:
  SCD's DDIM noise estimate) and 1 (the adapted one) without copying weights.
* **Loss.** ``u = CG_gamma(x0_hat)``: ``cg_iter`` (3) CG steps on ``(I + gamma A^H A) u = x0_hat + gamma A^H y``
  from ``u = x0_hat``, differentiable (gradients flow through CG, the operator and the network);
  ``loss = mean |A u - y|^2 + tv * TV(u)`` with TV the sum of absolute neighbour differences.

Departures, on purpose:

* The base network is never modified: :func:`adapt_denoiser` deep-copies it and injects LoRA into the copy, so a
  prior object shared by several subjects (slabs, volumes) cannot carry one subject's adaptation into another's.
* LoRA dropout (0.1 in the reference) is not implemented: the reference puts the model in ``eval()`` before
  adapting, so its dropout never acts either.
* ``gamma`` is relative: the CG system is ``(I + gamma/||A||^2 A^H A)``, so it does not depend on the operator's
  units (the reference's gamma is in its own Radon transform's units). The data term is divided by mean |y|^2
  and TV is taken on the prior-domain image (``tv`` is then dimensionless); the reference uses raw units.
* ``down`` is initialised as torch initialises a layer (uniform, bound 1/sqrt(fan_in)), drawn from the method's
  generator so adaptation is reproducible.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from medrecon.errors import ConfigError
from medrecon.physics.operator import LinearOperator

# module names (or name parts) LoRA leaves alone: the reference adapts the UNet's blocks, not its embeddings
EXCLUDE = ("time_embed", "class_embedding", "label_emb")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _uniform(t: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        r = torch.rand(t.shape, generator=generator, dtype=torch.float64)
        t.copy_(((2 * r - 1) * bound).to(t.dtype))


class LoRA(nn.Module):
    """``base(x) + scale * up(down(x))`` around a frozen Conv or Linear layer (``up`` starts at zero)."""

    def __init__(self, base: nn.Module, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.scale = 1.0
        dev, dt = base.weight.device, base.weight.dtype
        if isinstance(base, nn.Linear):
            self.down: nn.Module = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)
            self.up: nn.Module = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dt)
            fan_in = base.in_features
        else:
            conv = type(base)
            self.down = conv(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                             dilation=base.dilation, bias=False, padding_mode=base.padding_mode, device=dev,
                             dtype=dt)
            self.up = conv(rank, base.out_channels, 1, bias=False, device=dev, dtype=dt)
            fan_in = base.in_channels * math.prod(base.kernel_size)
        _uniform(self.down.weight, 1.0 / math.sqrt(fan_in), generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.scale == 0.0:
            return out
        return out + self.scale * self.up(self.down(x))


def inject_lora(net: nn.Module, rank: int, generator: torch.Generator | None = None,
                exclude: tuple[str, ...] = EXCLUDE) -> tuple[nn.Module, list[LoRA]]:
    """A deep copy of ``net`` with every Conv/Linear (groups 1, outside ``exclude``) wrapped in :class:`LoRA`;
    all base parameters frozen. ``net`` itself is untouched."""
    if int(rank) < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}", fix="SCD uses rank 8 (README example: 12)")
    out = copy.deepcopy(net)
    for prm in out.parameters():
        prm.requires_grad_(False)
    targets = [(name, m) for name, m in out.named_modules()
               if isinstance(m, _LAYERS) and not any(e in name for e in exclude)
               and getattr(m, "groups", 1) == 1 and name]
    loras = []
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        lora = LoRA(m, int(rank), generator)
        setattr(parent, child, lora)
        loras.append(lora)
    if not loras:
        raise ConfigError("the prior's network has no Conv/Linear layer to adapt",
                          fix="scd/padis_ood need a trained UNet prior (a network, not an analytic denoiser)")
    return out, loras


class Adapter:
    """The LoRA layers of one adapted network: switch them on/off, train them, save them."""

    def __init__(self, loras: list[LoRA], names: list[str]) -> None:
        self.loras, self.names = loras, names

    def set_scale(self, scale: float) -> None:
        for lo in self.loras:
            lo.scale = float(scale)

    def parameters(self) -> Iterator[nn.Parameter]:
        for lo in self.loras:
            yield from (lo.down.weight, lo.up.weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (``<layer>.down`` / ``<layer>.up``), detached CPU copies: the artifact."""
        out = {}
        for name, lo in zip(self.names, self.loras, strict=True):
            out[f"{name}.down"] = lo.down.weight.detach().cpu().clone()
            out[f"{name}.up"] = lo.up.weight.detach().cpu().clone()
        return out

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def adapt_denoiser(denoiser: Any, rank: int, generator: torch.Generator | None = None) -> tuple[Any, Adapter]:
    """A shallow copy of an ``EpsilonDenoiser``/``EDMDenoiser`` whose ``net`` is a LoRA-injected deep copy; the
    base denoiser and its network stay as they were (no state can leak into the next subject)."""
    net = getattr(denoiser, "net", None)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"self-supervised adaptation needs a denoiser with a torch network (.net); got "
                          f"{type(denoiser).__name__}",
                          fix="load a trained UNet prior (medrecon train) for scd / padis_ood")
    adapted, loras = inject_lora(net, rank, generator)
    names = [n for n, m in adapted.named_modules() if isinstance(m, LoRA)]
    den = copy.copy(denoiser)
    den.net = adapted
    den.nfe = 0
    return den, Adapter(loras, names)


def cg_prox(op: LinearOperator, x0: torch.Tensor, aty: torch.Tensor, gamma: float, n_iter: int,
            n_batch: int) -> torch.Tensor:
    """``n_iter`` CG steps on ``(I + gamma A^H A) u = x0 + gamma A^H y`` from ``u = x0`` (SCD's ``cg``),
    differentiable in x0 (autograd through the operator); systems indexed by the first ``n_batch`` dims."""
    def apply(v: torch.Tensor) -> torch.Tensor:
        return v + gamma * op.normal(v)

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(n_batch, a.ndim))
        return (a.conj() * b).real.sum(dim=dims, keepdim=True)

    u = x0
    r = x0 + gamma * aty - apply(u)
    p = r
    rr = dot(r, r)
    for _ in range(int(n_iter)):
        ap = apply(p)
        alpha = rr / dot(p, ap).clamp_min(1e-30)
        u = u + alpha * p
        r = r - alpha * ap
        rr_new = dot(r, r)
        p = r + (rr_new / rr.clamp_min(1e-30)) * p
        rr = rr_new
    return u


def tv_sum(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV over the last two dims, summed (the reference's ``tv_loss``)."""
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dw = (x[..., 1:, :] - x[..., :-1, :]).abs()
    return dh[..., :-1, :].sum() + dw[..., :, :-1].sum()


def adaptation_loss(op: LinearOperator, y: torch.Tensor, u_image: torch.Tensor, tv: float, y_power: float,
                    scale: float = 1.0) -> torch.Tensor:
    """SCD's self-supervised loss: mean |A u - y|^2 (divided by ``y_power`` = mean |y|^2) + tv TV(scale u), the
    TV of u in the prior's units (the prior's offset does not change differences)."""
    data = (op.forward(u_image) - y).abs().pow(2).mean() / max(y_power, 1e-30)
    return data + tv * tv_sum(u_image * scale) if tv else data


def train_steps(adapter: Adapter, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
                steps: int) -> list[float]:
    """``steps`` Adam steps on the LoRA parameters (the adapter's scale must be 1); the losses before each."""
    losses = []
    for _ in range(int(steps)):
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn()
            loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
