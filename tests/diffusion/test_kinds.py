"""``medrecon train`` reaches every prior kind through the one dispatcher (diffusion/kinds.py)."""

from __future__ import annotations

import numpy as np

from medrecon.diffusion.checkpoint import KINDS, load_checkpoint
from medrecon.diffusion.kinds import train_prior, training_kinds
from medrecon.diffusion.networks import tiny_network_spec
from medrecon.volume import Geometry, Volume

_UNET = {k: v for k, v in tiny_network_spec("slice", 16).items()
         if k in ("channels", "num_res_blocks", "attention_levels", "attention_max_resolution",
                  "num_head_channels", "norm_num_groups")}
_AE_NET = {"channels": [16, 16], "attention_levels": [False, False], "latent_channels": 2, "norm_num_groups": 8}
_FAST = {"image_size": 16, "batch_size": 2, "steps": 2, "warmup_steps": 1, "checkpoint_every": 10, "seed": 0,
         "device": "cpu"}


def _volumes(tmp_path, n=2, depth=7):
    out = []
    for i in range(n):
        hu = np.full((depth, 16, 16), -1000.0, dtype=np.float32)
        hu[:, 4:12, 3:13] = np.random.default_rng(i).uniform(-100, 300)
        out.append(Volume.from_array(tmp_path / f"v{i}.zarr", hu, Geometry(), meta={"modality": "CT"}).path)
    return out


def test_every_checkpoint_kind_trains_through_train_prior(tmp_path):
    vols = _volumes(tmp_path)
    slab_net = {k: v for k, v in tiny_network_spec("slab", 16).items()
                if k in ("channels", "attention_levels", "num_head_channels", "norm_num_groups",
                         "attention_max_resolution")}
    configs = {
        "slice": {"kind": "slice", "network": dict(_UNET), **_FAST},
        "slab": {"kind": "slab", "network": slab_net, **_FAST},
        "patch": {"kind": "patch", "loss": "edm", "network": dict(_UNET), **_FAST,
                  "patch": {"pad_width": 2, "patch_sizes": [4, 8], "patch_probs": [0.5, 0.5]}},
        "autoencoder": {"kind": "autoencoder", "network": _AE_NET, **_FAST},
        # fbp_unet's FBPConvNet: pairs simulated for one CT acquisition (slices at their own size, no image_size)
        "supervised": {"kind": "supervised", "network": {"features": [4, 4, 8, 8, 16, 4]}, "measure": {"views": 6},
                       **{k: v for k, v in _FAST.items() if k != "image_size"}},
    }
    assert set(configs) | {"latent"} == set(KINDS) == set(training_kinds())
    paths = {}
    for kind, cfg in configs.items():
        paths[kind] = train_prior(cfg, vols, tmp_path / f"{kind}.pt")
        assert load_checkpoint(paths[kind]).kind == kind
    latent = {"kind": "latent", "autoencoder": str(paths["autoencoder"]), "network": {**_UNET, "channels": [8, 16]},
              **_FAST}
    assert load_checkpoint(train_prior(latent, vols, tmp_path / "latent.pt")).kind == "latent"
