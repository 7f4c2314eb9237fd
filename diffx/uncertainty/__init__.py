"""Per-pixel uncertainty of a diffusion model's samples from a Bayesian last layer (issue 13).

- ``laplace``: the posterior over the output layer (curvature, marginal likelihood, the sidecar file);
- ``predictive``: its closed-form predictive moments at one ``x_t``, guidance included;
- ``propagate``: the mean and variance of the sample through a whole deterministic sampling run;
- ``mc``: the Monte-Carlo reference the other two are tested and benchmarked against;
- ``sampling``: what ``diffx sample uncertainty.enabled=true`` draws and writes.
"""
