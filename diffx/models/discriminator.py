"""The adversarial part of the latent-diffusion autoencoder's loss (Rombach et al. 2022, App. G, after
Esser et al. 2021, "Taming Transformers", sec. 3.2): a PatchGAN discriminator (Isola et al. 2017,
"pix2pix") scores overlapping patches as real or reconstructed, trained with the hinge loss; its
term in the autoencoder's loss is weighted adaptively so that it never swamps the reconstruction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffx.errors import DiffxError


class PatchGAN(nn.Module):
    """pix2pix's N-layer discriminator (Isola et al. 2017, sec. 3.2.2 and App. 6.1.2): 4x4 convs, ``layers``
    of them stride 2, widths ``channels * min(2^n, 8)``, LeakyReLU(0.2); ``forward(x) -> (B, 1, h, w)``,
    one real-vs-fake logit per receptive-field patch (70x70 pixels for ``layers=3``).

    GroupNorm stands in for pix2pix's BatchNorm: no running statistics, so one process or many, and a
    resumed run, see the same function. ``in_channels`` and ``image_size`` come from the data.
    """

    def __init__(self, in_channels: int, image_size: int, channels: int = 64, layers: int = 3, norm_groups: int = 8):
        super().__init__()
        # Each stride-2 4x4 conv (padding 1) halves the side; the two stride-1 ones take 1 off each.
        if layers < 1 or image_size // 2 ** layers - 2 < 1:
            raise DiffxError(f"discriminator.layers={layers}: a {image_size}x{image_size} image leaves no patch "
                             f"after {layers} halvings; expected layers >= 1 with data.size / 2^layers >= 3")
        widths = [channels * min(2 ** n, 8) for n in range(layers + 1)]
        if channels < 1 or norm_groups < 1 or any(w % norm_groups for w in widths[1:]):
            raise DiffxError(f"discriminator.norm_groups={norm_groups} does not divide the widths {widths[1:]} "
                             f"(discriminator.channels={channels}); choose norm_groups dividing every width")
        stack = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            stack += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                      nn.GroupNorm(norm_groups, widths[n]), nn.LeakyReLU(0.2)]
        stack.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*stack)
        for m in self.modules():  # pix2pix's initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def frozen_logits(discriminator: nn.Module, x: Tensor) -> Tensor:
    """``D(x)`` with D's parameters detached: gradients reach ``x`` (the generator) but not D, so the
    generator's loss and D's own can share one backward pass."""
    params = {k: p.detach() for k, p in discriminator.named_parameters()}
    return torch.func.functional_call(discriminator, params, (x,))


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017; taming's ``hinge_d_loss``):
    ``(E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) / 2``."""
    return 0.5 * (torch.relu(1.0 - real_logits).mean() + torch.relu(1.0 + fake_logits).mean())


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The generator's side of the hinge game: ``-E[D(x_hat)]``."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """``lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4)`` at the decoder's last layer L (Esser et al. 2021,
    eq. 7), clamped to [0, 1e4] and detached: the adversarial gradient is scaled to the reconstruction's."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
