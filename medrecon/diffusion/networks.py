"""Network builders for diffusion priors: MONAI's DiffusionModelUNet and AutoencoderKL behind plain dict specs.

A *spec* is a JSON-able dict of constructor arguments. Checkpoints store the resolved spec (never "auto"
values), so :func:`build_unet` rebuilds exactly the trained architecture. Keys of a UNet spec:

``image_size``             training resolution (square); every level must halve it exactly. Inference takes
                           any size: samplers pad slices to a multiple of ``2^(levels-1)`` with the
                           background (:mod:`medrecon.diffusion.canvas`); a raw call with another size is
                           an ``InputError`` saying so, not MONAI's "Sizes of tensors must match".
``in_channels``            image channels the prior models: 1 CT slice, 2 complex MR (real, imag), 3 or 6 slab.
``out_channels``           predicted channels, normally ``in_channels``.
``coord_channels``         extra, un-noised input channels (2 or 3 coordinate maps for patch priors, PaDIS);
                           they are *not* predicted, so MONAI sees ``in_channels + coord_channels`` inputs.
``channels``               widths per resolution level (one level per entry).
``num_res_blocks``         residual blocks per level (int or list).
``attention_levels``       list of bools, or ``"auto"``: attention at every level whose resolution is
                           ``<= attention_max_resolution``.
``attention_max_resolution`` cap on the resolution of any attention layer (at most 32 is sensible on CPU;
                           the demo specs use 16). Attention costs
                           O(pixels^2): on CPU a 64x64 attention layer dominates the forward pass (stack.md:
                           0.44 s of 0.75 s at 256x256), so levels above the cap are refused rather than
                           silently made slow. MONAI's middle block always has attention at the coarsest
                           level, so that level must respect the cap too.
``num_head_channels``      channels per attention head.
``norm_num_groups``        GroupNorm groups; must divide every width.
``num_class_embeds``       number of class labels (slice-position label of DiffusionBlend), or None.
``resblock_updown``        down/up-sample inside residual blocks (ADM style) instead of strided convs.

The built module is :class:`DiffusionUNet`, whose call signature is MONAI's
``net(x, timesteps, class_labels=None)`` plus ``coords=`` for coordinate channels, so the denoiser
adapters in :mod:`medrecon.diffusion.denoiser` pass conditioning as keyword arguments (``Prior.cond``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from medrecon.errors import ConfigError, InputError

_UNET_KEYS = ("image_size", "in_channels", "out_channels", "coord_channels", "channels", "num_res_blocks",
              "attention_levels", "attention_max_resolution", "num_head_channels", "norm_num_groups",
              "num_class_embeds", "resblock_updown")

# Demo-sized defaults per prior kind: 1.1 M parameters at 64x64. Widths are small on purpose: the demo trains
# on CPU (stack.md: ~0.27 s per 8x1x64x64 step on an idle 2-core machine; widths (32, 64, 128) double the
# cost for 2.7 M parameters, see benchmarks/train_throughput.py); GPU studies override "channels".
_DEFAULTS: dict[str, dict[str, Any]] = {
    "slice": {"image_size": 64, "in_channels": 1, "out_channels": 1, "coord_channels": 0,
              "channels": [32, 64, 64], "num_res_blocks": 1, "attention_levels": "auto",
              "attention_max_resolution": 16, "num_head_channels": 32, "norm_num_groups": 16,
              "num_class_embeds": None, "resblock_updown": False},
    # DiffusionBlend: 3 slices as channels, class label = slice spacing code (1 adjacent, 3 jumping).
    "slab": {"image_size": 64, "in_channels": 3, "out_channels": 3, "coord_channels": 0,
             "channels": [32, 64, 64], "num_res_blocks": 1, "attention_levels": "auto",
             "attention_max_resolution": 16, "num_head_channels": 32, "norm_num_groups": 16,
             "num_class_embeds": 4, "resblock_updown": False},
    # PaDIS: x/y coordinate channels in [-1, 1]; image_size = the largest training patch.
    "patch": {"image_size": 64, "in_channels": 1, "out_channels": 1, "coord_channels": 2,
              "channels": [32, 64, 64], "num_res_blocks": 1, "attention_levels": "auto",
              "attention_max_resolution": 16, "num_head_channels": 32, "norm_num_groups": 16,
              "num_class_embeds": None, "resblock_updown": False},
}

_AE_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "in_channels": 1, "out_channels": 1, "channels": [32, 64, 64], "num_res_blocks": 1,
    "attention_levels": [False, False, False], "latent_channels": 3, "norm_num_groups": 16,
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}


def network_spec_defaults(kind: str) -> dict[str, Any]:
    """Default (unresolved) UNet spec for a prior kind: ``"slice"``, ``"slab"`` or ``"patch"``."""
    if kind not in _DEFAULTS:
        raise ConfigError(f"unknown prior kind {kind!r} for a network spec",
                          fix=f"use one of {sorted(_DEFAULTS)}")
    return copy.deepcopy(_DEFAULTS[kind])


def tiny_network_spec(kind: str = "slice", image_size: int = 16) -> dict[str, Any]:
    """A few-thousand-parameter spec for tests: two levels (8, 16), no level attention."""
    spec = network_spec_defaults(kind)
    spec.update(image_size=image_size, channels=[8, 16], num_res_blocks=1, attention_levels=[False, False],
                attention_max_resolution=max(image_size // 2, 1), num_head_channels=8, norm_num_groups=8)
    return spec


def resolve_unet_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a UNet spec and replace ``"auto"`` attention by explicit levels (what a checkpoint stores)."""
    unknown = sorted(set(spec) - set(_UNET_KEYS))
    if unknown:
        raise ConfigError(f"unknown network spec key(s) {unknown}", fix=f"valid keys are {list(_UNET_KEYS)}")
    missing = [k for k in _UNET_KEYS if k not in spec]
    if missing:
        raise ConfigError(f"network spec lacks {missing}",
                          fix="start from network_spec_defaults(kind) and override what you need")
    s = copy.deepcopy(spec)
    channels = [int(c) for c in s["channels"]]
    levels = len(channels)
    size = int(s["image_size"])
    if levels < 1 or size < 1 or size % (2 ** (levels - 1)):
        raise ConfigError(f"image_size {size} cannot be halved {levels - 1} times exactly (channels {channels})",
                          fix=f"use an image_size that is a multiple of {2 ** (levels - 1)} or fewer levels")
    res = [size // 2**i for i in range(levels)]
    cap = int(s["attention_max_resolution"])
    att = s["attention_levels"]
    att = [r <= cap for r in res] if att == "auto" else [bool(a) for a in att]
    if len(att) != levels:
        raise ConfigError(f"attention_levels has {len(att)} entries but there are {levels} levels",
                          fix="give one bool per entry of 'channels', or 'auto'")
    too_big = [r for r, a in zip(res, att, strict=True) if a and r > cap]
    if too_big or res[-1] > cap:
        raise ConfigError(
            f"attention at resolution {too_big or [res[-1]]} exceeds attention_max_resolution={cap} "
            f"(levels have resolutions {res}; MONAI's middle block always attends at {res[-1]})",
            fix="add a level to 'channels', switch attention off at those levels, or raise "
                "attention_max_resolution (slow on CPU)")
    groups = int(s["norm_num_groups"])
    if any(c % groups for c in channels):
        raise ConfigError(f"norm_num_groups={groups} does not divide the widths {channels}",
                          fix="pick widths that are multiples of norm_num_groups")
    heads = int(s["num_head_channels"])
    att_widths = [c for c, a in zip(channels, att, strict=True) if a] + [channels[-1]]
    if any(c % heads for c in att_widths):
        raise ConfigError(f"num_head_channels={heads} does not divide the attention widths {att_widths}",
                          fix="use a num_head_channels that divides every attended width")
    for key in ("in_channels", "out_channels"):
        if int(s[key]) < 1:
            raise ConfigError(f"network {key} must be >= 1, got {s[key]}", fix="set it to the image channels")
    if int(s["coord_channels"]) < 0:
        raise ConfigError("coord_channels must be >= 0", fix="use 0, 2 or 3")
    s.update(image_size=size, channels=channels, attention_levels=att, attention_max_resolution=cap,
             norm_num_groups=groups, num_head_channels=heads, in_channels=int(s["in_channels"]),
             out_channels=int(s["out_channels"]), coord_channels=int(s["coord_channels"]),
             resblock_updown=bool(s["resblock_updown"]))
    nrb = s["num_res_blocks"]
    s["num_res_blocks"] = int(nrb) if isinstance(nrb, int) else [int(n) for n in nrb]
    nce = s["num_class_embeds"]
    s["num_class_embeds"] = None if nce is None else int(nce)
    return s


class DiffusionUNet(torch.nn.Module):
    """MONAI DiffusionModelUNet plus un-noised coordinate channels concatenated to the input.

    Keeping the concatenation inside the module means training, checkpoints and the denoiser adapters
    all pass coordinates the same way (``coords=`` keyword), and the stored spec rebuilds it exactly.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = resolve_unet_spec(spec)
        s = self.spec
        self.coord_channels = s["coord_channels"]
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=s["in_channels"] + s["coord_channels"], out_channels=s["out_channels"],
            num_res_blocks=s["num_res_blocks"], channels=tuple(s["channels"]),
            attention_levels=tuple(s["attention_levels"]), norm_num_groups=s["norm_num_groups"],
            resblock_updown=s["resblock_updown"], num_head_channels=s["num_head_channels"],
            num_class_embeds=s["num_class_embeds"],
        )
        if s["num_class_embeds"] is not None:
            # Zero, not MONAI's N(0, 1): a unit-variance class vector (norm ~11 at 128 dims) added to the time
            # embedding (norm ~2) swamps it, and short trainings left DiffusionBlend's slab prior ignoring its
            # position label (issue 14: swapping labels changed the output by < 0.1 dB). From zero the label
            # starts neutral and grows only as far as the data says it matters. Consumes no RNG draws.
            torch.nn.init.zeros_(self.unet.class_embedding.weight)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the UNet halves them once per level below the first)."""
        return 2 ** (len(self.spec["channels"]) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None,
                coords: torch.Tensor | None = None) -> torch.Tensor:
        """Noise (or EDM ``F``) prediction for ``x`` (B, in_channels, H, W) at ``timesteps`` (B,)."""
        m, (h, w) = self.size_multiple, x.shape[-2:]
        if h % m or w % m:   # MONAI would fail deep inside with "Sizes of tensors must match"
            size = self.spec["image_size"]
            raise InputError(
                f"the diffusion network (trained on {size}x{size} images, {len(self.spec['channels'])} levels) "
                f"got a {h}x{w} input; it halves its input {len(self.spec['channels']) - 1} times, so both sides "
                f"must be multiples of {m}",
                fix=f"run it through medrecon's samplers, which pad slices to a multiple of {m} with the "
                    "background (medrecon.diffusion.canvas), or pad the input yourself")
        if self.coord_channels:
            if coords is None or coords.shape[1] != self.coord_channels:
                got = None if coords is None else tuple(coords.shape)
                raise ValueError(f"this network needs coords with {self.coord_channels} channels, got {got}")
            x = torch.cat([x, coords.to(x.dtype)], dim=1)
        elif coords is not None:
            raise ValueError("coords given to a network without coordinate channels")
        if self.spec["num_class_embeds"] is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a network built without num_class_embeds")
            return self.unet(x, timesteps)
        if class_labels is None:
            raise ValueError("this network is class-conditional: pass class_labels (B,)")
        return self.unet(x, timesteps, class_labels=class_labels)


def build_unet(spec: dict[str, Any]) -> DiffusionUNet:
    """The diffusion UNet a (possibly unresolved) spec describes; parameters from torch's global RNG."""
    return DiffusionUNet(spec)


def count_parameters(net: torch.nn.Module) -> int:
    """Number of trainable parameters (reported by benchmarks and training logs)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def autoencoder_spec_defaults() -> dict[str, Any]:
    """Default 2D AutoencoderKL spec for latent priors (ReSample-style): 4x downsampling, 3 latent channels."""
    return copy.deepcopy(_AE_DEFAULTS)


def resolve_autoencoder_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate an autoencoder spec (keys of :func:`autoencoder_spec_defaults`)."""
    unknown = sorted(set(spec) - set(_AE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown autoencoder spec key(s) {unknown}", fix=f"valid keys are {list(_AE_DEFAULTS)}")
    s = {**copy.deepcopy(_AE_DEFAULTS), **copy.deepcopy(spec)}
    channels = [int(c) for c in s["channels"]]
    if len(s["attention_levels"]) != len(channels):
        raise ConfigError("autoencoder attention_levels needs one bool per entry of 'channels'",
                          fix="e.g. [false, false, false] for three levels")
    if any(c % int(s["norm_num_groups"]) for c in channels):
        raise ConfigError(f"norm_num_groups={s['norm_num_groups']} does not divide widths {channels}",
                          fix="pick widths that are multiples of norm_num_groups")
    factor = 2 ** (len(channels) - 1)
    if int(s["image_size"]) % factor:
        raise ConfigError(f"autoencoder image_size {s['image_size']} is not a multiple of {factor}",
                          fix=f"use a multiple of {factor}")
    s["channels"] = channels
    s["attention_levels"] = [bool(a) for a in s["attention_levels"]]
    return s


def latent_shape(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(latent_channels, h, w) of the autoencoder's latent for its ``image_size``."""
    s = resolve_autoencoder_spec(spec)
    side = int(s["image_size"]) // 2 ** (len(s["channels"]) - 1)
    return int(s["latent_channels"]), side, side


def build_autoencoder(spec: dict[str, Any]) -> AutoencoderKL:
    """MONAI AutoencoderKL (2D) for a spec; ``encode`` gives (z_mu, z_sigma), ``decode`` the image."""
    s = resolve_autoencoder_spec(spec)
    return AutoencoderKL(
        spatial_dims=2, in_channels=int(s["in_channels"]), out_channels=int(s["out_channels"]),
        num_res_blocks=s["num_res_blocks"], channels=tuple(s["channels"]),
        attention_levels=tuple(s["attention_levels"]), latent_channels=int(s["latent_channels"]),
        norm_num_groups=int(s["norm_num_groups"]), with_encoder_nonlocal_attn=bool(s["with_encoder_nonlocal_attn"]),
        with_decoder_nonlocal_attn=bool(s["with_decoder_nonlocal_attn"]),
    )


# ---------------------------------------------------------------------------------------------- FBPConvNet

# FBPConvNet (Jin et al. 2017, ``panakino/FBPConvNet``): 5 levels of widths 64..1024 (3x3 conv + BN + ReLU,
# max-pool down, transposed-conv up, concatenated skips, 1x1 output conv). ``features`` follows MONAI's
# BasicUNet: the five level widths, then the width of the last decoder level.
_FBPCONVNET_DEFAULTS: dict[str, Any] = {"in_channels": 1, "out_channels": 1,
                                        "features": [64, 128, 256, 512, 1024, 64]}


def fbpconvnet_spec_defaults() -> dict[str, Any]:
    """The paper's FBPConvNet widths (studies on CPU override ``features`` with narrower ones)."""
    return copy.deepcopy(_FBPCONVNET_DEFAULTS)


def resolve_fbpconvnet_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate an FBPConvNet spec (keys of :func:`fbpconvnet_spec_defaults`, missing ones from there)."""
    unknown = sorted(set(spec) - set(_FBPCONVNET_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown FBPConvNet spec key(s) {unknown}",
                          fix=f"valid keys are {list(_FBPCONVNET_DEFAULTS)}")
    s = {**fbpconvnet_spec_defaults(), **copy.deepcopy(spec)}
    feats = [int(f) for f in s["features"]]
    if len(feats) != 6 or min(feats) < 1:
        raise ConfigError(f"FBPConvNet features must be 6 positive widths (5 levels + the last decoder's), "
                          f"got {s['features']}", fix="e.g. [64, 128, 256, 512, 1024, 64] (the paper's)")
    if int(s["in_channels"]) < 1 or int(s["out_channels"]) < 1:
        raise ConfigError("FBPConvNet in_channels/out_channels must be >= 1", fix="use 1 for CT slices")
    return {"in_channels": int(s["in_channels"]), "out_channels": int(s["out_channels"]), "features": feats}


class FBPConvNet(torch.nn.Module):
    """MONAI ``BasicUNet`` (2D, BatchNorm, ReLU, transposed-conv upsampling) in FBPConvNet's configuration.

    It maps an FBP (B, C, H, W) to the *residual* (reference - FBP); sides must be multiples of 16 (four
    max-pools), which the method and the training dataset guarantee by padding with the background.
    """

    size_multiple = 16

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.spec = resolve_fbpconvnet_spec(spec)
        self.unet = BasicUNet(spatial_dims=2, in_channels=self.spec["in_channels"],
                              out_channels=self.spec["out_channels"], features=tuple(self.spec["features"]),
                              act=("relu", {"inplace": True}), norm=("batch", {}), bias=True, dropout=0.0,
                              upsample="deconv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise InputError(f"FBPConvNet got a {h}x{w} input; its four max-pools need sides that are multiples "
                             f"of {self.size_multiple}",
                             fix="pad the slice with the background first (medrecon.diffusion.canvas.Canvas)")
        return self.unet(x)


def build_fbpconvnet(spec: dict[str, Any]) -> FBPConvNet:
    """The FBPConvNet a (possibly partial) spec describes; parameters from torch's global RNG."""
    return FBPConvNet(spec)
