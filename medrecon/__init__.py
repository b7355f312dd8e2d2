"""medrecon: 3D CT/MRI reconstruction with diffusion priors over chunked zarr volumes.

Arrays are ``(z, y, x)`` float32 in millimetre geometry everywhere; see :mod:`medrecon.volume`.
"""

__version__ = "0.1.0"
