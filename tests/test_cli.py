import subprocess
import sys

from vlkit import __version__
from vlkit.cli import COMMANDS, main, resolve


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vlkit {__version__}"


def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'no-such-command'" in err[0]


def test_every_command_resolves_to_a_main():
    for name in COMMANDS:
        assert callable(resolve(name))


def test_python_dash_m(subprocess_env):
    out = subprocess.run(
        [sys.executable, "-m", "vlkit", "--version"], env=subprocess_env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"vlkit {__version__}"
