"""Diffusion priors: noise schedules, the denoiser interface, analytic priors and data consistency.

Networks, checkpoints and training live in :mod:`.networks`, :mod:`.checkpoint` and :mod:`.train`; the
samplers that use all of this are the reconstruction methods in :mod:`medrecon.methods`.
"""

from medrecon.diffusion.analytic import GaussianMixturePrior, GaussianPrior
from medrecon.diffusion.denoiser import Denoiser, EDMDenoiser, EpsilonDenoiser, Prior, score
from medrecon.diffusion.schedules import EDMSchedule, VPSchedule, schedule_from_dict

__all__ = ["Denoiser", "EDMDenoiser", "EDMSchedule", "EpsilonDenoiser", "GaussianMixturePrior",
           "GaussianPrior", "Prior", "VPSchedule", "schedule_from_dict", "score"]
