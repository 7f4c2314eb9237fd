"""diffx: config-driven training and sampling of diffusion and flow models."""

__version__ = "0.1.0"
