"""Denoiser networks; every one is ``forward(x, t, cond) -> Tensor shaped like x``."""
