"""PatchGAN discriminator, hinge losses and VQGAN's adaptive GAN weight.

Design follows the N-layer PatchGAN of pix2pix (junyanz/pytorch-CycleGAN-and-pix2pix
models/networks.py NLayerDiscriminator) as used by taming-transformers' VQGAN
(taming/modules/losses/vqperceptual.py); written anew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Maps an image to a grid of real/fake logits, one per overlapping receptive-field patch."""

    def __init__(self, in_ch: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for n in range(1, n_layers):
            c_next = ch * min(2 ** n, 8)
            # no bias: the norm that follows would cancel it
            layers += [nn.Conv2d(c, c_next, 4, 2, 1, bias=False), nn.BatchNorm2d(c_next),
                       nn.LeakyReLU(0.2, True)]
            c = c_next
        c_next = ch * min(2 ** n_layers, 8)
        layers += [nn.Conv2d(c, c_next, 4, 1, 1, bias=False), nn.BatchNorm2d(c_next),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(c_next, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # DCGAN init, as the PatchGAN papers use
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w') logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||grad rec|| / ||grad gan|| at the decoder's last layer, so neither loss swamps the other.

    Both gradients are taken with create_graph=False: the weight is a constant factor.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_gan.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()
