"""Diffusion reconstruction methods, one per module; importing this package registers them all.

Each module registers a function ``method(problem, params, prior, generator) -> ReconResult`` with
:func:`medrecon.recon.registry.register_method` and names in its docstring the paper and reference code
it follows and every deliberate departure.
"""

from medrecon.methods import dds, dps

__all__ = ["dds", "dps"]
