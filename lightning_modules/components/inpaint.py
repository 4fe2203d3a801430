"""OpenCV inpainting of artifact regions on [-1, 1] tensors: the classical baselines and the refiner's fill input.

``cv2.inpaint`` implements Telea 2004 (fast marching: each pixel of the hole, taken in order of its distance to the
boundary, becomes a weighted average of the known pixels within ``radius``) and Navier-Stokes (Bertalmio et al. 2001).
It runs on the CPU in uint8; tensors on another device make a round trip.
"""

import cv2
import numpy as np
import torch

METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


def opencv_inpaint(images: torch.Tensor, mask: torch.Tensor, method: str = "telea", radius: int = 5) -> torch.Tensor:
    """Fill the masked pixels of each tile from the pixels around them.

    Args:
        images: (B, 3, H, W) in [-1, 1], any device and float dtype.
        mask: (B, 1, H, W), > 0.5 = artifact (the pixels to fill).
        method: ``"telea"`` or ``"ns"``.
        radius: Neighbourhood radius in pixels.

    Returns:
        (B, 3, H, W) float32 in [-1, 1] on ``images``' device; pixels outside the mask are ``images``' own (bit-exact).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    holes = (mask.detach().cpu() > 0.5).squeeze(1).numpy()
    out = []
    for img, hole in zip(imgs.permute(0, 2, 3, 1).numpy(), holes, strict=True):
        filled = (
            cv2.inpaint(np.ascontiguousarray(img), hole.astype(np.uint8) * 255, radius, METHODS[method])
            if hole.any()
            else img
        )
        out.append(filled)
    filled = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    keep = mask.detach().cpu() <= 0.5
    return torch.where(keep, images.detach().cpu().float(), filled).to(images.device)
