"""Pixel refiner: the last stage of ``latent-conditional``, at full resolution, conditioned on the input tile.

The latent restorer works on 8x8-pixel cells and its pixels come out of the VAE decoder, whose reconstruction error
caps every latent method (docs/VAE.md). The refiner sees what the latent stage cannot: the corrupted tile at full
resolution. It maps ``[corrupted, coarse, mask]`` (coarse = the latent stage's pasted-back restoration) to

    refined = corrupted + g * (coarse - corrupted) + r

per pixel, with a gate ``g = sigmoid(.)`` in ``[0, 1]`` and a residual ``r``: under a light stain or a blur it can
keep the input's own pixels (``g -> 0``), under marker ink it takes the latent stage's content (``g -> 1``), and
``r`` corrects colour and fine texture either way. The residual head starts at zero and the gate at
``sigmoid(gate_bias)``, so an untrained refiner returns a blend of input and coarse, never noise. It is the idea of
conditioning the decoder on the masked input (Zhu et al. 2023, "Designing a Better Asymmetric VQGAN for
StableDiffusion") as a separate small network that leaves the VAE untouched (docs/METHOD.md section 10).

Network: a timm ``features_only`` encoder (``tf_efficientnet_lite0`` by default) on the 7 input channels, the UNet
decoder of the artifact segmenter, and a full-resolution block that also sees the raw input (fine detail must not
pass only through stride-2 features). Inputs of any size are reflect-padded to the encoder stride and cropped back.

Export folder (``save_refiner`` / ``load_refiner``; a pipeline folder holds one under ``refiner/``)::

    DIR/refiner.json   # format, architecture, training facts
    DIR/weights.pt     # state dict (loaded with weights_only=True)
"""

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.export_folder import WEIGHTS, read_export_meta, write_export_folder
from lightning_modules.components.segmenters import conv_block

FORMAT_VERSION = 1
IN_CHANNELS = 7
"""``[corrupted (3), coarse (3), mask (1)]``."""


@dataclass
class RefinerConfig:
    """Architecture of a refiner (stored in ``refiner.json``).

    Attributes:
        encoder: timm model name (created with ``in_chans=7``, random init).
        out_indices: Encoder stages used (0 = stride 2 ... 4 = stride 32).
        decoder_channels: Output channels of each decoder stage, deepest first (one per stage).
        final_channels: Channels of the full-resolution block.
        gate_bias: Initial gate logit (``sigmoid(2) = 0.88``: start close to the latent stage's output).
        extra: Free-form facts (training steps, loss, data).
    """

    encoder: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    decoder_channels: tuple[int, ...] = (64, 48, 32, 24)
    final_channels: int = 24
    gate_bias: float = 2.0
    extra: dict = field(default_factory=dict)


SIZES = {
    "tiny": RefinerConfig(out_indices=(0, 1), decoder_channels=(8, 8), final_channels=8),
    "cpu": RefinerConfig(),
    "paper": RefinerConfig(out_indices=(0, 1, 2, 3, 4), decoder_channels=(256, 128, 64, 48, 32), final_channels=32),
}


class PixelRefiner(nn.Module):
    """``(corrupted, coarse, mask) -> refined``; all images (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1}.

    Args:
        config: Architecture (see :class:`RefinerConfig`).
    """

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        if len(config.decoder_channels) != len(config.out_indices):
            raise ValueError(f"decoder_channels {config.decoder_channels} needs one entry per stage "
                             f"{config.out_indices}")
        self.config = config
        self.encoder = timm.create_model(config.encoder, features_only=True, out_indices=tuple(config.out_indices),
                                         in_chans=IN_CHANNELS, pretrained=False)
        chans = self.encoder.feature_info.channels()
        self.stride = self.encoder.feature_info.reduction()[-1]
        blocks, cin = [], chans[-1]
        for i in range(len(chans) - 1):
            blocks.append(conv_block(cin + chans[-2 - i], config.decoder_channels[i]))
            cin = config.decoder_channels[i]
        self.decoder = nn.ModuleList(blocks)
        self.final = conv_block(cin + IN_CHANNELS, config.final_channels)
        self.head = nn.Conv2d(config.final_channels, 4, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[3] = config.gate_bias

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Residual (B, 3, H, W) and gate logit (B, 1, H, W) of a 7-channel input whose sides are stride multiples."""
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = self.head(self.final(torch.cat([y, x], dim=1))).float()
        return out[:, :3], out[:, 3:]

    def forward(self, corrupted: Tensor, coarse: Tensor, mask: Tensor) -> Tensor:
        """Refined tile (B, 3, H, W), not clamped; the caller pastes it back inside the mask.

        Raises:
            ValueError: If the shapes disagree.
        """
        if corrupted.shape != coarse.shape or mask.shape[-2:] != corrupted.shape[-2:] or mask.shape[1] != 1:
            raise ValueError(f"refiner inputs disagree: corrupted {tuple(corrupted.shape)}, coarse "
                             f"{tuple(coarse.shape)}, mask {tuple(mask.shape)}")
        h, w = corrupted.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        x = torch.cat([corrupted, coarse, mask.to(corrupted.dtype)], dim=1)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        residual, gate = self.heads(x)
        residual, gate = residual[..., :h, :w], torch.sigmoid(gate[..., :h, :w])
        corrupted, coarse = corrupted.float(), coarse.float()
        return corrupted + gate * (coarse - corrupted) + residual


def build_refiner(size: str = "cpu", gate_bias: float | None = None) -> PixelRefiner:
    """A refiner of a named size: ``"tiny"`` (tests), ``"cpu"`` (2.7 M parameters) or ``"paper"``.

    Args:
        size: Key of :data:`SIZES`.
        gate_bias: Override of the initial gate logit.
    """
    if size not in SIZES:
        raise ValueError(f"refiner size must be one of {sorted(SIZES)}, got {size!r}")
    base = SIZES[size]
    config = RefinerConfig(base.encoder, base.out_indices, base.decoder_channels, base.final_channels,
                           base.gate_bias if gate_bias is None else float(gate_bias), {"size": size})
    return PixelRefiner(config)


def save_refiner(model: PixelRefiner, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``refiner.json`` + ``weights.pt`` into ``path`` (built in a temporary folder, then renamed)."""
    config = asdict(model.config)
    config["extra"] = {**config.get("extra", {}), **(extra or {})}
    return write_export_folder(path, "refiner.json", {"format_version": FORMAT_VERSION, **config}, model)


def load_refiner(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> PixelRefiner:
    """Load a folder written by :func:`save_refiner` (eval mode, no grad); errors name the missing or bad part."""
    path = Path(path)
    meta = read_export_meta(path, "refiner.json", FORMAT_VERSION,
                            f"{path} is not a complete refiner folder (needs refiner.json and weights.pt); re-export "
                            "it (`python -m experiments.export refiner` or `make demo`)")
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a complete refiner folder (no {WEIGHTS}); re-export it "
                                "(`python -m experiments.export refiner` or `make demo`)")
    config = RefinerConfig(meta["encoder"], tuple(meta["out_indices"]), tuple(meta["decoder_channels"]),
                           int(meta["final_channels"]), float(meta["gate_bias"]), meta.get("extra", {}))
    model = PixelRefiner(config)
    try:
        model.load_state_dict(torch.load(path / "weights.pt", map_location="cpu", weights_only=True))
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError or IndexError on damaged files
        raise ValueError(f"{path / 'weights.pt'}: cannot load ({' '.join(str(err).split())[:200]}); re-export "
                         "the refiner") from None
    return model.to(device).eval().requires_grad_(False)
