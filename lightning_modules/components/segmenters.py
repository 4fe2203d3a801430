"""Artifact segmentation network: a timm ``features_only`` encoder and a light UNet-style decoder.

``ArtifactSegmenter(x)`` maps suite images (B, 3, H, W) in [-1, 1] to artifact logits (B, 1, H, W) (sigmoid > 0.5 =
artifact). The encoder is timm ``tf_efficientnet_lite0`` (the offline ImageNet weights of ENVIRONMENT.md load into it
by position through the full classifier, whose feature layers have the same names as the ``features_only`` model);
the decoder upsamples from the deepest feature map, concatenating each shallower one (UNet skips), with two
3x3 conv-BN-ReLU blocks per stage, and a last upsampling to the input size. H and W must be multiples of the
deepest stride (32 with all five stages, 8 for ``tiny``).

Export folder (``save_segmenter`` / ``load_segmenter``)::

    DIR/segmenter.json   # format, encoder, out_indices, decoder channels, threshold, training facts
    DIR/weights.pt       # state dict (torch.save; loaded with weights_only=True)

:func:`segment_images` runs a loaded segmenter on uint8 RGB images of any size (padding them to its stride); both
``experiments.restore --masks auto`` (per tile) and ``restore_slide --masks auto`` (per slide tile) predict through it.
"""

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.datasets import to_tensor
from lightning_modules.components.classifiers import (
    BUNDLED_EFFICIENTNET_LITE0,
    bundled_efficientnet_lite0_path,
    load_pretrained,
)
from lightning_modules.components.export_folder import read_export_meta, write_export_folder
from lightning_modules.components.stain_norm import InputNormalize

FORMAT_VERSION = 1


def drop_unused_stages(encoder: nn.Module) -> nn.Module:
    """Cut a timm ``features_only`` encoder's blocks after the deepest one an ``out_index`` reads.

    timm keeps (and runs) every block of the network; blocks past the last returned feature cost time and, having no
    gradient, make DDP fail ("parameters that were not used in producing the loss"). Encoders without ``blocks``
    are returned unchanged.
    """
    used = [int(n.split(".")[1]) for n in encoder.feature_info.module_name() if n.startswith("blocks.")]
    blocks = getattr(encoder, "blocks", None)
    if used and isinstance(blocks, nn.Sequential) and len(blocks) > max(used) + 1:
        encoder.blocks = blocks[: max(used) + 1]
    return encoder


def only_kept_stages(state: dict, model: nn.Module) -> dict:
    """A state dict without the encoder blocks :func:`drop_unused_stages` removed (folders written before it)."""
    keep = model.state_dict()
    return {k: v for k, v in state.items() if k in keep or not k.startswith("encoder.blocks.")}


@dataclass
class SegmenterConfig:
    """Architecture and inference settings of a segmenter (stored in ``segmenter.json``).

    Attributes:
        encoder: timm model name.
        out_indices: Encoder stages used (0 = stride 2 ... 4 = stride 32).
        decoder_channels: Output channels of each decoder stage, deepest first (one per stage).
        threshold: Probability above which a pixel is an artifact.
        extra: Free-form facts (training data, tile size, magnification, metrics).
    """

    encoder: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)
    decoder_channels: tuple[int, ...] = (96, 64, 32, 24, 16)
    threshold: float = 0.5
    extra: dict = field(default_factory=dict)


SIZES = {
    "tiny": SegmenterConfig(out_indices=(0, 1, 2), decoder_channels=(16, 12, 8)),
    "cpu": SegmenterConfig(),
    "paper": SegmenterConfig(decoder_channels=(256, 128, 64, 32, 16)),
}


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers (a UNet decoder stage)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ArtifactSegmenter(nn.Module):
    """Encoder + UNet decoder; (B, 3, H, W) in [-1, 1] -> (B, 1, H, W) artifact logits.

    Args:
        config: Architecture (see :class:`SegmenterConfig`).
        pretrained: ``False``, ``"bundled-efficientnet-lite0"`` (offline ImageNet weights) or a local ``.pth``
            state dict of the full timm classifier.
    """

    def __init__(self, config: SegmenterConfig, pretrained: bool | str = False) -> None:
        super().__init__()
        if len(config.decoder_channels) != len(config.out_indices):
            raise ValueError(
                f"decoder_channels {config.decoder_channels} needs one entry per stage {config.out_indices}"
            )
        self.config = config
        self.encoder = drop_unused_stages(
            timm.create_model(config.encoder, features_only=True, out_indices=tuple(config.out_indices))
        )
        if pretrained:
            _load_encoder_weights(self.encoder, config.encoder, pretrained)
        cfg = self.encoder.pretrained_cfg
        self.normalize = InputNormalize(
            tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        )
        chans = self.encoder.feature_info.channels()
        self.stride = self.encoder.feature_info.reduction()[-1]
        dec = list(config.decoder_channels)
        blocks, cin = [], chans[-1]
        for i in range(len(chans) - 1):
            blocks.append(conv_block(cin + chans[-2 - i], dec[i]))
            cin = dec[i]
        self.decoder = nn.ModuleList(blocks)
        self.final = conv_block(cin, dec[-1])
        self.head = nn.Conv2d(dec[-1], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) logits; H, W multiples of ``self.stride``."""
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"segmenter input {tuple(x.shape[-2:])} must be a multiple of {self.stride} px")
        feats = self.encoder(self.normalize(x))
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.final(y))

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) artifact probability in [0, 1] (eval mode, no grad)."""
        return torch.sigmoid(self(x).float())


def _load_encoder_weights(encoder: nn.Module, name: str, pretrained: str) -> None:
    """Load classifier weights into a ``features_only`` encoder via the full timm model (names match)."""
    if pretrained == BUNDLED_EFFICIENTNET_LITE0 and name != "tf_efficientnet_lite0":
        raise ValueError(f"{BUNDLED_EFFICIENTNET_LITE0!r} weights fit tf_efficientnet_lite0, not {name!r}")
    path = bundled_efficientnet_lite0_path() if pretrained == BUNDLED_EFFICIENTNET_LITE0 else Path(pretrained)
    full = timm.create_model(name, pretrained=False)
    load_pretrained(full, path, full.num_classes)
    source = full.state_dict()
    missing = [k for k in encoder.state_dict() if k not in source]
    if missing:
        raise ValueError(f"{path}: the encoder's {missing[:3]} are not in {name}'s weights")
    encoder.load_state_dict({k: source[k] for k in encoder.state_dict()})


def build_segmenter(size: str = "cpu", pretrained: bool | str = False, threshold: float = 0.5) -> ArtifactSegmenter:
    """A segmenter of a named size: ``"tiny"`` (tests: 3 stages, 8-16 decoder channels), ``"cpu"``, ``"paper"``.

    Args:
        size: Key of :data:`SIZES`.
        pretrained: Encoder initialisation: ``False`` or ``"bundled-efficientnet-lite0"`` (offline ImageNet) or a
            local state dict of the full timm classifier.
        threshold: Stored inference threshold.
    """
    if size not in SIZES:
        raise ValueError(f"segmenter size must be one of {sorted(SIZES)}, got {size!r}")
    base = SIZES[size]
    config = SegmenterConfig(base.encoder, base.out_indices, base.decoder_channels, threshold, {"size": size})
    return ArtifactSegmenter(config, pretrained=pretrained)


def save_segmenter(model: ArtifactSegmenter, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``segmenter.json`` + ``weights.pt`` into ``path`` (built in a temporary folder, then renamed)."""
    config = asdict(model.config)
    config["extra"] = {**config.get("extra", {}), **(extra or {})}
    return write_export_folder(path, "segmenter.json", {"format_version": FORMAT_VERSION, **config}, model)


def read_segmenter_meta(path: str | os.PathLike) -> dict:
    """``segmenter.json`` of an export folder (no weights are read); errors name the missing part."""
    return read_export_meta(
        path,
        "segmenter.json",
        FORMAT_VERSION,
        f"{path} is not an artifact segmenter (no segmenter.json); train and export one (docs/SLIDES.md)",
    )


def load_segmenter(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ArtifactSegmenter:
    """Load a folder written by :func:`save_segmenter` (eval mode); errors name the missing part."""
    path = Path(path)
    meta = read_segmenter_meta(path)
    config = SegmenterConfig(
        meta["encoder"],
        tuple(meta["out_indices"]),
        tuple(meta["decoder_channels"]),
        float(meta["threshold"]),
        meta.get("extra", {}),
    )
    model = ArtifactSegmenter(config)
    model.load_state_dict(
        only_kept_stages(torch.load(path / "weights.pt", map_location="cpu", weights_only=True), model)
    )
    return model.to(device).eval()


def _pad_to(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an (h, w, 3) image at the bottom and right to (height, width): reflect, or edge for 1 px sides."""
    h, w = rgb.shape[:2]
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(rgb, ((0, height - h), (0, width - w), (0, 0)), mode=mode)


def segment_images(
    net: ArtifactSegmenter, images: Sequence[np.ndarray], *, size: tuple[int, int] | None = None, batch_size: int = 8
) -> list[np.ndarray]:
    """Artifact probability of every pixel of uint8 RGB images, with a loaded segmenter (any image size).

    Each image is padded at its bottom and right (reflect; edge for 1 px sides) to ``size`` or, without it, to the
    next multiple of the segmenter's stride; images of one padded size go through the network together, at most
    ``batch_size`` at a time, and every probability map is cropped back to its image.

    Args:
        net: An :class:`ArtifactSegmenter` in eval mode (``load_segmenter``); inputs go to its parameters' device.
        images: uint8 (H, W, 3) RGB arrays.
        size: ``(height, width)`` to pad every image to (multiples of ``net.stride``, at least each image's size).
        batch_size: Images per forward pass.

    Returns:
        One float32 (H, W) array in [0, 1] per image, in order (``> net.config.threshold`` = artifact).
    """
    device = next(net.parameters()).device
    groups: dict[tuple[int, int], list[int]] = {}
    for i, rgb in enumerate(images):
        h, w = rgb.shape[:2]
        padded = size or (-(-h // net.stride) * net.stride, -(-w // net.stride) * net.stride)
        if padded[0] < h or padded[1] < w:
            raise ValueError(f"image {i} is {w}x{h} px (WxH), larger than the size {padded[1]}x{padded[0]} to pad to")
        groups.setdefault(tuple(padded), []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    for (ph, pw), idx in groups.items():
        for b in range(0, len(idx), batch_size):
            chunk = idx[b : b + batch_size]
            batch = torch.stack([to_tensor(_pad_to(images[i], ph, pw)) for i in chunk]).to(device)
            probs = net.predict_proba(batch)[:, 0].cpu().numpy()
            for i, p in zip(chunk, probs, strict=True):
                h, w = images[i].shape[:2]
                out[i] = p[:h, :w]
    return out
