"""Reports that CI systems read: a GitHub-flavoured markdown summary (for `$GITHUB_STEP_SUMMARY`)
and JUnit XML (GitHub, GitLab and Jenkins show its test cases), for `lip compare`'s gate and
`lip repair`'s decision. Plain text, no rich.

JUnit shape (what those readers take): <testsuites> holding one <testsuite name tests failures
errors skipped>, each <testcase classname name> empty when it passed, else holding one <failure>
(a crossed threshold, a refused k), <error> (the run failed: a file did not load) or <skipped>
(too few rows to tell, nothing confirmed), with a `message` attribute and the detail as text.
"""

from __future__ import annotations

import contextlib
import os
import stat
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSED, FAILURE, ERROR, SKIPPED = "passed", "failure", "error", "skipped"
_MARK = {PASSED: "✅ passed", FAILURE: "❌ failed", ERROR: "💥 error", SKIPPED: "⚠️ undecided"}


@dataclass(frozen=True)
class Case:
    """One test case: a threshold on one comparison, or a decision."""

    classname: str  # e.g. lip.compare.noise-0.4
    name: str  # e.g. phi@5 >= 0.9
    status: str  # PASSED, FAILURE, ERROR or SKIPPED
    message: str  # one line
    measured: str = ""  # the value, for the markdown table


def junit_xml(suite: str, cases: Sequence[Case]) -> str:
    """The JUnit XML document of one test suite."""
    counts = {status: sum(case.status == status for case in cases) for status in (FAILURE, ERROR, SKIPPED)}
    root = ElementTree.Element("testsuites", name="lip", tests=str(len(cases)))
    root.set("failures", str(counts[FAILURE]))
    root.set("errors", str(counts[ERROR]))
    element = ElementTree.SubElement(root, "testsuite", name=suite, tests=str(len(cases)))
    for key, status in (("failures", FAILURE), ("errors", ERROR), ("skipped", SKIPPED)):
        element.set(key, str(counts[status]))
    for case in cases:
        testcase = ElementTree.SubElement(element, "testcase", classname=case.classname, name=case.name)
        if case.status != PASSED:
            outcome = ElementTree.SubElement(testcase, case.status, message=case.message)
            if case.status != SKIPPED:
                outcome.text = case.message
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, suite: str, cases: Sequence[Case]) -> None:
    """The JUnit XML document of one test suite, written atomically to `path` (checked before)."""
    from lip_cli.writes import atomic_output

    with atomic_output(path) as temporary:
        temporary.write_text(junit_xml(suite, cases), encoding="utf-8")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_summary(title: str, lines: Sequence[str], cases: Sequence[Case], extra: str = "") -> str:
    """A GitHub-flavoured markdown section: a heading, a few lines, the cases as a table."""
    parts = [f"### {title}", "", *lines, ""]
    if cases:
        parts += ["| check | on | measured | result |", "| --- | --- | --- | --- |"]
        for case in cases:
            result = _MARK[case.status] + (f": {case.message}" if case.status != PASSED else "")
            parts.append(
                f"| {_cell(case.name)} | {_cell(case.classname)} | {_cell(case.measured)} | {_cell(result)} |"
            )
        parts.append("")
    return "\n".join(parts) + ("\n" + extra if extra else "") + "\n"


def append_step_summary(text: str, variable: str = "GITHUB_STEP_SUMMARY") -> str | None:
    """Append `text` to the file `$GITHUB_STEP_SUMMARY` names, when set; returns a warning when it
    could not be (a special file is never opened, so a FIFO cannot hang the run)."""
    path = os.environ.get(variable)
    if not path:
        return None
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(path).st_mode):
            return f"${variable} = {path}: not a regular file; the summary was not written"
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        return f"${variable} = {path}: {error.strerror}; the summary was not written"
    return None


# lip compare


def compare_cases(reports: Sequence[Any], labels: Sequence[str]) -> list[Case]:
    """One case per threshold and comparison; with no threshold, one per comparison."""
    cases = []
    for report, label in zip(reports, labels, strict=True):
        classname = f"lip.compare.{label}"
        if not report.checks:
            cases.append(Case(classname, "compared", PASSED, "no threshold given", _phi_text(report)))
        for check in report.checks:
            status = {"passed": PASSED, "failed": FAILURE, "too few rows": SKIPPED}[check.verdict]
            measured = "" if check.value is None else f"{check.value:.4g}"
            cases.append(Case(classname, check.threshold.rule, status, check.detail, measured))
    return cases


def _phi_text(report: Any) -> str:
    k = report.sizes[min(2, len(report.sizes) - 1)]
    return f"phi({k}, {k}) = {report.phi_matrix[k - 1, k - 1]:.3f}"


def error_case(command: str, message: str) -> Case:
    return Case(f"lip.{command}", "run", ERROR, message)


def compare_summary(
    reports: Sequence[Any], labels: Sequence[str], verdict: str, cases: Sequence[Case]
) -> str:
    """The markdown summary of `lip compare`: the verdict, the checks, phi(k, k) and angles by k."""
    first = reports[0]
    words = {"passed": "gate passed", "failed": "gate failed", "too few rows": "too few rows to tell"}
    title = f"lip compare: {words[verdict] if any(r.checks for r in reports) else 'compared'}"
    lines = [f"Layer `{first.layer}` ({first.spectrum_a.shape_text}) against `{first.checkpoint_a}`."]
    for report, label in zip(reports, labels, strict=True):
        if report.same_vectors is not None:
            lines.append(
                f"`{label}` holds the reference's singular vectors (a repair of it): by vector phi(k, k) = 1 "
                "for every k; the values by rank below compare re-sorted components."
            )
    header = "| k | " + " | ".join(f"phi {_cell(label)} | angle {_cell(label)}" for label in labels) + " |"
    rows = [header, "| --- |" + " --- | --- |" * len(labels)]
    for k in first.sizes:
        cells = [f"{r.phi_matrix[k - 1, k - 1]:.3f} | {r.largest_angle_degrees[k]:.1f}°" for r in reports]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return markdown_summary(title, lines, cases, "\n".join(rows) + "\n")


def error_summary(command: str, message: str) -> str:
    return markdown_summary(f"lip {command}: error", [_cell(message)], [])


# lip repair


def repair_case(document: dict[str, Any]) -> Case:
    """`lip repair`'s decision as one case, from its JSON document: a refused k fails, nothing
    confirmed is skipped, the rest pass (--force-write wrote what was asked)."""
    outcome = document["outcome"]
    status = (
        PASSED
        if document.get("forced")
        else {"refused": FAILURE, "unconfirmed": SKIPPED}.get(outcome, PASSED)
    )
    name = f"decision: {outcome}" + (" (forced)" if document.get("forced") else "")
    return Case(
        f"lip.repair.{Path(document['checkpoint']).name}",
        name,
        status,
        document["decision"],
        f"k = {document['k']}",
    )
