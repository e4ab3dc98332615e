"""The `ppl-ext` command line: the VAE demo and the estimator table, with small settings."""

import subprocess
import sys

import numpy as np
import pytest

from ppl_ext._cli import main
from ppl_ext._demo import run


def test_demo_trains_the_vae_and_writes_the_figure(tmp_path, capsys):
    out = tmp_path / "demo.png"
    summary = run("elbo", steps=120, batch_size=64, eval_every=60, out=str(out))
    printed = capsys.readouterr().out
    assert "step    120/120" in printed and "test IWELBO(64)/image" in printed
    lines = printed.splitlines()  # says what it does before the slow parts
    assert lines[0].startswith("ppl-ext demo: ") and lines[1].startswith("loading")
    compiling = [i for i, line in enumerate(lines) if line.startswith("compiling")]
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step"))
    assert compiling and compiling[0] < first_step
    assert out.stat().st_size > 10_000  # a PNG with a curve and 24 digit images
    losses = summary["losses"]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < np.mean(losses[:20])  # training makes progress
    assert [step for step, _ in summary["evals"]] == [60, 120]
    assert all(-64 * np.log(2) < value < 0 for _, value in summary["evals"])


@pytest.mark.parametrize("objective", ["iwelbo", "renyi"])
def test_demo_other_objectives(tmp_path, objective):
    summary = run(objective, steps=10, batch_size=32, particles=2, eval_every=10,
                  out=str(tmp_path / "d.png"))
    assert np.all(np.isfinite(summary["losses"]))


def test_demo_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        run(steps=0, out=str(tmp_path / "d.png"))
    with pytest.raises(ValueError, match="objective must be one of"):
        run("kl", out=str(tmp_path / "d.png"))
    with pytest.raises(SystemExit):  # argparse error for the command line
        main(["demo", "--batch-size", "5000", "--out", str(tmp_path / "d.png")])


def test_estimator_table_command(capsys):
    assert main(["estimators", "--num-estimates", "200"]) == 0
    printed = capsys.readouterr().out
    for name in ("reparam", "reinforce", "mvd", "enum", "leave-one-out (4)"):
        assert name in printed


@pytest.mark.parametrize("command", [[], ["demo"], ["estimators"]])
def test_help_shows_the_defaults(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "(default: 0)" in printed  # --seed
    if command != ["estimators"]:
        assert "(default: 5000)" in printed and "(default: elbo)" in printed
    if command != ["demo"]:
        assert "(default: 20000)" in printed


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "ppl_ext", "--help"], capture_output=True,
                            text=True, check=True)
    assert "demo" in result.stdout and "estimators" in result.stdout
