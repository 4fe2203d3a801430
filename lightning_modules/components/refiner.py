"""Pixel refiner: the last stage of ``latent-conditional``, at full resolution, conditioned on the input tile.

The latent restorer works on 8x8-pixel cells and its pixels come out of the VAE decoder, whose reconstruction error
caps every latent method (docs/VAE.md). The refiner sees what the latent stage cannot: the corrupted tile at full
resolution. It takes a few *candidate* restorations of the masked region and blends them per pixel,

    refined = sum_i w_i * candidate_i + r,    w = softmax(logits) over the candidates,

with a residual ``r`` for colour and fine texture. The default candidates are the corrupted input itself (right
under a light stain or a blur), ``coarse`` (the latent stage's pasted-back restoration: tissue structure under
marker ink, folds, debris) and ``telea`` (OpenCV's Telea fill, computed here from the input and the mask: the smooth
continuation of the surrounding colour, which is what the pixel-wise best guess looks like deep inside a large
opaque mark, where no model can know the texture). The residual head starts at zero and the logits at
``gate_bias`` for ``coarse`` and 0 for the others, so an untrained refiner returns a blend of its candidates, never
noise. Conditioning a decoding step on the masked input follows Zhu et al. 2023 ("Designing a Better Asymmetric
VQGAN for StableDiffusion"), here as a separate small network that leaves the VAE untouched; why the Telea candidate
is there and what each candidate is worth is measured in docs/METHOD.md section 10.

Network: a timm ``features_only`` encoder (``tf_efficientnet_lite0`` by default) on the candidates and the mask
(``3 * len(candidates) + 1`` channels), the UNet decoder of the artifact segmenter, and a full-resolution block that
also sees the raw input (fine detail must not pass only through stride-2 features). Inputs of any size are
reflect-padded to the encoder stride and cropped back.

Export folder (``save_refiner`` / ``load_refiner``; a pipeline folder holds one under ``refiner/``)::

    DIR/refiner.json   # format, architecture, training facts
    DIR/weights.pt     # state dict (loaded with weights_only=True)

Format 1 folders (a sigmoid gate between the input and ``coarse``, before the Telea candidate) still load: that gate
is the two-candidate softmax with the input's logit fixed at 0.
"""

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.export_folder import WEIGHTS, read_export_meta, write_export_folder
from lightning_modules.components.inpaint import opencv_inpaint
from lightning_modules.components.segmenters import conv_block, drop_unused_stages, only_kept_stages

FORMAT_VERSION = 2
CANDIDATES = ("corrupted", "coarse", "telea", "ns", "unsharp")
"""Candidate restorations a refiner can blend: the input, the latent stage's output, OpenCV Telea / Navier-Stokes, and
the input sharpened by an unsharp mask (a classical partial inverse of a Gaussian defocus)."""

UNSHARP_SIGMA, UNSHARP_AMOUNT = 2.0, 1.0


def unsharp(image: Tensor, sigma: float = UNSHARP_SIGMA, amount: float = UNSHARP_AMOUNT) -> Tensor:
    """``image + amount * (image - G_sigma * image)``, clamped to [-1, 1]; image (B, 3, H, W), reflect-padded.

    The unsharp mask restores part of the high frequencies a Gaussian blur of similar width removed (out-of-focus
    tissue); where the input is sharp the refiner learns not to pick it.
    """
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(image.dtype)
    c = image.shape[1]
    padded = F.pad(
        image, (radius, radius, radius, radius), mode="reflect" if min(image.shape[-2:]) > radius else "replicate"
    )
    blurred = F.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    blurred = F.conv2d(blurred, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return (image + amount * (image - blurred)).clamp(-1, 1)


@dataclass
class RefinerConfig:
    """Architecture of a refiner (stored in ``refiner.json``).

    Attributes:
        encoder: timm model name (created with ``in_chans = 3 * len(candidates) + 1``, random init).
        out_indices: Encoder stages used (0 = stride 2 ... 4 = stride 32).
        decoder_channels: Output channels of each decoder stage, deepest first (one per stage).
        final_channels: Channels of the full-resolution block.
        gate_bias: Initial logit of the ``coarse`` candidate (the others start at 0; 0 = an even blend).
        candidates: Names from :data:`CANDIDATES`, in input order.
        extra: Free-form facts (training steps, loss, data).
        input_bias: Initial logit of the ``corrupted`` candidate (0 = an even blend; > 0 starts the refiner close to
            the input, docs/METHOD.md section 10).
    """

    encoder: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    decoder_channels: tuple[int, ...] = (64, 48, 32, 24)
    final_channels: int = 24
    gate_bias: float = 0.0
    candidates: tuple[str, ...] = ("corrupted", "coarse", "telea")
    extra: dict = field(default_factory=dict)
    input_bias: float = 0.0

    @classmethod
    def from_dict(cls, c: dict) -> "RefinerConfig":
        """The config stored in ``refiner.json`` or a checkpoint's ``net_config`` (format 1: no ``candidates``)."""
        return cls(
            c["encoder"],
            tuple(c["out_indices"]),
            tuple(c["decoder_channels"]),
            int(c["final_channels"]),
            float(c["gate_bias"]),
            tuple(c.get("candidates", ("corrupted", "coarse"))),
            c.get("extra", {}),
            float(c.get("input_bias", 0.0)),
        )

    @property
    def in_channels(self) -> int:
        """Encoder input channels: 3 per candidate + the mask."""
        return 3 * len(self.candidates) + 1


SIZES = {
    "tiny": RefinerConfig(out_indices=(0, 1), decoder_channels=(8, 8), final_channels=8),
    "cpu": RefinerConfig(),
    "paper": RefinerConfig(out_indices=(0, 1, 2, 3, 4), decoder_channels=(256, 128, 64, 48, 32), final_channels=32),
}


class PixelRefiner(nn.Module):
    """``(corrupted, coarse, mask) -> refined``; all images (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1}.

    Args:
        config: Architecture (see :class:`RefinerConfig`).

    Raises:
        ValueError: If the decoder does not match the stages or the candidates are empty, repeated or unknown.
    """

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        if len(config.decoder_channels) != len(config.out_indices):
            raise ValueError(
                f"decoder_channels {config.decoder_channels} needs one entry per stage {config.out_indices}"
            )
        config.candidates = tuple(config.candidates)
        bad = [c for c in config.candidates if c not in CANDIDATES]
        if not config.candidates or bad or len(set(config.candidates)) != len(config.candidates):
            raise ValueError(
                f"refiner candidates must be distinct names from {list(CANDIDATES)}, got {list(config.candidates)}"
            )
        self.config = config
        in_channels = config.in_channels
        self.encoder = drop_unused_stages(
            timm.create_model(
                config.encoder,
                features_only=True,
                pretrained=False,
                out_indices=tuple(config.out_indices),
                in_chans=in_channels,
            )
        )
        chans = self.encoder.feature_info.channels()
        self.stride = self.encoder.feature_info.reduction()[-1]
        blocks, cin = [], chans[-1]
        for i in range(len(chans) - 1):
            blocks.append(conv_block(cin + chans[-2 - i], config.decoder_channels[i]))
            cin = config.decoder_channels[i]
        self.decoder = nn.ModuleList(blocks)
        self.final = conv_block(cin + in_channels, config.final_channels)
        self.head = nn.Conv2d(config.final_channels, 3 + len(config.candidates), 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            for name, bias in (("coarse", config.gate_bias), ("corrupted", config.input_bias)):
                if name in config.candidates:
                    self.head.bias[3 + config.candidates.index(name)] = bias

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Residual (B, 3, H, W) and candidate logits (B, C, H, W) of an input whose sides are stride multiples."""
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = self.head(self.final(torch.cat([y, x], dim=1))).float()
        return out[:, :3], out[:, 3:]

    def candidates(self, corrupted: Tensor, coarse: Tensor, mask: Tensor) -> list[Tensor]:
        """The configured candidate restorations, each (B, 3, H, W) in [-1, 1] (OpenCV fills run on the CPU)."""
        out = []
        for name in self.config.candidates:
            if name == "corrupted":
                out.append(corrupted)
            elif name == "coarse":
                out.append(coarse)
            elif name == "unsharp":
                out.append(unsharp(corrupted))
            else:
                out.append(opencv_inpaint(corrupted, mask, name).to(corrupted.dtype))
        return out

    def forward(self, corrupted: Tensor, coarse: Tensor, mask: Tensor) -> Tensor:
        """Refined tile (B, 3, H, W), not clamped; the caller pastes it back inside the mask.

        Raises:
            ValueError: If the shapes disagree.
        """
        return self.parts(corrupted, coarse, mask)[0]

    def parts(self, corrupted: Tensor, coarse: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The refined tile, the candidate logits (B, n, H, W) and the n candidates (each (B, 3, H, W)).

        The parts let a loss supervise the choice of candidate (``RefinerModule``'s ``gate_weight``).

        Raises:
            ValueError: If the shapes disagree.
        """
        if corrupted.shape != coarse.shape or mask.shape[-2:] != corrupted.shape[-2:] or mask.shape[1] != 1:
            raise ValueError(
                f"refiner inputs disagree: corrupted {tuple(corrupted.shape)}, coarse "
                f"{tuple(coarse.shape)}, mask {tuple(mask.shape)}"
            )
        h, w = corrupted.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        candidates = self.candidates(corrupted, coarse, mask)
        x = torch.cat([*candidates, mask.to(corrupted.dtype)], dim=1)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        residual, logits = self.heads(x)
        logits = logits[..., :h, :w]
        weights = torch.softmax(logits, dim=1)
        blend = sum(weights[:, i : i + 1] * c.float() for i, c in enumerate(candidates))
        return blend + residual[..., :h, :w], logits, candidates


def build_refiner(
    size: str = "cpu",
    gate_bias: float | None = None,
    candidates: tuple[str, ...] | list[str] | None = None,
    input_bias: float | None = None,
) -> PixelRefiner:
    """A refiner of a named size: ``"tiny"`` (tests), ``"cpu"`` (2.7 M parameters) or ``"paper"``.

    Args:
        size: Key of :data:`SIZES`.
        gate_bias: Override of the initial logit of ``coarse``.
        candidates: Override of the blended candidates (e.g. ``["corrupted", "telea"]``: a refiner that ignores the
            latent stage, the ablation row of docs/METHOD.md section 10).
        input_bias: Override of the initial logit of ``corrupted``.
    """
    if size not in SIZES:
        raise ValueError(f"refiner size must be one of {sorted(SIZES)}, got {size!r}")
    base = SIZES[size]
    config = RefinerConfig(
        base.encoder,
        base.out_indices,
        base.decoder_channels,
        base.final_channels,
        base.gate_bias if gate_bias is None else float(gate_bias),
        base.candidates if candidates is None else tuple(candidates),
        {"size": size},
        base.input_bias if input_bias is None else float(input_bias),
    )
    return PixelRefiner(config)


def save_refiner(model: PixelRefiner, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``refiner.json`` + ``weights.pt`` into ``path`` (built in a temporary folder, then renamed)."""
    config = asdict(model.config)
    config["extra"] = {**config.get("extra", {}), **(extra or {})}
    return write_export_folder(path, "refiner.json", {"format_version": FORMAT_VERSION, **config}, model)


def load_refiner(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> PixelRefiner:
    """Load a folder written by :func:`save_refiner` (eval mode, no grad); errors name the missing or bad part."""
    path = Path(path)
    meta = read_export_meta(
        path,
        "refiner.json",
        (1, FORMAT_VERSION),
        f"{path} is not a complete refiner folder (needs refiner.json and weights.pt); re-export "
        "it (`python -m experiments.export refiner` or `make demo`)",
    )
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete refiner folder (no {WEIGHTS}); re-export it "
            "(`python -m experiments.export refiner` or `make demo`)"
        )
    legacy = int(meta["format_version"]) == 1
    model = PixelRefiner(RefinerConfig.from_dict(meta))
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        if legacy:
            state = _from_format_1(state)
        model.load_state_dict(only_kept_stages(state, model))
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError or IndexError on damaged files
        raise ValueError(
            f"{path / 'weights.pt'}: cannot load ({' '.join(str(err).split())[:200]}); re-export the refiner"
        ) from None
    return model.to(device).eval().requires_grad_(False)


def _from_format_1(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Format 1 head ``[residual (3), gate]`` with ``sigmoid(gate)`` on coarse -> logits ``[0, gate]``."""
    state = dict(state)
    weight, bias = state["head.weight"], state["head.bias"]
    state["head.weight"] = torch.cat([weight[:3], torch.zeros_like(weight[3:4]), weight[3:4]])
    state["head.bias"] = torch.cat([bias[:3], torch.zeros_like(bias[3:4]), bias[3:4]])
    return state
