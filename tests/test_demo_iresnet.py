"""``kexue_fast.demos.iresnet`` (``kexue-fast demo iresnet``): its data sets, its Gaussian baseline,
the flow beating that baseline, reproducible from its seed; short runs only."""

import math

import pytest
import torch

from kexue_fast.demos import iresnet

# Small sets and plots for the runs that check bookkeeping, not quality.
TINY = {"n_train": 512, "n_test": 256, "n_samples": 64, "grid": 8, "batch": 128}


def short_run(seed=0, steps=4, **settings):
    return iresnet.run(steps=steps, seed=seed, out=None, quick=True, progress=False, **{**TINY, **settings})


def test_quick_flow_beats_the_fitted_gaussian_and_inverts():
    # --quick, shortened: half the blocks, half the steps (~9 s; the full --quick gets ~1.0 against 1.88).
    result = iresnet.run(steps=400, data="moons", out=None, quick=True, progress=False, n_blocks=8)
    assert result["nll"] < result["gaussian_nll"] - 0.2, result  # nats per point, on held-out data
    assert result["reconstruction"]["max"] < 1e-4 and result["iterations"]["max"] < 100  # every inverse converged


def test_same_seed_same_result_other_seed_different():
    first, again, other = short_run(0), short_run(0), short_run(1)
    assert first["checksum"] == again["checksum"]
    assert (first["nll"], first["reconstruction"], first["iterations"]) == (
        again["nll"],
        again["reconstruction"],
        again["iterations"],
    )
    assert other["checksum"] != first["checksum"] and other["nll"] != first["nll"]


def test_leaves_the_global_generator_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    short_run(steps=1)
    assert torch.equal(torch.rand(3), expected)


def data(name, n=4000, seed=0):
    return iresnet.sample_data(name, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", iresnet.DATA_SETS)
def test_data_sets_are_reproducible_from_the_generator_and_inside_their_bounds(name):
    points = data(name)
    assert points.shape == (4000, 2) and points.dtype == torch.float32
    assert torch.equal(points, data(name)) and not torch.equal(points, data(name, seed=1))
    low, high = iresnet.BOUNDS[name]
    assert low < points.min() and points.max() < high


def test_moons_lie_near_two_half_circles_half_each():
    points = data("moons").double()
    angle = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    upper = torch.stack([angle.cos() - 0.5, angle.sin() - 0.25], 1)  # unit circle at (-0.5, -0.25), top half
    lower = torch.stack([0.5 - angle.cos(), 0.25 - angle.sin()], 1)  # unit circle at (0.5, 0.25), bottom half
    to_upper, to_lower = torch.cdist(points, upper).amin(1), torch.cdist(points, lower).amin(1)
    assert torch.minimum(to_upper, to_lower).max() < 5 * iresnet.MOONS_NOISE
    assert abs((to_upper < to_lower).double().mean().item() - 0.5) < 0.03


def test_checkerboard_fills_the_dark_squares_evenly():
    points = data("checkerboard")
    cells = (points.floor() + 2).long()  # (column, row), 0..3
    assert (cells.sum(1) % 2 == 0).all()
    counts = torch.bincount(cells[:, 1] * 4 + cells[:, 0], minlength=16)
    dark = [4 * row + column for row in range(4) for column in range(4) if (row + column) % 2 == 0]
    assert counts.sum() == counts[dark].sum() and ((counts[dark] - 500).abs() < 90).all()  # 500 ± 4σ


def test_rings_have_their_radii_and_points_in_proportion_to_length():
    radius = data("rings").double().norm(dim=1)
    nearest = (radius[:, None] - torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).abs()
    assert nearest.amin(1).max() < 5 * iresnet.RINGS_NOISE
    shares = torch.bincount(nearest.argmin(1), minlength=3).double() / len(radius)
    assert torch.allclose(shares, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64), atol=0.03)


def test_gaussian_nll_of_gaussian_data_is_its_entropy():
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    points = torch.distributions.MultivariateNormal(torch.tensor([1.0, -3.0], dtype=torch.float64), cov).sample(
        (400000,)
    )
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov).item()
    assert iresnet.gaussian_nll(points[::2], points[1::2]) == pytest.approx(entropy, abs=0.01)


def test_summary_numbers():
    result = short_run(data="rings")
    assert result["steps"] == 4 and result["seconds"] > 0 and result["data"] == "rings"
    assert math.isfinite(result["nll"]) and math.isfinite(result["train_nll"])
    assert 0 <= result["reconstruction"]["median"] <= result["reconstruction"]["max"]
    assert 1 <= result["iterations"]["mean"] <= result["iterations"]["max"]
    text = iresnet.summary(result)
    assert result["checksum"] in text and "fitted Gaussian" in text and "data rings" in text and "wrote" not in text


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="data must be one of moons, checkerboard, rings"):
        iresnet.run(steps=1, data="spiral", out=None, progress=False)
    with pytest.raises(ValueError, match="steps"):
        iresnet.run(steps=0, out=None, progress=False)
    with pytest.raises(ValueError, match="seed"):
        iresnet.run(steps=1, seed=-1, out=None, progress=False)
    with pytest.raises(TypeError, match="unknown settings"):
        iresnet.run(steps=1, out=None, progress=False, no_such_setting=1)


def test_figure_has_axis_labels_legends_and_a_labelled_colour_bar(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: saved.append(fig))
    iresnet.run(steps=2, out=str(tmp_path / "iresnet.png"), quick=True, progress=False, **TINY)
    (fig,) = saved
    panels, (colour_bar,) = fig.axes[:6], fig.axes[6:]
    assert "density" in colour_bar.get_ylabel()
    for ax in panels:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        if "density" not in ax.get_title():  # the density panel's key is its colour bar
            assert ax.get_legend() is not None and ax.get_legend().get_texts(), ax.get_title()
