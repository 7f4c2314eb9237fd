"""The Bayesian last layer (diffx.uncertainty): the model split, the closed-form predictive against the
exact Jacobian, Monte Carlo's convergence to it, guidance with shared weights, the curvature and
marginal likelihood, and the sidecar file."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from diffx.errors import DiffxError
from diffx.models.mmdit import MMDiT
from diffx.models.unet import UNet
from diffx.uncertainty import laplace, mc, predictive
from diffx.uncertainty.mc import _split

from conftest import make_objective


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


class Float64:
    """A float32 model's split with its head in float64: features cast up, so the head's algebra is
    checked to float64 round-off (the time embedding is float32 by design)."""

    def __init__(self, model):
        self.model, self.head = model, copy.deepcopy(model.head).double()

    def features(self, x, t, cond=None):
        return self.model.features(x.float(), t.float(), cond).double()

    def to_image(self, y):
        return self.model.to_image(y)

    def __call__(self, x, t, cond=None):
        return self.to_image(self.head(self.features(x, t, cond)))


def _unet(**kw):
    return Float64(_randomise(UNet(3, 8, num_classes=4, channels=8, channel_mult=(1, 2), attn_resolutions=(), **kw)))


def _mmdit(**kw):
    return Float64(_randomise(MMDiT(3, 8, num_classes=4, width=16, depth=1, heads=2, patch_size=2, **kw)))


MODELS = {"unet": _unet, "mmdit": _mmdit}


def _posterior(head: nn.Module, structure: str, seed: int = 0) -> laplace.Posterior:
    """A posterior from a random positive-definite curvature (any A works for the algebra)."""
    g = torch.Generator().manual_seed(seed)
    k = laplace.head_params(head).shape[1]
    u = torch.randn(3 * k, k, generator=g, dtype=torch.float64)
    c = laplace.Curvature(u.T @ u, 1.0, 10, 0.0, head.weight.shape[0], 1.0, 10)
    return laplace.Posterior.from_curvature(c, structure, prior_precision=0.5, noise=0.7, sha256="x")


def _full_cov(post: laplace.Posterior, outputs: int) -> torch.Tensor:
    """The (P, P) covariance over theta flattened as (outputs, K+1)."""
    if post.structure == "kron":
        return torch.block_diag(*[post.cov] * outputs)
    return torch.diag(post.cov.flatten())


def _exact_var(head: nn.Module, post: laplace.Posterior, fn) -> torch.Tensor:
    """Var of ``fn(theta)`` from its exact Jacobian: diag(J Sigma J^T)."""
    theta = laplace.head_params(head).detach()
    jac = jacrev(fn)(theta)  # (*out, outputs, K+1)
    out_shape = jac.shape[: jac.ndim - 2]
    j = jac.reshape(-1, theta.numel())
    return torch.einsum("mp,pq,mq->m", j, _full_cov(post, theta.shape[0]), j).reshape(out_shape)


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64)
    return x, t, {"label": torch.tensor([0, 1, 3])}


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_the_head_of_the_features(name):
    model = MODELS[name]().model
    x, t, cond = _inputs(model)
    x, t = x.float(), t.float()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), model.to_image(model.head(model.features(x, t, cond))))


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
@pytest.mark.parametrize("name", MODELS)
def test_closed_form_variance_equals_the_exact_jacobian_one(name, structure):
    model = MODELS[name]()
    head = model.head
    post = _posterior(head, structure)
    x, t, cond = _inputs(model)
    with torch.no_grad():
        f = model.features(x, t, cond)
    closed = predictive.variance(model, post, f)
    exact = _exact_var(head, post, lambda th: model.to_image(functional_call(head, _split(head, th), (f,))))
    assert closed.shape == x.shape
    torch.testing.assert_close(closed, exact, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
def test_guided_variance_uses_the_shared_weights(structure):
    """Under CFG both branches share the head: Var of the guided output is the head variance of
    g = (1 - w) f_u + w f_c (exact Jacobian), not w^2 Var_c + (1 - w)^2 Var_u."""
    model, w = _unet(), 3.0
    head = model.head
    post = _posterior(head, structure)
    x, t, cond = _inputs(model)
    uncond = {"label": torch.full((3,), -1)}
    with torch.no_grad():
        f_c, f_u = model.features(x, t, cond), model.features(x, t, uncond)

    def guided(th):
        y_c, y_u = (functional_call(head, _split(head, th), (f,)) for f in (f_c, f_u))
        return y_u + w * (y_c - y_u)

    exact = _exact_var(head, post, guided)
    closed = predictive.variance(model, post, predictive.guided_features(model, x, t, cond, uncond, w))
    torch.testing.assert_close(closed, exact, rtol=1e-10, atol=1e-15)
    independent = w**2 * predictive.variance(model, post, f_c) + (1 - w) ** 2 * predictive.variance(model, post, f_u)
    assert (independent / closed).median() > 2  # treating the branches as independent overstates it


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
@pytest.mark.parametrize("n", [50, 400])
def test_monte_carlo_converges_within_its_band(structure, n):
    """The head's output is Gaussian in theta, so MC's sample variance has relative spread sqrt(2/(n-1))."""
    model = _unet()
    post = _posterior(model.head, structure)
    x, t, cond = _inputs(model)
    with torch.no_grad():
        f = model.features(x, t, cond)
        exact = predictive.head_variance(post, model.head, f)
        mean, var = mc.head_moments(post, model.head, f, n, torch.Generator().manual_seed(n))
    rel = (var / exact - 1).flatten()
    band = math.sqrt(2 / (n - 1))
    assert 0.6 * band < rel.pow(2).mean().sqrt() < 1.4 * band
    assert abs(rel.mean()) < 3 * band  # the draws are shared by all elements, so the mean moves as one
    torch.testing.assert_close(mean, model.head(f), atol=6 * exact.sqrt().max() / math.sqrt(n), rtol=0)


def test_guided_monte_carlo_with_shared_draws_matches_the_formula():
    model, w, n = _unet(), 4.0, 400
    post = _posterior(model.head, "kron")
    x, t, cond = _inputs(model)
    with torch.no_grad():
        g = predictive.guided_features(model, x, t, cond, {"label": torch.full((3,), -1)}, w)
        drawn = mc.draws(post, model.head, n, torch.Generator().manual_seed(0))
        f_c, f_u = model.features(x, t, cond), model.features(x, t, {"label": torch.full((3,), -1)})
        ys = torch.stack([(1 - w) * functional_call(model.head, _split(model.head, th), (f_u,))
                          + w * functional_call(model.head, _split(model.head, th), (f_c,)) for th in drawn])
    rel = (ys.var(0) / predictive.head_variance(post, model.head, g) - 1).flatten()
    assert rel.pow(2).mean().sqrt() < 1.4 * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("objective", [("ddpm", "cosine", {"prediction": "eps"}), ("ddpm", "linear", {"prediction": "v"}),
                                       ("flow", "linear", {})])
def test_x0_and_noise_variances_follow_the_affine_inverse(objective):
    family, schedule, kw = objective
    obj = make_objective(family, schedule, **kw)
    model = _unet()
    post = _posterior(model.head, "diag")
    x, t, cond = _inputs(model)
    t = t.clamp(0.05, 0.95)
    p = predictive.predict(model, obj, post, x, t, cond)
    head = model.head
    with torch.no_grad():
        f = model.features(x, t, cond)
    exact = _exact_var(head, post, lambda th: obj.to_x0_noise(model.to_image(functional_call(head, _split(head, th), (f,))), x, t)[0])
    torch.testing.assert_close(p.x0_var, exact, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(p.pred, model(x, t, cond))


def test_curvature_is_the_gram_of_the_heads_inputs_and_evidence_peaks_at_the_fit():
    model = _unet()
    head = model.head
    x, t, cond = _inputs(model)
    with torch.no_grad():
        f = model.features(x, t, cond)
        pred = head(f)
    target = pred + 0.1 * torch.randn_like(pred)
    c = laplace.Curvature.zeros(head)
    c.add(head, f, pred, target, torch.ones(3, dtype=torch.float64))
    # the GGN of a Gaussian likelihood from the exact Jacobian: J^T J, one (K+1) block per output
    jac = jacrev(lambda th: functional_call(head, _split(head, th), (f,)))(laplace.head_params(head).detach())
    j = jac.reshape(-1, *jac.shape[-2:])  # (M, outputs, K+1)
    ggn = torch.einsum("mok,moj->kj", j, j) / head.weight.shape[0]
    torch.testing.assert_close(c.gram, ggn, rtol=1e-10, atol=1e-10)
    assert c.count == pred.numel() and c.sse == pytest.approx(float(((pred - target) ** 2).sum()))
    delta, sigma, ev = laplace.fit_hyperparameters(c, "kron")
    for dd, ds in ((1.2, 1), (1 / 1.2, 1), (1, 1.05), (1, 1 / 1.05)):
        other = laplace.log_marginal_likelihood(c, "kron", torch.tensor(delta * dd, dtype=torch.float64),
                                                torch.tensor(sigma * ds, dtype=torch.float64))
        assert float(other) <= ev + 1e-9
    fixed = laplace.fit_hyperparameters(c, "diag", prior_precision=2.0, noise=0.3)
    assert fixed[:2] == pytest.approx((2.0, 0.3))


def test_sidecar_round_trip_and_refusals(tmp_path):
    model = _unet()
    post = _posterior(model.head, "kron")
    post.sha256, post.info = "ab" * 32, {"pairs": 10}
    path = tmp_path / "laplace.safetensors"
    laplace.save(path, post)
    back = laplace.load(path, "ab" * 32, "model.safetensors", model.head)
    assert (back.structure, back.prior_precision, back.noise, back.info) == ("kron", 0.5, 0.7, {"pairs": 10})
    assert torch.equal(back.cov, post.cov)
    with pytest.raises(DiffxError, match="fitted to another model file") as e:
        laplace.load(path, "cd" * 32, "model.safetensors", model.head)
    assert "\n" not in str(e.value) and "diffx fit-laplace" in str(e.value)
    with pytest.raises(DiffxError, match="does not fit the model's head"):
        laplace.load(path, "ab" * 32, "model.safetensors", _mmdit().head)
    with pytest.raises(DiffxError, match="no such file"):
        laplace.load(tmp_path / "none.safetensors", "ab" * 32, "model.safetensors", model.head)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DiffxError, match="not a valid safetensors"):
        laplace.load(tmp_path / "bad.safetensors", "ab" * 32, "model.safetensors", model.head)
