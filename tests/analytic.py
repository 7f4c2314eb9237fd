"""Data whose denoiser is exact, written in terms of ``(x_t, alpha, sigma)`` only, so that diffx and
diffusers (which see the path through different parameters) evaluate the very same function.

``gaussian``: ``x0 ~ N(mu, s^2)`` per element. Then ``x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2)``,
``E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)``, and the probability-flow
ODE keeps ``(x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)`` constant: its solution is closed-form.

``two_point_mixture``: ``x0 ~ (N(-m, c^2) + N(m, c^2)) / 2`` per element, a non-linear denoiser.
"""

import torch

from diffx.tensors import bcast


def gaussian(xt, alpha, sigma, mu=0.5, s=0.3):
    """(x0_hat, noise_hat) for Gaussian data; alpha and sigma broadcast against xt."""
    x0 = mu + alpha * s**2 * (xt - alpha * mu) / (alpha**2 * s**2 + sigma**2)
    return x0, (xt - alpha * x0) / sigma


def two_point_mixture(xt, alpha, sigma, m=0.6, c=0.2):
    """(x0_hat, noise_hat) for an even mixture of N(-m, c^2) and N(m, c^2) per element."""
    var = alpha**2 * c**2 + sigma**2
    p_plus = torch.sigmoid(2 * alpha * m * xt / var)  # responsibility of the +m component
    mean = (2 * p_plus - 1) * m
    x0 = mean + alpha * c**2 * (xt - alpha * mean) / var
    return x0, (xt - alpha * x0) / sigma


class AnalyticModel(torch.nn.Module):
    """A 'network' that returns the objective's exact prediction for data with denoiser ``posterior``."""

    def __init__(self, objective, posterior=gaussian, **data):
        super().__init__()
        self.objective, self.posterior, self.data = objective, posterior, data

    def forward(self, xt, t, cond=None):
        alpha, sigma = (bcast(v, xt).to(xt.dtype) for v in self.objective.schedule.alpha_sigma(t))
        x0, noise = self.posterior(xt, alpha, sigma, **self.data)
        return self.objective.target(x0, noise, t)


class GaussianModel(AnalyticModel):
    """Gaussian data N(mu, s^2): exact denoiser and exact probability-flow ODE solution."""

    def __init__(self, objective, mu=0.5, s=0.3):
        super().__init__(objective, gaussian, mu=mu, s=s)
        self.mu, self.s = mu, s

    def posterior_at(self, xt, t):
        alpha, sigma = (bcast(v, xt).to(xt.dtype) for v in self.objective.schedule.alpha_sigma(t))
        return gaussian(xt, alpha, sigma, self.mu, self.s)

    def ode_solution(self, z, t_start=1.0, t_end=0.0):
        """x(t_end) on the probability-flow ODE through x(t_start) = z."""
        (a0, s0), (a1, s1) = self.objective.schedule.table(torch.tensor([t_start, t_end], dtype=torch.float64))
        k = (z - a0 * self.mu) / (a0**2 * self.s**2 + s0**2) ** 0.5
        return a1 * self.mu + k * (a1**2 * self.s**2 + s1**2) ** 0.5

    def ode_endpoint(self, z, t_start=1.0):
        return self.ode_solution(z, t_start, 0.0)
