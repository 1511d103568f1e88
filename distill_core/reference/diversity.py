"""Image diversity of a batch of decoded samples (kornia), for models whose modes are unknown.

Each image gets a small descriptor of two parts, and the diversity of a batch is the mean distance
between the descriptors of all pairs of distinct images (0 for a batch of identical images):

* **colour**: mean and standard deviation of the CIE Lab channels (``kornia.color.rgb_to_lab``),
  divided by 100 (L spans 0-100, a and b about -100-100), 6 numbers;
* **edges**: a Sobel edge-orientation histogram (``kornia.filters.spatial_gradient`` on the grey
  image; orientation modulo 180 degrees in :data:`ORIENTATION_BINS` bins, each pixel weighted by its
  gradient magnitude, normalised to sum 1; all zeros for a flat image) plus the mean gradient
  magnitude (edge density), 9 numbers.

The distance is Euclidean on the concatenated descriptor; :func:`image_diversity` also reports
the diversity of each part alone. The numbers compare batches of the same size and image type
(e.g. a base model, its distilled version and a hybrid run on the same prompts); they are not a
perceptual metric. For the reference mixture, exact mode recall and entropy are in :mod:`.metrics`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import kornia
import torch
from torch import Tensor

from ..spaces import require_finite

ORIENTATION_BINS = 8
LAB_SCALE = 100.0


class Descriptors(NamedTuple):
    """Per-image descriptors: ``colour`` ``(n, 6)`` and ``edges`` ``(n, ORIENTATION_BINS + 1)``, float64."""

    colour: Tensor
    edges: Tensor


class Diversity(NamedTuple):
    """Mean pairwise descriptor distances: all parts together, colour alone, edges alone."""

    overall: float
    colour: float
    edges: float


def _channels_first(images: Tensor) -> Tensor:
    """ComfyUI IMAGE ``(n, H, W, 3)`` in [0, 1] -> ``(n, 3, H, W)`` float32, checked."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (n, H, W, 3), got {tuple(images.shape)}")
    return images.movedim(-1, 1).float().clamp(0, 1)


def image_descriptors(images: Tensor) -> Descriptors:
    """The colour and edge descriptors of each image of ``images`` ``(n, H, W, 3)`` in [0, 1]."""
    rgb = _channels_first(images)
    lab = kornia.color.rgb_to_lab(rgb).flatten(2).to(torch.float64) / LAB_SCALE
    colour = torch.cat([lab.mean(dim=2), lab.std(dim=2, correction=0)], dim=1)

    gradients = kornia.filters.spatial_gradient(kornia.color.rgb_to_grayscale(rgb), mode="sobel")[:, 0]
    dx, dy = gradients[:, 0].to(torch.float64), gradients[:, 1].to(torch.float64)
    magnitude = (dx**2 + dy**2).sqrt().flatten(1)
    orientation = torch.remainder(torch.atan2(dy, dx), math.pi).flatten(1)
    bins = (orientation / math.pi * ORIENTATION_BINS).long().clamp(max=ORIENTATION_BINS - 1)
    histogram = torch.zeros(rgb.shape[0], ORIENTATION_BINS, dtype=torch.float64).scatter_add_(1, bins, magnitude)
    total = histogram.sum(dim=1, keepdim=True)
    histogram = torch.where(total > 0, histogram / total.clamp(min=1e-12), torch.zeros_like(histogram))
    edges = torch.cat([histogram, magnitude.mean(dim=1, keepdim=True)], dim=1)
    return Descriptors(colour, edges)


def mean_pairwise_distance(descriptors: Tensor) -> float:
    """Mean Euclidean distance over all pairs ``i < j`` of rows of ``descriptors`` ``(n, d)``, n >= 2."""
    n = descriptors.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    distances = (descriptors.unsqueeze(0) - descriptors.unsqueeze(1)).norm(dim=2)
    upper = torch.triu_indices(n, n, offset=1)
    return float(distances[upper[0], upper[1]].mean())


def image_diversity(images: Tensor) -> Diversity:
    """Diversity of a batch of images ``(n, H, W, 3)`` in [0, 1], n >= 2 (see the module docstring); NaN/inf
    pixels are refused (``ValueError``)."""
    require_finite(images, "the images")
    descriptors = image_descriptors(images)
    return Diversity(
        mean_pairwise_distance(torch.cat([descriptors.colour, descriptors.edges], dim=1)),
        mean_pairwise_distance(descriptors.colour),
        mean_pairwise_distance(descriptors.edges),
    )
