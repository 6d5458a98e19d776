"""lip as a shell citizen: the report on stdout and messages on stderr, plain text in a pipe, a
closed pipe that changes nothing, signals handled from the first line of the entry point, one JSON
document for every way of asking, every missing option named at once, help that reads at 80
columns, and a Makefile target for the core suite.

The signal and pipe tests start real processes. They are deterministic by construction, not by
timing: a pipe is closed before lip starts (so every write meets EPIPE), and a signal is sent only
once /proc shows that lip catches it, whatever phase lip is in by then; each phase has one right
answer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import catches, make_head, save_problem
from typer.testing import CliRunner

from lip_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["repair", "inspect", "compare", "features", "demo"]
runner = CliRunner(env={"COLUMNS": "80"})


def environment(**extra: str) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"], "COLUMNS": "80", **extra}


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_problem(tmp_path_factory.mktemp("problem"), make_head())


def lip(*args: object, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
        **kwargs,
    )


# --- what goes where ----------------------------------------------------------------------------


def test_each_report_is_on_stdout_and_stderr_says_nothing(problem: dict[str, Path], tmp_path: Path) -> None:
    model, features = problem["model"], problem["features"]
    reports = {
        "inspect": (["inspect", model], "fc"),
        "inspect --layer": (["inspect", model, "--layer", "fc", "-f", features], "singular values"),
        "compare": (["compare", model, model], "principal angle"),
        "repair": (["repair", model, "-f", features, "--k", "3", "-o", tmp_path / "out.pt"], "wrote"),
    }
    for name, (args, expected) in reports.items():
        result = runner.invoke(app, [str(arg) for arg in args])
        assert result.exit_code == 0, (name, result.output)
        assert expected in result.stdout, name
        if name == "repair":  # a given k with no validation set: the one warning that nothing checked it
            assert result.stderr.startswith("warning: nothing checked k = 3"), result.stderr
            assert len(result.stderr.splitlines()) == 1
        else:
            assert result.stderr == "", name


def test_a_pipe_gets_plain_text_that_grep_finds(problem: dict[str, Path]) -> None:
    """`lip inspect model.pt | grep fc` under pipefail: a line found, no escape codes, exit 0,
    even where the environment asks for a wide terminal."""
    script = f'set -o pipefail; "{sys.executable}" -m lip_cli inspect "{problem["model"]}" | grep fc'
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=environment(TERM="xterm-256color")
    )
    assert result.returncode == 0, result.stderr
    assert "fc" in result.stdout and "\x1b" not in result.stdout
    assert result.stderr == ""
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_warnings_go_to_stderr_and_the_report_to_stdout(problem: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "model.lip.pt"
    output.write_bytes(b"")
    result = runner.invoke(
        app, ["repair", str(problem["model"]), "-f", str(problem["features"]), "--k", "3", "-o", str(output)]
    )
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "already exists" not in result.stdout


# --- a closed pipe ------------------------------------------------------------------------------


def run_into_a_closed_pipe(*args: object, both: bool = False) -> subprocess.CompletedProcess[str]:
    """lip with stdout (and, with `both`, stderr) on a pipe whose reader closed before lip started:
    every write to it fails with EPIPE."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "lip_cli", *map(str, args)],
            stdout=writer,
            stderr=writer if both else subprocess.PIPE,
            text=True,
            env=environment(),
            timeout=120,
        )
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    "command",
    [["inspect", "{model}"], ["inspect", "{model}", "--json"], ["repair", "--help"]],
    ids=["report", "json", "help"],
)
def test_a_closed_pipe_is_not_an_error(problem: dict[str, Path], command: list[str]) -> None:
    """The run ends as it would have (0 here), with nothing on stderr: no traceback, no 'Exception
    ignored' at the interpreter's exit. (The report, the JSON document and the help are written
    three different ways.)"""
    args = [part.format(model=problem["model"]) for part in command]
    result = run_into_a_closed_pipe(*args)
    assert (result.returncode, result.stderr) == (0, "")


def test_a_closed_pipe_keeps_the_runs_own_exit_code(problem: dict[str, Path], tmp_path: Path) -> None:
    """stdout and stderr both closed, as in `lip ... 2>&1 | head -1`: the outcome's code (3: no k
    confirmed, nothing written; 0: k = 3 written) is what the same run gives with a reader."""
    args = ["repair", problem["model"], "-f", problem["features"]]
    assert run_into_a_closed_pipe(*args, "--k", "auto", "-o", tmp_path / "o.pt", both=True).returncode == 3
    assert not (tmp_path / "o.pt").exists()
    written = run_into_a_closed_pipe(*args, "--k", "3", "-o", tmp_path / "k3.pt", both=True)
    assert written.returncode == 0 and (tmp_path / "k3.pt").stat().st_size > 0


def test_head_under_pipefail_exits_0(problem: dict[str, Path]) -> None:
    """The documented shell use: `lip inspect model.pt 2>&1 | head -1`, whether head leaves before
    or after lip's last write."""
    script = f'set -o pipefail; "{sys.executable}" -m lip_cli inspect "{problem["model"]}" 2>&1 | head -1'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=environment())
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("2-D weights of") and result.stdout.count("\n") == 1


# --- signals from the first line ----------------------------------------------------------------


def test_signals_are_handled_before_typer_or_torch_is_imported() -> None:
    """The entry point's first line installs the handlers: when typer is first imported, SIGTERM
    already has lip's handler (so a signal during the slow imports is handled, not fatal)."""
    code = (
        "import signal, sys\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('typer', 'torch', 'lip_cli.app') and not seen:\n"
        "            seen.append((name, signal.getsignal(signal.SIGTERM)))\n"
        "sys.meta_path.insert(0, Watch())\n"
        "sys.argv = ['lip', 'repair', '--help']\n"
        "from lip_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(seen[0][0], seen[0][1] not in (signal.SIG_DFL, None), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment())
    assert result.stderr.split() == ["lip_cli.app", "True"], result.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("number", "delay"), [(signal.SIGTERM, 0.0), (signal.SIGINT, 0.0), (signal.SIGTERM, 0.05)]
)
def test_a_signal_during_start_up_ends_with_one_line_and_one_document(
    problem: dict[str, Path], tmp_path: Path, number: int, delay: float
) -> None:
    """A signal sent as soon as lip handles it (while it imports typer and torch), or a little
    later: 130 / 143, one line, the error document, nothing written; or, where the run got to its
    end first, the run's own code and document."""
    args = [
        "repair",
        problem["model"],
        "-f",
        problem["features"],
        "--k",
        "2",
        "-o",
        tmp_path / "o.pt",
        "--json",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "lip_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    while not catches(process.pid, signal.SIGTERM) and process.poll() is None:
        time.sleep(0.0005)
    time.sleep(delay)
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=120)
    document = json.loads(stdout)  # exactly one document, whatever the phase
    code = 143 if number == signal.SIGTERM else 130
    if process.returncode == 0:  # the run ended before the signal
        assert document["exit_code"] == 0 and (tmp_path / "o.pt").exists()
        return
    assert process.returncode == code, stderr
    what = "terminated" if code == 143 else "interrupted"
    assert stderr.startswith(f"error: {what}") and stderr.count("\n") == 1, stderr
    assert document["error"]["exit_code"] == code
    assert not (tmp_path / "o.pt").exists() or "after writing" in stderr


# --- one JSON document, whichever way --json is asked for ---------------------------------------


def test_a_global_json_means_the_commands_json(problem: dict[str, Path]) -> None:
    both = [
        runner.invoke(app, ["--json", "inspect", str(problem["model"])]),
        runner.invoke(app, ["inspect", str(problem["model"]), "--json"]),
    ]
    assert [result.exit_code for result in both] == [0, 0]
    assert json.loads(both[0].stdout) == json.loads(both[1].stdout)


@pytest.mark.parametrize(
    "args",
    [
        ["--json", "repair", "x.pt"],
        ["repair", "x.pt", "-f", "f.npy", "--k", "5", "--json=1"],
        ["--json=1", "inspect", "x.pt"],
        ["--json", "no-such-command"],
        ["--json"],
        ["--json", "--no-such-option", "inspect", "x.pt"],
    ],
)
def test_a_bad_command_line_asking_for_json_is_one_error_document(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["exit_code"] == 2


def test_version_under_json_is_one_document() -> None:
    from lip_cli import __version__

    result = runner.invoke(app, ["--version", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == {"lip_version": __version__}
    assert runner.invoke(app, ["--version"]).stdout == f"lip {__version__}\n"


# --- usage errors -------------------------------------------------------------------------------


def test_every_missing_required_option_is_named_at_once() -> None:
    result = runner.invoke(app, ["repair", "x.pt"])
    assert result.exit_code == 2
    assert "Missing option '--features' / '-f' and option '--k' / '-k'." in result.stderr
    everything = runner.invoke(app, ["features"])
    assert everything.exit_code == 2
    for name in ("'CHECKPOINT'", "'--model'", "'--data'", "'--out'"):
        assert name in everything.stderr
    one = runner.invoke(app, ["repair", "x.pt", "--k", "3"])
    assert one.exit_code == 2 and "Missing option '--features' / '-f'." in one.stderr


# --- help at 80 columns -------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_help_reads_at_80_columns(name: str) -> None:
    """About two screens, an example, the exit codes and the docs page; flags show as flags and
    arguments in capitals."""
    result = runner.invoke(app, [name, "--help"], terminal_width=80)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) <= 50, len(lines)
    assert max(len(line) for line in lines) <= 80
    assert re.search(rf"^Examples:\n  lip {name} ", result.stdout, re.MULTILINE)
    assert "Exit codes: 0 " in result.stdout and f"docs/{name}.md" in result.stdout
    assert (ROOT / "docs" / f"{name}.md").exists()
    assert "<bool>" not in result.stdout and "{" not in lines[0]
    assert re.search(r"\[OPTIONS\] (\[?[A-Z]+)", lines[0]), lines[0]


def test_help_examples_parse_as_command_lines() -> None:
    """Each example is a command line its command parses (parsed only: nothing runs)."""
    import shlex

    from typer.main import get_command

    from lip_cli import app as module

    group = get_command(app)
    for command in module.COMMANDS:
        for example in command.EXAMPLES:
            name, *words = shlex.split(example.split(" | ")[0])[1:]
            context = group.commands[name].make_context(name, words)  # raises on a bad command line
            assert context.params, example


def test_top_level_help_stays_light() -> None:
    """`lip --help` and `lip repair --help` import neither torch nor rich."""
    code = (
        "import sys; sys.argv = ['lip', *sys.argv[1:]]\n"
        "from lip_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'rich' in sys.modules, file=sys.stderr)"
    )
    for args in (["--help"], ["repair", "--help"]):
        result = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment()
        )
        assert result.stderr.split() == ["False", "False"], (args, result.stderr)
        assert "Usage:" in result.stdout


def test_demo_help_says_what_demo_does() -> None:
    """`lip demo` trains and prints the next commands; it caches no features (lip features does)."""
    result = runner.invoke(app, ["demo", "--help"], terminal_width=80)
    description = " ".join(result.stdout.split("Arguments:")[0].split())
    assert "train a classifier" in description and "cache" not in description


# --- the contributors' loop ---------------------------------------------------------------------


def test_make_test_core_runs_the_core_suite_without_the_vision_environment() -> None:
    dry = subprocess.run(["make", "-n", "test-core"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "pytest" in dry.stdout and ".venv-vision" not in dry.stdout and "install-vision" not in dry.stdout
    everything = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True)
    assert "tests_vision" in everything.stdout and "pytest" in everything.stdout
