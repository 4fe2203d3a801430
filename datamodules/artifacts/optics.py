"""Beer-Lambert optical-density maths shared by the absorbing artifacts (fold, ink, thread, debris, stain).

Bright-field microscopy obeys the Beer-Lambert law: the transmitted intensity of a stained layer is
``I = I0 * exp(-OD)`` per channel, and the optical densities (absorbances) of stacked layers add. Artifacts that put
extra absorbing material in the light path (a folded second tissue layer, pen ink, a thread, dust) are therefore
rendered as ``OD_out = OD_tissue + OD_artifact``, and stain-intensity changes as a scaling of the stain
concentrations obtained by colour deconvolution (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001).

We use ``OD = -ln((I + 1) / 256)`` for ``I`` in 0..255, so black (0) maps to a finite OD of ln(256) ~ 5.55 and the
inverse ``I = 256 * exp(-OD) - 1`` returns exactly the input when nothing is added.
"""

import numpy as np

_LEVELS = np.arange(256, dtype=np.float32)
OD_LUT = (-np.log((_LEVELS + 1.0) / 256.0)).astype(np.float32)
"""float32 (256,): optical density of each 8-bit intensity level (0 for white, ~5.55 for black)."""

# Ruifrok & Johnston haematoxylin and eosin OD vectors, as published, normalised to unit length. For a two-stain
# image Ruifrok & Johnston complete the basis with a third, "residual" vector orthogonal to both (their DAB vector
# would turn the residual of every H&E pixel into a brown tint when H and E are scaled).
_H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
_RESIDUAL = np.cross(_H, _E) / np.linalg.norm(np.cross(_H, _E))
STAIN_MATRIX = np.stack([_H, _E, _RESIDUAL]).astype(np.float32)
"""float32 (3, 3): unit stain OD vectors, rows H, E, residual: ``OD (N,3) = C (N,3) @ STAIN_MATRIX``."""
UNMIX_MATRIX = np.linalg.inv(STAIN_MATRIX.astype(np.float64)).astype(np.float32)
"""float32 (3, 3): colour deconvolution: ``C = OD @ UNMIX_MATRIX``."""


def rgb_to_od(image: np.ndarray) -> np.ndarray:
    """Optical density of an 8-bit RGB image.

    Args:
        image: uint8 array of any shape (usually (H, W, 3)), 0..255.

    Returns:
        float32 array of the same shape, OD >= 0 (0 = white).
    """
    return OD_LUT[image]


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, unrounded and unclipped.

    Args:
        od: float32 optical densities of any shape.

    Returns:
        float32 intensities of the same shape; callers round and clip to 0..255.
    """
    return 256.0 * np.exp(-od) - 1.0


def color_od(rgb: tuple[float, float, float]) -> np.ndarray:
    """OD vector of a colour as it appears at full strength on a white background.

    Args:
        rgb: three intensities in 0..255.

    Returns:
        float32 (3,) optical densities.
    """
    return (-np.log((np.asarray(rgb, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
