"""Reconstruction methods: classical baselines here, diffusion methods in :mod:`medrecon.methods`."""
