"""Diffusion reconstruction methods, one per module; importing this package registers every method.

Each module registers a function ``method(problem, params, prior, generator) -> ReconResult`` with
:func:`medrecon.recon.registry.register_method` (name, modalities, prior kind and loader, parameter defaults,
paper) and names in its docstring the paper and reference code it follows and every deliberate departure.
:mod:`.sampling` holds what the samplers share. Importing the package runs
:func:`medrecon.recon.registry.load_all`, which imports every module here and in :mod:`medrecon.recon`.
"""

from medrecon.recon.registry import load_all

load_all()
