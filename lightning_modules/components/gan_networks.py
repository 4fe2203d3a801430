"""Networks of the CycleGAN baseline (docs/METHOD.md section 6): ResNet generator, PatchGAN discriminator, image pool.

- :class:`ResnetGenerator` - the image-transformation network of Johnson et al. 2016 ("Perceptual losses for
  real-time style transfer") as used by CycleGAN (Zhu et al. 2017, appendix 7.2): ``c7s1-64, d128, d256, R256 x 9,
  u128, u64, c7s1-3`` with instance normalisation, reflection padding and a ``tanh`` output in [-1, 1]. With
  ``in_channels=4`` it takes the artifact mask as a fourth channel (the artifact-aware variant of Ke et al., TMI
  2023, AR-CycleGAN). About 11.38 M parameters at ``ngf=64, n_blocks=9``.
- :class:`PatchDiscriminator` - the 70x70 PatchGAN of Isola et al. 2017 (``C64-C128-C256-C512``, 4x4 convolutions,
  LeakyReLU 0.2, no norm on the first layer) ending in a one-channel map of raw scores for the least-squares GAN loss
  (Mao et al. 2017, LSGAN): a 256x256 input gives a 30x30 map. About 2.77 M parameters at ``ndf=64, n_layers=3``.
- :class:`ImagePool` - the history of generated images that the discriminators see (Shrivastava et al. 2017, used by
  CycleGAN with 50 images), seeded by an explicit ``torch.Generator``.

Saving: the generator is a diffusers ``ModelMixin`` + ``ConfigMixin``, so ``G.save_pretrained(folder)`` writes
``config.json`` (its constructor arguments) and ``diffusion_pytorch_model.safetensors``, and
``ResnetGenerator.from_pretrained(folder)`` rebuilds it without Lightning or the training code's checkpoint. This is
the format ``CycleGANModule.export`` writes and the ``cyclegan`` restorer reads.

All weights start from N(0, 0.02) (biases 0), the initialisation of Zhu et al. 2017. No ``lightning`` import here.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

INIT_STD = 0.02


def init_weights(module: nn.Module, std: float = INIT_STD) -> None:
    """Initialise every (transposed) convolution with N(0, std) weights and zero biases, in place.

    Affine normalisation layers (if any) get N(1, std) scales and zero shifts, as in Zhu et al. 2017.

    Args:
        module: Any module; its sub-modules are visited recursively.
        std: Standard deviation of the weights.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def _conv_norm_relu(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    # Instance norm has no affine parameters, so the convolution keeps its bias (as in Zhu et al.'s generator).
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, padding), nn.InstanceNorm2d(out_ch), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """``R256``: two reflection-padded 3x3 convolutions with instance norm and an identity shortcut (He et al. 2016).

    Args:
        channels: Channels in and out.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            *_conv_norm_relu(channels, channels, 3, 1, 0),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return x + self.body(x)


class ResnetGenerator(ModelMixin, ConfigMixin):
    """Johnson et al. 2016 ResNet generator as configured by CycleGAN (Zhu et al. 2017).

    Layout for ``ngf=64, n_blocks=9``: ``c7s1-64, d128, d256, R256 x 9, u128, u64, c7s1-out`` + ``tanh``.

    Args:
        in_channels: 3 (RGB) or 4 (RGB plus the artifact mask as a channel in {-1, 1}, see :meth:`forward`).
        out_channels: Output channels (3 for RGB).
        ngf: Filters of the first layer (doubled by each of the two downsamplings).
        n_blocks: Residual blocks at 1/4 resolution (9 for 256x256 tiles, 6 for 128x128 in Zhu et al.).

    Raises:
        ValueError: For non-positive sizes.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        if min(in_channels, out_channels, ngf) < 1 or n_blocks < 0:
            raise ValueError(
                f"need in/out channels and ngf >= 1 and n_blocks >= 0, got in_channels={in_channels}, "
                f"out_channels={out_channels}, ngf={ngf}, n_blocks={n_blocks}"
            )
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), *_conv_norm_relu(in_channels, ngf, 7, 1, 0)]  # c7s1-64
        ch = ngf
        for _ in range(2):  # d128, d256: 3x3 stride-2 convolutions
            layers += _conv_norm_relu(ch, ch * 2, 3, 2, 1)
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):  # u128, u64: 3x3 fractionally strided convolutions
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]  # c7s1-3
        self.net = nn.Sequential(*layers)
        init_weights(self)

    @property
    def uses_mask(self) -> bool:
        """True when the generator expects the artifact mask as its fourth input channel."""
        return self.config.in_channels == 4

    def forward(self, image: Tensor, artifact_mask: Tensor | None = None) -> Tensor:
        """Translate a batch of images.

        Args:
            image: (B, 3, H, W) in [-1, 1] (or already (B, in_channels, H, W)); H and W divisible by 4.
            artifact_mask: (B, 1, H, W) in {0, 1}, 1 = artifact; required (and only used) when the generator has 4
                input channels. It is fed rescaled to {-1, 1}, the range of the image channels.

        Returns:
            (B, out_channels, H, W) in [-1, 1].

        Raises:
            ValueError: On a missing mask, wrong channel count or a size not divisible by 4.
        """
        if image.ndim != 4 or image.shape[-2] % 4 or image.shape[-1] % 4:
            raise ValueError(f"image must be (B, C, H, W) with H, W divisible by 4, got {tuple(image.shape)}")
        if artifact_mask is not None and image.shape[1] + 1 == self.config.in_channels:
            if artifact_mask.shape != (image.shape[0], 1, *image.shape[2:]):
                raise ValueError(f"artifact_mask must be (B, 1, H, W), got {tuple(artifact_mask.shape)}")
            image = torch.cat([image, artifact_mask.to(image.dtype) * 2 - 1], dim=1)
        if image.shape[1] != self.config.in_channels:
            hint = " (pass artifact_mask)" if self.uses_mask else ""
            raise ValueError(f"generator expects {self.config.in_channels} input channels{hint}, got {image.shape[1]}")
        return self.net(image)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017): one real/fake score per overlapping 70x70 patch at ``n_layers=3``.

    Layers: ``C64`` (no norm) then ``n_layers - 1`` stride-2 and one stride-1 ``Ck`` (4x4 conv, instance norm,
    LeakyReLU 0.2, k doubling up to ``8 * ndf``), then a 4x4 convolution to one channel. The output is a raw score map
    (no sigmoid) for the least-squares loss of Mao et al. 2017.

    Args:
        in_channels: Image channels.
        ndf: Filters of the first layer.
        n_layers: Number of stride-2 layers (3 gives the 70x70 receptive field).

    Raises:
        ValueError: For non-positive sizes.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if min(in_channels, ndf, n_layers) < 1:
            raise ValueError(f"in_channels, ndf and n_layers must be >= 1, got {in_channels}, {ndf}, {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1), nn.InstanceNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, image: Tensor) -> Tensor:
        """(B, in_channels, H, W) in [-1, 1] -> raw patch scores (B, 1, h, w); 256x256 gives 30x30 at n_layers=3."""
        return self.net(image)


class ImagePool:
    """History buffer of generated images shown to the discriminator (Shrivastava et al. 2017; Zhu et al. 2017).

    Until the pool holds ``size`` images, every query image is stored and returned as is. Afterwards each image is,
    with probability 1/2, swapped with a uniformly chosen stored one (the stored image is returned, the new one takes
    its place), otherwise returned unchanged. ``size=0`` disables the pool. Stored images are detached copies.

    Args:
        size: Capacity in images (50 in CycleGAN).

    Raises:
        ValueError: For a negative size.
    """

    def __init__(self, size: int = 50) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return a batch mixing the new images with stored ones and update the pool.

        Args:
            images: (B, C, H, W) generated images (gradients are not kept).
            generator: CPU generator for the coin flips and slot choices; the same seed gives the same sequence.

        Returns:
            (B, C, H, W) detached images for the discriminator update.
        """
        images = images.detach()
        if self.size == 0:
            return images
        out = []
        for image in images:
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=generator).item() < 0.5:
                slot = int(torch.randint(len(self.images), (), generator=generator))
                out.append(self.images[slot].to(image.device, image.dtype))
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, dim=0)
