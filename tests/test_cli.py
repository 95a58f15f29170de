"""The ``jaxsurro`` console script dispatches to the module entry points."""

from pathlib import Path

from jaxsurro.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_dispatches_to_the_config_command(capsys):
    assert main(["config", str(ROOT / "experiments/heat.toml"), "--set", "train.batch_size=32"]) == 0
    assert "batch_size = 32" in capsys.readouterr().out


def test_unknown_command_prints_usage_and_fails(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "usage: jaxsurro COMMAND" in err and "run" in err and "plot" in err
    assert main(["--help"]) == 0
