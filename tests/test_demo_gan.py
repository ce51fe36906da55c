"""``kexue_fast.demos.gan`` (``kexue-fast demo gan``): the MMD estimator on hand-checkable cases, the
variants' modules, the bookkeeping of short runs, reproducible from the seed; short runs only."""

import math
import sys

import pytest
import torch

from kexue_fast import cli
from kexue_fast.demos import gan
from kexue_fast.gan import CascadingRejectionHead, SelfModulatedBatchNorm2d
from kexue_fast.nn import SpectralNorm

# Small sets for the runs that check bookkeeping, not quality.
TINY = {"n_heldout": 64, "classifier_steps": 20, "eval_every": 2}


def short_run(seed=0, steps=4, seeds=1, **settings):
    return gan.run(steps=steps, seed=seed, out=None, progress=False, seeds=seeds, **{**TINY, **settings})


def test_mmd2_of_two_point_sets_by_hand():
    x, y = torch.zeros(2, 1), torch.ones(2, 1)  # within each set k = 1; across, exp(−1/(2σ²))
    assert gan.mmd2(x, y, 1.0) == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-12)
    assert gan.mmd2(x, y, 2.0) == pytest.approx(2 - 2 * math.exp(-1 / 8), rel=1e-12)
    assert gan.mmd2(x, x, 1.0) == 0.0  # every kernel value 1


def test_mmd2_of_a_set_with_itself_is_just_below_zero():
    # Kxy is Kxx with its diagonal of ones: MMD²ᵤ(X, X) = 2(ā − 1)/n, ā the off-diagonal mean, in [−2/n, 0].
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    value = gan.mmd2(x, x, gan.median_distance(x))
    assert -2 / 300 < value < 0


def test_mmd2_of_shifted_gaussians_matches_the_closed_form():
    # x ~ N(0, I), y ~ N(μ, I) in k dims, kernel bandwidth σ: E k(a, b) over a − b ~ N(m, 2I) is
    # (σ²/(σ² + 2))^{k/2} exp(−‖m‖²/(2(σ² + 2))), so MMD² = 2 (σ²/(σ² + 2))^{k/2} (1 − exp(−‖μ‖²/(2(σ² + 2)))).
    rng = torch.Generator().manual_seed(0)
    k, sigma, shift = 2, 1.0, torch.tensor([1.0, 0.0])
    x, y = torch.randn(3000, k, generator=rng), torch.randn(3000, k, generator=rng) + shift
    exact = 2 * (sigma**2 / (sigma**2 + 2)) ** (k / 2) * (1 - math.exp(-1 / (2 * (sigma**2 + 2))))  # 0.1023
    assert gan.mmd2(x, y, sigma) == pytest.approx(exact, abs=0.01)
    same = gan.mmd2(x, torch.randn(3000, k, generator=rng), sigma)
    assert abs(same) < 0.005


def test_median_distance_by_hand():
    assert gan.median_distance(torch.tensor([[0.0], [1.0], [3.0]])) == 2.0  # distances 1, 3, 2


def test_variants_build_their_own_modules_and_spectral_norm_on_every_layer_of_d():
    for variant, (self_mod, cascading, _) in gan.VARIANTS.items():
        G, D = gan.build(gan.DEFAULT, variant)
        norms = [m for m in G.modules() if isinstance(m, (SelfModulatedBatchNorm2d, torch.nn.BatchNorm2d))]
        assert len(norms) == 3 and all(isinstance(m, SelfModulatedBatchNorm2d) == self_mod for m in norms)
        heads = [m for m in D.modules() if isinstance(m, CascadingRejectionHead)]
        assert len(heads) == cascading
        weighted = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, CascadingRejectionHead))]
        assert len(weighted) == 4
        for layer in weighted:
            (norm,) = layer.parametrizations.weight
            assert isinstance(norm, SpectralNorm)
        scores = D(G(torch.randn(5, gan.DEFAULT["z_dim"])))
        assert scores.shape == (5, gan.DEFAULT["n_stages"] if cascading else 1)


def test_digits_are_scaled_to_plus_minus_one():
    images, labels = gan.load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1 and images.max() == 1
    assert torch.equal(torch.unique(labels), torch.arange(10))


def test_short_run_bookkeeping_figure_and_table(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (saved.append(fig), savefig(fig, path, **kw)))
    png = tmp_path / "gan.png"
    result = gan.run(steps=4, seed=3, out=str(png), progress=False, seeds=2, **TINY)
    assert png.stat().st_size > 1000 and result["out"] == str(png)
    assert result["seeds"] == [3, 4] and result["steps"] == 4 and result["seconds"] > 0
    assert set(result["mmd"]) == set(gan.VARIANTS) == set(result["checksums"]) == set(result["curves"])
    for variant in gan.VARIANTS:
        assert all(len(result["mmd"][variant][space]) == 2 for space in gan.SPACES)
        assert result["curves"][variant]["steps"] == [0, 2, 4] and len(result["curves"][variant]["pixels"]) == 2
    assert set(result["losses"]) == set(gan.TRAINED) and len(result["losses"]["baseline"]["D"][1]) == 4
    assert all(0 <= a <= 1 for a in result["accuracy"])
    assert all(result["ceiling"][s][i] > 0.1 > abs(result["floor"][s][i]) for s in gan.SPACES for i in range(2))
    assert result["checksums"]["+SELF-MOD+CR+EMA"] != result["checksums"]["+SELF-MOD+CR"]

    text = gan.summary(result)
    rows = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
    assert rows == ["variant", *gan.VARIANTS, "floor:", "ceiling:", "(+EMA:"]
    assert f"wrote {png}" in text and "seeds (3, 4)" in text and "± " in text

    (fig,) = saved
    assert "4 steps × 2 seeds (3, 4)" in fig.texts[0].get_text()  # the suptitle
    for ax in fig.axes[5:]:  # the curves and the bars
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() and ax.get_legend() is not None


def test_training_moves_every_variant_towards_the_digits():
    # 60 steps (~10 s): the full run's numbers are in README.md and docs/cli.md
    result = short_run(steps=60, n_heldout=200, eval_every=60)
    for variant in gan.VARIANTS:
        (start, end), final = result["curves"][variant]["pixels"][0], result["mmd"][variant]["pixels"][0]
        assert final == end < 0.7 * start, (variant, start, end)


def test_same_seed_same_result_other_seed_different_seeds_independent():
    first, again, other = short_run(0), short_run(0), short_run(1)
    assert first["checksums"] == again["checksums"] and first["mmd"] == again["mmd"]
    assert first["curves"] == again["curves"] and first["losses"] == again["losses"]
    assert all(other["checksums"][v] != first["checksums"][v] for v in gan.VARIANTS)
    assert other["mmd"]["baseline"] != first["mmd"]["baseline"]
    both = short_run(0, seeds=2)  # seed 1 of a two-seed run is the run of seed 1 alone
    assert {v: c[1] for v, c in both["checksums"].items()} == {v: c[0] for v, c in other["checksums"].items()}


def test_leaves_the_global_generator_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    short_run(steps=1)
    assert torch.equal(torch.rand(3), expected)


def test_rejects_bad_arguments():
    for kwargs, error, match in [
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seeds": 0}, ValueError, "seeds must be >= 1"),
        ({"n_heldout": 1000}, ValueError, "n_heldout"),
        ({"no_such_setting": 1}, TypeError, "unknown settings"),
    ]:
        with pytest.raises(error, match=match):
            gan.run(**{"steps": 1, "out": None, "progress": False, **kwargs})


def test_cli_quick_writes_png_and_table(tmp_path, capsys):
    png = tmp_path / "g.png"
    assert cli.main(["demo", "gan", "--quick", "--steps", "2", "--seed", "5", "--out", str(png)]) == 0
    out, err = capsys.readouterr()
    assert png.stat().st_size > 1000 and f"wrote {png}" in out
    assert "2 seeds (5, 6) × 2 steps" in out and "+SELF-MOD+CR+EMA" in out and "floor: real vs real" in out
    assert "demo gan" in err and "variant=" in err  # the progress bar, with the variant


def test_says_how_to_install_scikit_learn(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(ModuleNotFoundError, match=r'pip install "kexue_fast\[demo\]"'):
        gan.load_digits()
    assert cli.main(["demo", "gan", "--quick", "--out", str(tmp_path / "g.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "kexue-fast demo gan: needs scikit-learn" in err and "[demo]" in err
