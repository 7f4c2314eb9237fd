"""A Bayesian last layer: the Laplace approximation over a model's output layer (its ``head``).

BayesDiff (Kou et al. 2024, sec. 3.1) puts a last-layer Laplace approximation (Daxberger et al. 2021,
"Laplace Redux") on a diffusion model's output layer. Every diffx model splits as
``forward = to_image(head(features(x, t, cond)))`` with ``head`` a Conv2d (UNet) or a Linear (MMDiT),
so its output is linear in the head's weights ``theta = [W, b]``: output unit ``o`` at position ``l`` is
``u_l . theta_o`` with ``u_l = [patch_l, 1]`` (``patches``; a 3x3 conv's patch holds C_in * 9 features).

Under the training loss read as a Gaussian likelihood ``target ~ N(pred, sigma^2 / w(t))`` the
generalised Gauss-Newton of the head is exact and Kronecker-factored (Martens & Grosse 2015, with the
output factor the identity): ``GGN = I_outputs (x) A / sigma^2`` with ``A = sum_n w_n sum_l u_l u_l^T``,
one (K+1) x (K+1) Gram matrix. With the isotropic prior ``N(0, 1/delta)`` the posterior is

- ``structure=kron``: ``N(theta_map, I (x) (A / sigma^2 + delta I)^-1)``, the exact last-layer Laplace
  posterior (the Kronecker factorisation loses nothing here);
- ``structure=diag``: its diagonal approximation, ``var = 1 / (diag(A) / sigma^2 + delta)``.

``delta`` and ``sigma`` maximise the Laplace marginal likelihood (MacKay 1992; Immer et al. 2021),
unless given. The fit is stored beside the checkpoint as ``laplace.safetensors`` with the sha256 of the
model file it belongs to; any other model file is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from diffx import __version__
from diffx.atomic import atomic_write
from diffx.errors import DiffxError, first_line

FORMAT = "diffx.laplace/1"
STRUCTURES = ("diag", "kron")


def head_of(model, where: str) -> nn.Module:
    """The model's output layer; a model without the ``features`` / ``head`` / ``to_image`` split, or with a
    head that is not a plain Linear or zero-padded, ungrouped Conv2d with a bias, is refused."""
    head = getattr(model, "head", None)
    ok = isinstance(head, nn.Linear) or (isinstance(head, nn.Conv2d) and head.groups == 1
                                         and head.padding_mode == "zeros")
    if not (ok and head.bias is not None and hasattr(model, "features") and hasattr(model, "to_image")):
        raise DiffxError(f"{where}: its model has no Bayesian-last-layer split (features / head / to_image with "
                         "a Linear or Conv2d head with a bias); only diffx's UNet and MMDiT have one")
    return head


def patches(head: nn.Module, f: Tensor) -> Tensor:
    """The head's input as one row per output position: (B, L, K), so that without bias
    ``head(f)[b, o at l] = patches[b, l] . W[o].flatten()`` (a conv's unfolded patches; a linear's tokens)."""
    if isinstance(head, nn.Conv2d):
        u = F.unfold(f, head.kernel_size, head.dilation, head.padding, head.stride)  # (B, C_in k k, L)
        return u.transpose(1, 2)
    return f.reshape(f.shape[0], -1, f.shape[-1])  # (B, ..., D) -> (B, L, D)


def augmented(head: nn.Module, g: Tensor, beta: Tensor) -> Tensor:
    """``[patches, beta]`` (B, L, K+1): the bias's input is 1 for a plain prediction, ``beta`` (B,) for a
    linear combination of predictions (guidance, a sampler's steps)."""
    u = patches(head, g)
    ones = beta.to(u.dtype).reshape(-1, 1, 1).expand(u.shape[0], u.shape[1], 1)
    return torch.cat([u, ones], dim=-1)


def head_params(head: nn.Module) -> Tensor:
    """(outputs, K+1): each output unit's weights, then its bias."""
    return torch.cat([head.weight.reshape(head.weight.shape[0], -1), head.bias[:, None]], dim=1)


@dataclass
class Curvature:
    """What the marginal likelihood and the posterior need, summed over the streamed training pairs:
    the Gram matrix ``A`` (K+1, K+1) of the head's augmented inputs, the weighted squared error, the
    number of output values, the sum of their log weights, and the MAP's squared norm."""

    gram: Tensor
    sse: float
    count: int
    log_w: float
    outputs: int
    theta_sq: float
    pairs: int

    @classmethod
    def zeros(cls, head: nn.Module) -> "Curvature":
        theta = head_params(head).detach().double()
        k = theta.shape[1]
        return cls(torch.zeros(k, k, dtype=torch.float64, device=theta.device), 0.0, 0, 0.0, theta.shape[0],
                   float((theta**2).sum()), 0)

    def add(self, head: nn.Module, f: Tensor, pred: Tensor, target: Tensor, w: Tensor) -> None:
        """One batch: head inputs ``f``, predictions and targets (B, ...), loss weights ``w`` (B,)."""
        u = augmented(head, f.double(), torch.ones(f.shape[0], device=f.device))  # (B, L, K+1)
        self.gram += torch.einsum("blk,blj,b->kj", u, u, w.double())
        per = pred[0].numel()
        self.sse += float((w.double() * ((pred.double() - target.double()) ** 2).flatten(1).sum(1)).sum())
        self.count += pred.numel()
        self.log_w += float(per * torch.log(w.double()).sum())
        self.pairs += pred.shape[0]


def log_marginal_likelihood(c: Curvature, structure: str, delta: Tensor, sigma: Tensor) -> Tensor:
    """The Laplace evidence ``log p(D | delta, sigma)`` (Immer et al. 2021, eq. 3):
    ``log p(D | theta*) - delta |theta*|^2 / 2 + P/2 log delta - 1/2 log det(GGN + delta I)``, with the
    log det over the outputs' identical (K+1) blocks: eigenvalues of A (kron) or its diagonal (diag)."""
    lam = _spectrum(c, structure)
    n_params = c.outputs * lam.numel()
    log_lik = -0.5 * (c.count * torch.log(2 * math.pi * sigma**2) - c.log_w + c.sse / sigma**2)
    log_det = c.outputs * torch.log(lam / sigma**2 + delta).sum()
    return log_lik - 0.5 * delta * c.theta_sq + 0.5 * n_params * torch.log(delta) - 0.5 * log_det


def _spectrum(c: Curvature, structure: str) -> Tensor:
    return torch.linalg.eigvalsh(c.gram).clamp(min=0) if structure == "kron" else torch.diagonal(c.gram)


def fit_hyperparameters(c: Curvature, structure: str, prior_precision: float | None = None,
                        noise: float | None = None, iters: int = 200) -> tuple[float, float, float]:
    """``(delta, sigma, log evidence)``: those not given maximise the marginal likelihood (L-BFGS in
    log space, started at delta = 1 and the residuals' own sigma)."""
    start_sigma = math.sqrt(max(c.sse, 1e-30) / max(c.count, 1))
    log_d = torch.tensor(math.log(prior_precision if prior_precision is not None else 1.0), dtype=torch.float64,
                         requires_grad=prior_precision is None)
    log_s = torch.tensor(math.log(noise if noise is not None else start_sigma), dtype=torch.float64,
                         requires_grad=noise is None)
    free = [p for p in (log_d, log_s) if p.requires_grad]
    if free:
        opt = torch.optim.LBFGS(free, lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -log_marginal_likelihood(c, structure, log_d.exp(), log_s.exp()) / max(c.count, 1)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        delta, sigma = float(log_d.exp()), float(log_s.exp())
        evidence = float(log_marginal_likelihood(c, structure, log_d.exp(), log_s.exp()))
    return delta, sigma, evidence


@dataclass
class Posterior:
    """The Gaussian over the head's ``theta = [W, b]`` around the model's own weights (the MAP).

    ``cov`` is the (K+1, K+1) covariance shared by every output unit (kron) or the (outputs, K+1)
    variances (diag). ``sha256``: of the model file the fit belongs to."""

    structure: str
    prior_precision: float
    noise: float
    cov: Tensor
    sha256: str
    info: dict

    @classmethod
    def from_curvature(cls, c: Curvature, structure: str, prior_precision: float, noise: float, sha256: str,
                       info: dict | None = None) -> "Posterior":
        if structure not in STRUCTURES:
            raise DiffxError(f"structure={structure!r}: expected one of {', '.join(STRUCTURES)}")
        eye = torch.eye(c.gram.shape[0], dtype=torch.float64, device=c.gram.device)
        precision = c.gram / noise**2 + prior_precision * eye
        if structure == "kron":
            cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        else:
            cov = (1.0 / torch.diagonal(precision)).expand(c.outputs, -1).clone()
        return cls(structure, float(prior_precision), float(noise), cov, sha256, dict(info or {}))

    def factor(self) -> Tensor:
        """kron: the lower Cholesky factor R of ``cov = R R^T`` (K+1, K+1), computed once."""
        if getattr(self, "_factor", None) is None or self._factor.device != self.cov.device:
            self._factor = torch.linalg.cholesky(self.cov.double()).to(self.cov.dtype)
        return self._factor

    def to(self, device=None, dtype=None) -> "Posterior":
        return Posterior(self.structure, self.prior_precision, self.noise, self.cov.to(device=device, dtype=dtype),
                         self.sha256, self.info)

    def sample(self, n: int, outputs: int, generator=None) -> Tensor:
        """``n`` draws of ``theta - theta_map``: (n, outputs, K+1)."""
        k = self.cov.shape[-1]
        z = torch.randn((n, outputs, k), generator=generator, dtype=self.cov.dtype, device=self.cov.device)
        if self.structure == "kron":
            return z @ self.factor().T  # each output unit ~ N(0, cov)
        return z * self.cov.sqrt()


def save(path, posterior: Posterior) -> None:
    """Write the sidecar atomically: the posterior tensor, and in the metadata its structure, prior
    precision, noise scale and the sha256 of the model file."""
    metadata = {"format": FORMAT, "diffx_version": __version__, "structure": posterior.structure,
                "prior_precision": repr(posterior.prior_precision), "noise": repr(posterior.noise),
                "sha256": posterior.sha256, "info": json.dumps(posterior.info)}
    tensors = {"cov": posterior.cov.detach().double().contiguous().cpu()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load(path, model_sha256: str, ckpt, head: nn.Module) -> Posterior:
    """Read a sidecar and check it belongs to this model file (``model_sha256``) and head; every failure
    is one DiffxError naming the file."""
    where = f"uncertainty.laplace={path}"
    if not Path(path).is_file():
        raise DiffxError(f"{where}: no such file; fit one first: diffx fit-laplace ckpt={ckpt}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            cov = f.get_tensor("cov") if "cov" in f.keys() else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffxError(f"{where}: not a valid safetensors file ({first_line(e)})") from None
    if meta.get("format") != FORMAT or cov is None or meta.get("structure") not in STRUCTURES:
        raise DiffxError(f"{where}: not a diffx Laplace sidecar (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("sha256") != model_sha256:
        raise DiffxError(f"{where} was fitted to another model file (sha256 {str(meta.get('sha256'))[:12]}..., "
                         f"ckpt={ckpt} is {model_sha256[:12]}...); refit: diffx fit-laplace ckpt={ckpt}")
    k = head_params(head).shape
    expected = (k[1], k[1]) if meta["structure"] == "kron" else tuple(k)
    if tuple(cov.shape) != expected:
        raise DiffxError(f"{where}: posterior shape {list(cov.shape)} does not fit the model's head {list(expected)}")
    try:
        prior, noise, info = float(meta["prior_precision"]), float(meta["noise"]), json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError) as e:
        raise DiffxError(f"{where}: malformed metadata ({first_line(e)})") from None
    return Posterior(meta["structure"], prior, noise, cov, model_sha256, info)
