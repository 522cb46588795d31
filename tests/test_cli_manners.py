"""CLI manners (issue 14, item 4): --version, ``python -m dpfeta``, a help written for users, one clear
line and exit 2 for YAML, file and storage errors (the traceback only with -v, before or after the
command), ``--set run.name=2024`` as a string, zsh-safe README commands, the venv and CUDA-wheel notes,
the licence. No Ray. ``cli.main`` in this process where its exit code and stderr are the point (the
console script and ``python -m dpfeta`` call the same function); two subprocess tests (``slow``) check
that entry point itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import dpfeta
from dpfeta import cli, config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs/digits.yaml")


def dpfeta_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m dpfeta ARGS`` as a user runs it."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, "-m", "dpfeta", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


def cli_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``cli.main(ARGS)`` in this process, as (exit status, stdout, stderr)."""
    code = cli.main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the error in one line, the last (log lines of the work before may precede it)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if re.match(r"dpfeta \w+: error: ", line)]
    assert errors == lines[-1:], proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --version, python -m dpfeta, --help ---------------------------------------------------------


@pytest.mark.slow  # a subprocess
def test_version_names_dpfeta_and_the_libraries_a_result_depends_on():
    proc = dpfeta_cli("--version")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"dpfeta {dpfeta.__version__} (")
    for dist in ("torch", "opacus", "ray"):
        assert f"{dist} {metadata.version(dist)}" in line
    assert metadata.version("dpfeta") == dpfeta.__version__  # one version: pyproject reads dpfeta.__version__


@pytest.mark.slow  # subprocesses
def test_python_m_dpfeta_is_the_console_script():
    proc = dpfeta_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == cli.build_parser().format_help()
    assert proc.stdout.startswith("usage: dpfeta ")
    bad = dpfeta_cli("no-such-command")
    assert bad.returncode == 2 and "invalid choice: 'no-such-command'" in bad.stderr


def test_top_level_help_is_written_for_users():
    text = cli.build_parser().format_help()
    assert "``" not in text and ":class:" not in text  # no RST from docstrings
    assert "differentially private" in text.lower() and "(epsilon, delta)" in text
    examples = [line.strip() for line in text.split("examples:")[1].splitlines() if line.strip().startswith("dpfeta ")]
    assert len(examples) >= 3
    commands = {name for name, *_ in cli.COMMANDS}
    for example in examples:  # every example is a real command line the parser accepts
        argv = example.split("  ")[0].split()[1:]
        assert argv[0] in commands
        cli.build_parser().parse_args(argv)
    for name in commands:  # every command is listed with its one-line help
        assert re.search(rf"^\s+{name}\s+\S", text, re.M), name


# errors: one line, exit 2; -v keeps the traceback -----------------------------------------------


def test_yaml_syntax_error_in_a_config_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("privacy:\n  epsilon: 1\n  delta: [1e-5\nrun:\n  name: x\n")
    line = assert_one_line_error(
        cli_in_process(capsys, "budget", "--config", str(bad)), str(bad), "invalid YAML", "line "
    )
    assert line.startswith("dpfeta budget: error: ")


def test_yaml_syntax_error_in_a_set_value_is_one_line_naming_the_key(capsys):
    assert_one_line_error(
        cli_in_process(capsys, "budget", "--config", DIGITS, "--set", "run.num_workers=[2,8"),
        "'run.num_workers'",
        "not valid YAML",
    )


def test_an_unreadable_config_file_is_one_line_naming_it(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 8)  # not text: a user passed the wrong file
    assert_one_line_error(cli_in_process(capsys, "budget", "--config", str(binary)), str(binary), "cannot read it")
    folder = tmp_path / "configs"
    folder.mkdir()
    assert_one_line_error(cli_in_process(capsys, "budget", "--config", str(folder)), str(folder), "not found")


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_keeps_the_traceback_before_or_after_the_command(tmp_path, where):
    """With -v the exception leaves ``main`` (Python prints its traceback and exits non-zero)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("privacy: {epsilon: 1\n")
    args = ["budget", "--config", str(bad)]
    with pytest.raises(ValueError, match="invalid YAML"):
        cli.main(["-v", *args] if where == "before" else [*args, "-v"])


def test_a_storage_error_is_one_line_naming_the_path(tmp_path, capsys):
    """A real OSError from the file system (an output path below a regular file), end to end."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = tmp_path / "run"
    (run / "release").mkdir(parents=True)  # no release.json: refused before any write
    assert_one_line_error(
        cli_in_process(capsys, "export", "--run", str(run), "--out", str(tmp_path / "out")), "release.json"
    )
    proc = cli_in_process(capsys, "prepare", "--config", DIGITS, "--out", str(blocker / "shards"))
    assert_one_line_error(proc, str(blocker))


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/mnt/shared/runs"),
        OSError(28, "No space left on device", "/mnt/shared/runs/digits/ledger.json"),
    ],
)
def test_permission_and_storage_errors_end_in_one_line_and_exit_2(monkeypatch, capsys, error):
    from dpfeta import export

    def fail(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(export, "export", fail)
    argv = ["export", "--run", "runs/x", "--out", "out"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dpfeta export: error: {error.strerror}: '{error.filename}'"
    with pytest.raises(type(error)):
        cli.main([*argv, "-v"])


# --set run.name=2024 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("2024", "2024"), ("2024.10", "2024.10"), ("1e3", "1e3"), ("true", "true"), ("digits-2024", "digits-2024")],
)
def test_set_a_string_key_to_a_number_keeps_the_text(text, expected):
    assert config.load(DIGITS, [f"run.name={text}"]).run.name == expected
    assert config.load(DIGITS, [f"tracking.experiment={text}"]).tracking.experiment == expected
    assert config.load(DIGITS, [f"data.name={text}"]).data.name == expected  # Optional[str]


def test_a_string_key_given_a_number_in_a_config_file_is_its_string(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: 2024\ntracking:\n  experiment: true\n")
    cfg = config.load(path)
    assert (cfg.run.name, cfg.tracking.experiment) == ("2024", "true")


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("run.use_gpu=2024", r"'run\.use_gpu': expected true or false"),
        ("privacy.epsilon=ten", r"'privacy\.epsilon': expected a number"),
        ("warmup.steps=2.5", r"'warmup\.steps': expected an integer"),
        ("run.name=[2024]", r"'run\.name': expected a string"),
    ],
)
def test_other_type_checks_stay_strict(override, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        config.load(DIGITS, [override])


def test_run_name_2024_through_the_cli(capsys):
    assert cli.main(["budget", "--config", DIGITS, "--set", "run.name=2024", "--set", "privacy.accountant=rdp"]) == 0
    assert "privacy plan for run '2024'" in capsys.readouterr().out


# README and packaging ----------------------------------------------------------------------------------

COMMAND_WORDS = (
    "dpfeta",
    "make",
    "ray",
    "python",
    "pip",
    "source",
    "mlflow",
    "RAY_AUTH_MODE=",
    "OMP_NUM_THREADS=",
    ".venv/bin/",
    "python3.11",
)


def _readme_commands() -> list[str]:
    """The shell commands of the README's fenced blocks: lines with a '$ ' prompt or a command word, with
    their continuations (a trailing backslash or an open quote)."""
    commands, current = [], ""
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S):
        for line in block.splitlines():
            text = line.strip().removeprefix("$ ")
            if not current and not text.startswith(COMMAND_WORDS):
                continue
            current += " " + text.removesuffix("\\")
            if not text.endswith("\\") and _scan(current)[1] is None:
                commands.append(current.strip())
                current = ""
    return commands


def _scan(command: str) -> tuple[list[str], str | None]:
    """(characters zsh globs or redirects -- ``[ ] * ? < >`` -- outside quotes and comments, the quote
    left open at the end)."""
    found, quote = [], None
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1] == " "):
            break
        elif char in "[]*?<>":
            found.append(char)
    return found, quote


def _unquoted_specials(command: str) -> list[str]:
    return _scan(command)[0]


def test_readme_commands_are_safe_in_zsh():
    commands = _readme_commands()
    assert any("run.num_workers=[2,8]" in c for c in commands)  # the case this test is for
    unsafe = {c: _unquoted_specials(c) for c in commands if _unquoted_specials(c)}
    assert not unsafe, unsafe
    assert _unquoted_specials("dpfeta run --set run.num_workers=[2,8]") == ["[", "]"]  # the check can fail


def test_readme_says_how_to_reach_the_venv_and_warns_about_cuda_wheels():
    text = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in text and ".venv/bin/dpfeta" in text
    assert "CUDA" in text and "https://download.pytorch.org/whl/cpu" in text


def test_licence_file_and_package_metadata():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n                           Version 2.0")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert project["authors"] and project["urls"]
    assert all(url.startswith("https://") for url in project["urls"].values())
