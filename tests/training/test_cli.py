"""One command line: ``python -m training`` lists its verbs, each verb answers --help, train is the default, and
the command lines it replaced say what replaced them and run it."""

import subprocess
import sys

import pytest

from tests.helpers import REPO
from training.cli import VERBS, main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_top_level_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {verb} " in out for verb in VERBS) and "the default" in out


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_its_own_help(verb, capsys):
    with pytest.raises(SystemExit) as done:
        main([verb, "--help"])
    assert done.value.code == 0 and f"python -m training {verb}" in capsys.readouterr().out


def test_train_is_the_default_verb(capsys):
    with pytest.raises(SystemExit):
        main(["--epochs", "0"])  # parsed by train's parser: a positive integer is required
    assert "python -m training train" in capsys.readouterr().err


@pytest.mark.parametrize("old, new", [
    (["-m", "training.ood", "calibrate", "--help"], "python -m training ood calibrate"),
    (["-m", "training.directions", "list", "--help"], "python -m training directions list"),
    (["-m", "training.evaluate", "ood", "--help"], "python -m training ood protocols"),
])
def test_the_old_command_lines_run_the_new_ones(old, new):
    done = run(*old)
    assert done.returncode == 0, done.stderr
    assert "is now python -m training" in done.stderr and new in done.stdout
