"""sdvae: Stable-Diffusion-style KL image VAEs built on ``diffusers.AutoencoderKL``.

``import sdvae`` stays light: torch and diffusers load when a submodule that needs them is imported.
"""

__version__ = "0.1.0"
