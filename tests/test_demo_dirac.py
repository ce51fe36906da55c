"""``kexue-fast demo dirac``: the figure and the printed outcomes of the post's six systems."""

import pytest

from kexue_fast import cli
from kexue_fast.demos import dirac as demo

# How each system ends, by the post's math (tests/test_dirac.py checks the numbers behind them):
# √0.03 = 0.173 is GAN-QP's circle (its conserved θ × φ), 1 the one-centred penalty's c.
EXPECTED = {
    "vanilla GAN (non-saturating)": "oscillates",
    "WGAN, hard-normalised critic": "oscillates",
    "WGAN-GP, c = 0": "converges",
    "WGAN-GP, c = 1": "circle, ‖θ‖ → 1.000",
    "GAN-QP": "circle, ‖θ‖ → 0.173",
    "GAN-QP + L2 on D": "converges",
}


@pytest.mark.parametrize("quick", [False, True])
def test_demo_writes_the_png_and_prints_every_outcome(tmp_path, capsys, quick):
    png = tmp_path / "dirac.png"
    assert cli.main(["demo", "dirac", "--out", str(png), *(["--quick"] if quick else [])]) == 0
    out, err = capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = out.splitlines()
    assert lines[0] == f"wrote {png}"
    assert f"integrated by {'RK4' if quick else 'RK45'}" in lines[1]
    for label, outcome in EXPECTED.items():
        (line,) = [line for line in lines if line.strip().startswith(label + ":")]
        assert line.split(":", 1)[1].strip().startswith(outcome), line
    assert "demo dirac" in err and "system=" in err  # the progress bar


def test_run_result_and_ema_of_vanilla():
    result = demo.run(out=None, quick=True, progress=False)
    assert result["out"] is None and result["method"] == "rk4" and result["seconds"] > 0
    assert [s["label"] for s in result["systems"].values()] == list(EXPECTED)
    vanilla = result["systems"]["vanilla"]
    assert vanilla["kind"] == "oscillates" and vanilla["ema_distance"] < 0.2 * vanilla["distance"]
    assert "wrote" not in demo.summary(result)


def test_steps_are_rejected(capsys):
    with pytest.raises(ValueError, match="--steps does not apply"):
        demo.run(steps=10, out=None, progress=False)
    assert cli.main(["demo", "dirac", "--steps", "10"]) == 2
    assert "demo dirac: --steps does not apply" in capsys.readouterr().err
