"""The documentation runs: every example in README.md and docs/*.md, and every option table.

Conventions of the pages (this file is their one definition):
- Every fenced block names its kind. ```sh and ```python blocks run; ```text blocks (quoted output,
  trees, usage lines) never run, so quote output sparingly: nothing checks it.
- The blocks of one page run in order in one scratch folder (a tutorial builds on its own earlier
  steps). The folder starts as `make demo` leaves the repository: `demo/` holds the demo's model and
  data and the feature caches that the Makefile's demo target writes (its `lip demo` and
  `lip features` lines run once per session), today `demo/train/features.npy` and
  `demo/val/features.npy`.
- A ```sh block runs line by line (a trailing `\\` joins a line to the next; `#` starts a
  comment). A line ending in `# exit N` must exit with N, any other line with 0. A pipeline exits
  as in a user's shell, with its last stage's code: a page that shows lip's code through a pipe
  writes `set -o pipefail; ...` on that line. A line starting with `lip` runs in this process
  through typer's CliRunner, which is fast: bash expands its globs and braces first, and its stdout
  goes on to the rest of a pipeline (`lip ... --json | jq .k`), which bash runs. A line that
  redirects, substitutes (`$`) or chains (`;`, `&&`), and any line of another program, runs in
  bash, with `lip` and `python` on PATH calling this interpreter and this checkout's `lip_cli`.
- ```sh norun marks a block that cannot run here (set-up with make, a GPU, several processes);
  keep them few.
- A ```python block runs in this process, in a fresh namespace, with the scratch folder as the
  current folder; ```python file=NAME is written to NAME in the scratch folder instead of run (a
  model file that a later `lip features --model python:NAME:...` imports).
- A failing example fails with its page, its line, and its output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lip_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)(.*)$")
KINDS = {"sh", "python", "text"}
SHELL_ONLY = re.compile(r"[&;<>()$`]")  # what only a shell can run
EXPANDS = re.compile(r"[*?\[\]{}~]")  # what bash expands into words for lip
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
runner = CliRunner(env={"COLUMNS": "100"})


@dataclass
class Block:
    page: Path
    line: int  # of the first line inside the fence
    kind: str
    options: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line + offset}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, in order."""
    found, current, lines = [], None, page.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if current is None and match:
            current = Block(page, number + 1, match.group(1), match.group(2).strip(), "")
        elif current is not None and line.startswith("```"):
            found.append(current)
            current = None
        elif current is not None:
            current.text += line + "\n"
    assert current is None, f"{page.relative_to(ROOT)}: a fence is not closed"
    return found


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """(offset in the block, command) with `\\` continuations joined and blank lines left out."""
    commands, pending, start = [], "", 0
    for offset, line in enumerate(block.text.splitlines()):
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.strip()[:-1].strip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append((start, command))
    return commands


def _unquoted(command: str) -> str:
    return re.sub(r"'[^']*'|\"[^\"]*\"", "", command.split(" #")[0])


def make_demo_steps() -> list[list[str]]:
    """The `lip demo` and `lip features` commands of the Makefile's demo target, as arguments."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "Makefile: no demo target"
    lines = recipe.group(1).replace("\\\n", " ").splitlines()
    steps = [shlex.split(line.strip())[1:] for line in lines if line.strip().startswith("$(BIN)/lip ")]
    steps = [step for step in steps if step[0] in ("demo", "features")]
    assert [step[0] for step in steps].count("features") >= 2, "Makefile: demo caches no features"
    return steps


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make demo` leaves: the demo's model and data, and the feature caches of both splits
    (its own `lip demo` and `lip features` lines, run here)."""
    base = tmp_path_factory.mktemp("demo")
    old = os.getcwd()
    os.chdir(base)
    try:
        for step in make_demo_steps():
            result = runner.invoke(app, step)
            assert result.exit_code == 0, f"Makefile: lip {' '.join(step)}: {result.output}"
    finally:
        os.chdir(old)
    return base / "demo"


@pytest.fixture(scope="session")
def shims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for PATH where `lip` and `python` run this interpreter on this checkout."""
    assert shutil.which("bash") and shutil.which("jq"), "the doc examples need bash and jq on PATH"
    folder = tmp_path_factory.mktemp("bin")
    programs = {"lip": f'"{sys.executable}" -m lip_cli', "python": f'"{sys.executable}"'}
    for name, run in programs.items():
        (folder / name).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (folder / name).chmod(0o755)
    return folder


def split_pipe(command: str) -> tuple[str, str]:
    """(first stage, the rest of the pipeline or ""), cut at the first `|` outside quotes."""
    quote = ""
    for index, char in enumerate(command):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "|" and command[index + 1 : index + 2] != "|":
            return command[:index].strip(), command[index + 1 :].strip()
    return command, ""


def shell_env(shims: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "100"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def bash(script: str, shims: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        env=shell_env(shims),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def lip_words(stage: str, shims: Path) -> list[str] | None:
    """The arguments of a `lip ...` stage as bash would pass them, or None when it is not one that
    can run in this process (it redirects, substitutes, or chains commands)."""
    if not stage.startswith("lip ") or SHELL_ONLY.search(_unquoted(stage)):
        return None
    if not EXPANDS.search(_unquoted(stage)):
        return shlex.split(stage, comments=True)[1:]
    expanded = bash("printf '%s\\0' " + stage.removeprefix("lip "), shims)  # globs and braces
    assert expanded.returncode == 0, expanded.stderr
    return expanded.stdout.split("\0")[:-1]


def run_shell(block: Block, offset: int, command: str, shims: Path) -> None:
    """Run one command line: `lip` in this process (its stdout piped on to the rest of the line
    by bash, when there is a rest), anything else in bash."""
    expected = int(EXIT.search(command).group(1)) if EXIT.search(command) else 0
    stage, rest = split_pipe(command)
    words = lip_words(stage, shims)
    if words is None:
        done = bash(command, shims)
        code, output = done.returncode, done.stdout + done.stderr
    else:
        result = runner.invoke(app, words)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            detail = "".join(traceback.format_exception(result.exception))
            pytest.fail(f"{block.where(offset)}: {command}\nraised:\n{detail}\n{result.output}")
        code, output = result.exit_code, result.output
        if rest and code != 0:  # a user's shell would hide this code behind the last stage's
            pytest.fail(
                f"{block.where(offset)}: {command}\nlip exits {code} in a pipeline, which exits with its "
                f"last stage's code; write `set -o pipefail; ...  # exit {code}`\n{output}"
            )
        if rest:  # the rest of the pipeline reads lip's stdout; the line exits with its last stage
            done = bash(rest, shims, stdin=result.stdout)
            code, output = done.returncode, result.stderr + done.stdout + done.stderr
    if code != expected:
        pytest.fail(f"{block.where(offset)}: {command}\nexit {code}, expected {expected}; output:\n{output}")


def forget_modules_from(folder: Path) -> None:
    """Drop the modules imported from `folder`, so that the next import (lip's too) finds them anew."""
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(str(folder)):
            del sys.modules[name]


def run_python(block: Block, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run a block as `python` would run a script saved in `folder`: that folder first on sys.path."""
    sys.path.insert(0, str(folder))
    try:
        source = "\n" * (block.line - 1) + block.text  # tracebacks name the page's own lines
        exec(compile(source, str(block.page.relative_to(ROOT)), "exec"), {"__name__": "__main__"})
    except Exception:
        captured = capsys.readouterr()
        pytest.fail(
            f"{block.where()}: the example raised\n{traceback.format_exc()}\n{captured.out}{captured.err}"
        )
    finally:
        sys.path.remove(str(folder))
        forget_modules_from(folder)


def runnable(page: Path) -> bool:
    return any(block.kind in ("sh", "python") and "norun" not in block.options for block in blocks(page))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_block_names_its_kind(page: Path) -> None:
    for block in blocks(page):
        assert block.kind in KINDS, (
            f"{block.where(-1)}: a fence tagged {block.kind!r}; use sh, python or text"
        )


@pytest.mark.parametrize("page", [page for page in PAGES if runnable(page)], ids=lambda page: page.name)
def test_examples_run(
    page: Path,
    tmp_path: Path,
    demo_folder: Path,
    shims: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shutil.copytree(demo_folder, tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        for block in blocks(page):
            if "norun" in block.options or block.kind == "text":
                continue
            if block.kind == "python" and block.options.startswith("file="):
                (tmp_path / block.options.removeprefix("file=")).write_text(block.text)
            elif block.kind == "python":
                run_python(block, tmp_path, capsys)
            else:
                for offset, command in shell_lines(block):
                    run_shell(block, offset, command, shims)
    finally:
        forget_modules_from(tmp_path)  # a page's own model files are not another page's


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_lead_to_files(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: a link to {target}, not there"


def _options_script():
    spec = importlib.util.spec_from_file_location("docs_options", ROOT / "docs" / "options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_option_tables_match_the_commands() -> None:
    options = _options_script()
    marked = [page for page in options.pages() if options.MARKERS.search(page.read_text())]
    assert {page.stem for page in marked} >= {"repair", "inspect", "compare", "features", "demo"}
    for page in marked:
        text = page.read_text()
        assert options.regenerate(text) == text, (
            f"{page.relative_to(ROOT)}: its option table differs from the command's --help; "
            "run python docs/options.py"
        )


def test_options_check_names_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = _options_script()
    page = tmp_path / "repair.md"
    page.write_text("# x\n<!-- options: repair -->\n| old |\n<!-- /options -->\n")
    monkeypatch.setattr(options, "pages", lambda: [page])
    monkeypatch.setattr(options, "DOCS", tmp_path / "docs")
    assert options.main(["--check"]) == 1
    assert page.read_text().endswith("| old |\n<!-- /options -->\n")
    assert options.main([]) == 0
    assert "`--val-features`" in page.read_text()
    assert options.main(["--check"]) == 0


def test_readme_and_evidence_figures_are_what_the_runs_generated() -> None:
    """README's "What to expect" and docs/evidence.md are written by benchmarks/evidence.py from
    benchmarks/RESULTS.md and benchmarks/DEFAULTS.md: no figure there is typed by hand."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import evidence

    for path, text in evidence.generated().items():
        assert path.read_text() == text, f"{path.name} is stale: run python benchmarks/evidence.py"


def test_demo_page_figures_are_what_the_demo_gives(demo_folder: Path) -> None:
    """docs/demo.md's figures of the single demo are written by docs/demo_figures.py; here they are
    measured again on the folder `make demo` leaves and must read the same."""
    sys.path.insert(0, str(ROOT / "docs"))
    import demo_figures

    single = demo_figures.single_figures(demo_folder)
    page = (ROOT / "docs" / "demo.md").read_text()
    assert demo_figures.block(page, "demo-intro") == demo_figures.intro_text(single)
    assert demo_figures.block(page, "demo-fixed-k") == demo_figures.fixed_k_text(single)


def test_speed_page_figures_are_what_the_runs_saved() -> None:
    """docs/speed.md's figures are written by benchmarks/speed_page.py from benchmarks/speed.json and
    benchmarks/large_checkpoint.json, the files the benchmark runs saved: none is typed by hand."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed_page

    for path, text in speed_page.generated().items():
        assert path.read_text() == text, f"{path.name} is stale: run python benchmarks/speed_page.py"


def test_results_speed_section_is_what_speed_json_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/RESULTS.md's speed section is `speed.py --render benchmarks/speed.json`'s text."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import speed

    written = {}
    monkeypatch.setattr(speed, "replace_section", lambda name, text: written.update({name: text}))
    saved = json.loads((ROOT / "benchmarks" / "speed.json").read_text())
    speed.write_section(saved["results"], saved["command"], saved["machine"])
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    section = results.split("<!-- speed:begin -->\n", 1)[1].split("\n<!-- speed:end -->", 1)[0]
    assert section == written["speed"].rstrip(), "RESULTS.md's speed section is stale: speed.py --render"


def test_compare_page_angle_after_a_repair_is_what_compare_gives(demo_folder: Path, tmp_path: Path) -> None:
    """docs/compare.md: after `--k 3` on the demo, compare's largest principal angle at k = 5 is the
    one the page names (the repaired values sort in another order, so the top 5 differ)."""
    page = " ".join((ROOT / "docs" / "compare.md").read_text().split())
    found = re.search(r"after `--k (\d+)` on the demo, a (\d+)-degree angle at k = (\d+)\)", page)
    assert found, "docs/compare.md: the sentence on the angle after a repair is gone"
    k, degrees, at = found.groups()
    repaired = tmp_path / "repaired.pt"
    features = demo_folder / "train" / "features.npy"
    model = str(demo_folder / "model.pt")
    result = runner.invoke(app, ["repair", model, "-f", str(features), "--k", k, "-o", str(repaired)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", model, str(repaired), "--json"])
    angles = json.loads(result.stdout)["largest_principal_angle_degrees"]
    assert f"{angles[at]:.0f}" == degrees
