"""Non-learned restorers: identity (the corrupted input itself) and OpenCV inpainting.

OpenCV's inpainting implements Telea 2004 and Navier-Stokes (Bertalmio et al. 2001). These restorers set the floor any
learned method has to beat and need no training or weights. The factories below are named in the method table
(``lightning_modules/methods.py``).
"""

import torch

from lightning_modules.components.inpaint import METHODS, opencv_inpaint
from lightning_modules.components.restorer import check_batch


class IdentityRestorer:
    """Returns the corrupted tile unchanged: the 'do nothing' reference row of every comparison."""

    name = "identity"
    nfe = 0
    takes_sampler = False

    def restore(self, corrupted, artifact_mask, *, generator=None) -> torch.Tensor:
        """(B, 3, H, W) [-1, 1] -> the same tensor (a copy)."""
        check_batch(corrupted, artifact_mask)
        return corrupted.clone()


class OpenCVInpaintRestorer:
    """OpenCV inpainting of the artifact region on 8-bit images; pixels outside the mask are returned unchanged.

    Args:
        method: ``"telea"`` (fast marching, Telea 2004) or ``"ns"`` (Navier-Stokes, Bertalmio et al. 2001).
        radius: Neighbourhood radius in pixels.
    """

    nfe = 0
    takes_sampler = False

    def __init__(self, method: str = "telea", radius: int = 5) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        self.name, self.radius = method, radius

    def restore(self, corrupted, artifact_mask, *, generator=None) -> torch.Tensor:
        """Inpaint each tile; (B, 3, H, W) [-1, 1] -> (B, 3, H, W) [-1, 1], exact outside the mask."""
        check_batch(corrupted, artifact_mask)
        return opencv_inpaint(corrupted, artifact_mask, self.name, self.radius)


def _identity(**_) -> IdentityRestorer:
    return IdentityRestorer()


def _telea(**_) -> OpenCVInpaintRestorer:
    return OpenCVInpaintRestorer("telea")


def _ns(**_) -> OpenCVInpaintRestorer:
    return OpenCVInpaintRestorer("ns")
