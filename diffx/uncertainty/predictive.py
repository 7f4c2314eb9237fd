"""Closed-form predictive moments of a Bayesian last layer: one more convolution / matmul, no sampling.

The head is linear in ``theta = [W, b]``, so under the Gaussian posterior (``diffx.uncertainty.laplace``)
its output for input ``g`` is Gaussian, exactly (no linearisation):

    mean = head(g)                                   (the model's own output)
    var  = conv(g * g, var_W) + beta^2 var_b          (diag: the issue's formula, one conv of g * g)
    var  = u_l^T Sigma u_l,  u_l = [patch_l(g), beta]  (kron: a quadratic form per position, shared by
                                                        every output unit)

``beta`` is the bias's multiplicity: 1 for one prediction. Because the head's weights are shared, any
linear combination of predictions is again a head output, of the same combination of inputs: under
classifier-free guidance (both branches share the weights) the guided output is the head of
``g = (1 - w) f_uncond + w f_cond`` with ``beta = 1``, and its variance follows by the same formula,
not as a sum of two independent variances. The objective's ``to_x0_noise`` is linear in
``(pred, x_t)``, so the variances of x0_hat and noise_hat are those of pred times its squared
coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffx import conditioning
from diffx.tensors import bcast
from diffx.uncertainty.laplace import Posterior


def head_variance(posterior: Posterior, head: nn.Module, g: Tensor, beta: Tensor | None = None) -> Tensor:
    """Per-element variance of ``head(g)`` (in the head's output layout) under the posterior; ``beta``
    (B,), default 1."""
    beta = torch.ones(g.shape[0], device=g.device, dtype=g.dtype) if beta is None else beta.to(g.dtype)
    cov = posterior.cov.to(device=g.device, dtype=g.dtype)
    out = head.weight.shape[0]
    if posterior.structure == "diag":
        var_w = cov[:, :-1].reshape(head.weight.shape)
        zero = torch.zeros_like(head.bias, dtype=g.dtype)
        y = functional_call(head, {"weight": var_w, "bias": zero}, (g * g,))  # conv(g*g, var_W)
        return y + (beta**2)[(...,) + (None,) * (y.ndim - 1)] * _along_outputs(head, cov[:, -1], y)
    # u^T Sigma u = |R^T u|^2 with Sigma = R R^T: the columns of R are K+1 "kernels" of the head's shape,
    # so one head-shaped layer with K+1 outputs (a conv, or a matmul) and a sum of squares give it.
    r = posterior.factor().to(device=g.device, dtype=g.dtype)  # (K+1, K+1)
    kernels = {"weight": r[:-1].T.reshape(r.shape[1], *head.weight.shape[1:]), "bias": torch.zeros_like(r[-1])}
    y = functional_call(head, kernels, (g,)) + _bias_term(head, beta, r[-1], g)  # (B, K+1, H, W) or (B, ..., K+1)
    if isinstance(head, nn.Linear):
        return y.pow(2).sum(-1, keepdim=True).expand(*y.shape[:-1], out)  # (B, ..., outputs)
    return y.pow(2).sum(1, keepdim=True).expand(y.shape[0], out, *y.shape[2:])  # (B, outputs, H, W)


def _bias_term(head: nn.Module, beta: Tensor, r_bias: Tensor, g: Tensor) -> Tensor:
    """``beta * R[K, j]`` per sample and kernel j, shaped to add to the kernels' output."""
    if isinstance(head, nn.Linear):
        return beta.reshape(-1, *([1] * (g.ndim - 1))) * r_bias
    return beta.reshape(-1, 1, 1, 1) * r_bias.reshape(1, -1, 1, 1)


def _along_outputs(head: nn.Module, v: Tensor, y: Tensor) -> Tensor:
    """A per-output-unit vector (outputs,) shaped to broadcast against the head's output ``y``."""
    return v.reshape(1, -1, 1, 1) if isinstance(head, nn.Conv2d) else v.reshape(*([1] * (y.ndim - 1)), -1)


def variance(model, posterior: Posterior, g: Tensor, beta: Tensor | None = None) -> Tensor:
    """Per-element variance of ``model.to_image(head(g))``: shaped like x."""
    return model.to_image(head_variance(posterior, model.head, g, beta))


def guided_features(model, x: Tensor, t: Tensor, cond=None, uncond=None, cfg_scale: float = 1.0) -> Tensor:
    """The head input whose output is the guided prediction: ``f_u + w (f_c - f_u)`` from one batched
    forward of both branches (as ``diffx.samplers.denoiser``), or plain ``f`` without guidance."""
    if cond is None or cfg_scale == 1.0:
        return model.features(x, t, cond)
    both = conditioning.cat(cond, uncond if uncond is not None else conditioning.null_like(cond))
    f_c, f_u = model.features(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return f_u + cfg_scale * (f_c - f_u)


@dataclass
class Prediction:
    """Mean and per-element variance of the network output, of x0_hat and of noise_hat at one ``x_t``."""

    pred: Tensor
    pred_var: Tensor
    x0: Tensor
    x0_var: Tensor
    noise: Tensor
    noise_var: Tensor


def predict(model, objective, posterior: Posterior, x: Tensor, t: Tensor, cond=None, uncond=None,
            cfg_scale: float = 1.0) -> Prediction:
    """The closed-form predictive at ``(x_t, t)`` (B, C, H, W), (B,): guided at ``cfg_scale`` with the
    shared-weight formula; x0_hat and noise_hat through the objective's (linear) ``to_x0_noise``."""
    g = guided_features(model, x, t, cond, uncond, cfg_scale)
    pred = model.to_image(model.head(g))
    pred_var = variance(model, posterior, g)
    x0, noise = objective.to_x0_noise(pred, x, t)
    c_x0, c_noise = objective.to_x0_noise(torch.ones_like(t, dtype=pred.dtype), torch.zeros_like(t, dtype=pred.dtype), t)
    return Prediction(pred, pred_var, x0, bcast(c_x0**2, pred) * pred_var, noise, bcast(c_noise**2, pred) * pred_var)
