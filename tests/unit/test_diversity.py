"""Kornia image diversity: zero for identical images, growing with the spread of colours and shapes."""
import math

import pytest
import torch

from distill_core.reference.diversity import (
    ORIENTATION_BINS,
    image_descriptors,
    image_diversity,
    mean_pairwise_distance,
)


def coloured_squares(colours: torch.Tensor, size: int = 32, half_width: int = 8) -> torch.Tensor:
    """One image per colour: that colour in a centred square on mid grey, ``(n, size, size, 3)``."""
    images = torch.full((colours.shape[0], size, size, 3), 0.5)
    low, high = size // 2 - half_width, size // 2 + half_width
    images[:, low:high, low:high] = colours[:, None, None, :]
    return images


def rotated_bars(angles_degrees: list[float], size: int = 48) -> torch.Tensor:
    """A white bar through the centre at each angle on black."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for angle in angles_degrees:
        theta = math.radians(angle)
        distance = (x * math.sin(theta) - y * math.cos(theta)).abs()
        images.append((distance < 3).float().unsqueeze(-1).expand(size, size, 3))
    return torch.stack(images)


def test_identical_images_have_zero_diversity():
    images = coloured_squares(torch.tensor([[0.9, 0.2, 0.1]])).expand(6, -1, -1, -1)
    result = image_diversity(images)
    assert (result.overall, result.colour, result.edges) == (0.0, 0.0, 0.0)


def test_diversity_grows_with_colour_spread():
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(16, 3, generator=generator)
    values = []
    for spread in (0.02, 0.1, 0.3):
        colours = (0.5 + spread * directions).clamp(0, 1)
        values.append(image_diversity(coloured_squares(colours)).colour)
    assert values[0] < values[1] < values[2]


def test_diversity_grows_with_the_spread_of_edge_orientations():
    values = [image_diversity(rotated_bars([spread * i / 7 for i in range(8)])).edges for spread in (0, 20, 45, 90)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert values[0] < values[1] < values[2] < values[3]


def test_descriptors_of_a_flat_image_and_of_a_bar():
    flat = torch.full((1, 16, 16, 3), 0.5)
    colour, edges = image_descriptors(flat)
    assert colour.shape == (1, 6) and edges.shape == (1, ORIENTATION_BINS + 1)
    assert torch.all(edges == 0) and torch.allclose(colour[0, 3:], torch.zeros(3, dtype=torch.float64), atol=1e-6)
    _, bar_edges = image_descriptors(rotated_bars([0.0]))
    assert bar_edges[0, :ORIENTATION_BINS].sum() == pytest.approx(1.0)
    assert bar_edges[0, :ORIENTATION_BINS].argmax() in (ORIENTATION_BINS // 2 - 1, ORIENTATION_BINS // 2), \
        "a horizontal bar has vertical gradients (orientation 90 degrees)"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        image_diversity(torch.zeros(2, 3, 8, 8))


def test_non_finite_images_are_refused():
    images = torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    images[1, 4, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="the images contain NaN or inf"):
        image_diversity(images)
