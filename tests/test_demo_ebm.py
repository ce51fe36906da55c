"""``kexue_fast.demos.ebm`` (``kexue-fast demo ebm``): reproducible from its seed, short runs only."""

import pytest
import torch

from kexue_fast.demos import ebm

STEPS = 15  # a few Langevin-trained steps: enough to show the seed reaching every random stream


def short_run(seed):
    return ebm.run(steps=STEPS, seed=seed, out=None, quick=True, progress=False, n_eval=64, eval_steps=5)


def test_same_seed_same_parameters_other_seed_different():
    first, again, other = short_run(0), short_run(0), short_run(1)
    assert first["checksum"] == again["checksum"]
    assert first["loss"] == again["loss"] and first["buffer"] == again["buffer"]
    assert other["checksum"] != first["checksum"]


def test_leaves_the_global_generator_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    short_run(0)
    assert torch.equal(torch.rand(3), expected)


def test_summary_and_quality_numbers():
    result = short_run(0)
    assert result["steps"] == STEPS and result["seconds"] > 0
    for key in ("data", "buffer", "fresh"):
        q = result[key]
        assert 0.0 <= q["on_modes"] <= 1.0 and 0 <= q["modes_hit"] <= ebm.N_MODES and len(q["per_mode"]) == ebm.N_MODES
    assert result["data"]["on_modes"] > 0.9  # the data themselves: 98.9% within 3σ in expectation
    text = ebm.summary(result)
    assert result["checksum"] in text and "modes" in text and "wrote" not in text


def test_quality_of_exact_mode_centres():
    q = ebm.quality(ebm.mode_centres().repeat(2, 1))
    assert q == {"on_modes": 1.0, "per_mode": [2] * ebm.N_MODES, "modes_hit": ebm.N_MODES}


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        ebm.run(steps=0, out=None, progress=False)
    with pytest.raises(ValueError, match="seed"):
        ebm.run(steps=1, seed=-1, out=None, progress=False)
    with pytest.raises(TypeError, match="unknown settings"):
        ebm.run(steps=1, out=None, progress=False, no_such_setting=1)


def test_figure_has_axis_labels_colour_bar_label_and_legends(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: saved.append(fig))
    ebm.run(steps=2, out=str(tmp_path / "ebm.png"), quick=True, progress=False, n_eval=16, eval_steps=2)
    (fig,) = saved
    panels, (colour_bar,) = fig.axes[:5], fig.axes[5:]
    for ax in panels:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        assert ax.get_legend() is not None and ax.get_legend().get_texts(), ax.get_title()
    assert "energy" in colour_bar.get_ylabel()
