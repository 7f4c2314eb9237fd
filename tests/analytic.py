"""A Gaussian data distribution whose denoiser is exact: the closed-form posterior mean.

Data ``x0 ~ N(mu, s^2)`` per element. Then ``x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2)`` and
``E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)``; the probability-flow
ODE maps start noise z at t to ``mu + s (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)`` at t = 0.
"""

import torch

from diffx.objectives import bcast


class GaussianModel(torch.nn.Module):
    """A 'network' that returns the objective's exact prediction for Gaussian data."""

    def __init__(self, objective, mu=0.5, s=0.3):
        super().__init__()
        self.objective, self.mu, self.s = objective, mu, s

    def posterior(self, xt, t):
        a, sig = (bcast(v, xt).to(xt.dtype) for v in self.objective.schedule.alpha_sigma(t))
        x0 = self.mu + a * self.s**2 * (xt - a * self.mu) / (a**2 * self.s**2 + sig**2)
        noise = (xt - a * x0) / sig
        return x0, noise

    def forward(self, xt, t, cond=None):
        x0, noise = self.posterior(xt, t)
        return self.objective.target(x0, noise, t)

    def ode_endpoint(self, z, t_start=1.0):
        a, sig = (float(v) for v in self.objective.schedule.alpha_sigma(torch.tensor(t_start, dtype=torch.float64)))
        return self.mu + self.s * (z - a * self.mu) / (a**2 * self.s**2 + sig**2) ** 0.5
