"""The documentation stays true to the repository: the README is a front page of at most 300
lines; every `make` target and notebook parameter that README.md and docs/*.md name exists (in
the Makefile, in that notebook's `parameters` cell); every relative link points to a file (and,
with a #fragment, to a heading of it); no issue numbers in README.md, docs/ or CHANGELOG.md.

How a parameter is tied to a notebook: on a papermill command line, the notebook it runs
(`notebooks/NN_*.ipynb`); in the README's pipeline table, the notebook of the row. A `-p` or `-y`
fragment without a notebook (e.g. `-y "fractions: [0.1, 1.0]"` in prose) must name a
parameter of at least one notebook.

Fast and offline: only the standard library (and PyYAML when it is there) reads text files.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
MAKEFILE = ROOT / "Makefile"
NOTEBOOKS = ROOT / "notebooks"
MAX_README_LINES = 300

PARAMETERS_CELL = '# %% tags=["parameters"]'
ISSUE_PATTERNS = (
    re.compile(r"\bissues? #?\d+", re.IGNORECASE),
    re.compile(r"(?<![\w/])#\d+\b"),
)
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
NOTEBOOK_REF = re.compile(r"notebooks/(\d\d)_\w+\.(?:ipynb|py)\b")
COMMAND_SEPARATOR = re.compile(r"&&|\|\||;|\|")


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


# --------------------------------------------------------------------------------------------
# Markdown


def split_fences(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The prose (fenced blocks blanked, line count kept) and the fenced blocks as
    (language, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence: str | None = None
    for line in text.splitlines():
        opening = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and opening:
            fence = opening.group(1)
            blocks.append((opening.group(2).lower(), []))
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            fence = None
            prose.append("")
        elif fence is not None:
            blocks[-1][1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def code_spans(prose: str) -> list[str]:
    """Inline code spans (possibly wrapped over lines, never over a blank line), whitespace
    normalised."""
    spans = []
    for paragraph in re.split(r"\n\s*\n", prose):
        for match in re.finditer(r"(`+)(.+?)\1", paragraph, flags=re.DOTALL):
            spans.append(" ".join(match.group(2).split()))
    return spans


def commands(text: str) -> list[str]:
    """Everything that reads as a command: inline code spans and the logical lines (joined at a
    trailing backslash, comments kept) of fenced shell blocks."""
    prose, blocks = split_fences(text)
    found = code_spans(prose)
    for language, lines in blocks:
        if language not in SHELL_FENCES:
            continue
        logical = ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            found.append(" ".join((logical + line).split()))
            logical = ""
        if logical:
            found.append(" ".join(logical.split()))
    return found


def tokens(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in prose: fall back to whitespace
        return command.split()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for line in prose.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


# --------------------------------------------------------------------------------------------
# What the repository holds


def makefile_targets(makefile: Path = MAKEFILE) -> set[str]:
    """Names with a rule (`target: ...` at the start of a line); variables excluded."""
    targets = set()
    for line in makefile.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([^\s:#=][^:#=]*?)\s*:(?!=)", line)
        if match:
            targets.update(
                name for name in match.group(1).split() if "$" not in name and name[0] != "."
            )
    return targets


def notebook_parameters(notebooks: Path = NOTEBOOKS) -> dict[str, set[str]]:
    """Notebook number ("01") -> the names its `parameters` cell assigns at top level."""
    result = {}
    for path in sorted(notebooks.glob("[0-9][0-9]_*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        starts = [i for i, line in enumerate(lines) if line.strip() == PARAMETERS_CELL]
        assert len(starts) == 1, f"{path.name}: expected one parameters cell, found {len(starts)}"
        cell = []
        for line in lines[starts[0] + 1 :]:
            if line.startswith("# %%"):
                break
            cell.append(line)
        names = set()
        for node in ast.parse("\n".join(cell)).body:
            if isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        result[path.name[:2]] = names
    return result


# --------------------------------------------------------------------------------------------
# Checks, each returning what is wrong (empty: all well)


def make_targets_named(command: str) -> Iterator[str]:
    """The targets of every `make` invocation in a command (`make -C`/`-f` ones skipped)."""
    for segment in COMMAND_SEPARATOR.split(command):
        words = tokens(segment)
        if "make" not in words:
            continue
        start = words.index("make")
        if any(w != "time" and "=" not in w for w in words[:start]):
            continue  # "make" is an argument of something else
        arguments = words[start + 1 :]
        if any(re.match(r"^(-C|--directory|-f|--file|--makefile)", a) for a in arguments):
            continue
        for argument in arguments:
            if argument.startswith("-") or "=" in argument or re.fullmatch(r"<.*>", argument):
                continue
            yield argument


def unknown_make_targets(text: str, targets: set[str]) -> list[str]:
    return [
        f"`{command}`: no Makefile target {target!r}"
        for command in commands(text)
        for target in make_targets_named(command)
        if target not in targets
    ]


def yaml_names(value: str) -> list[str]:
    """Top-level keys of a `-y` value (`name: [1, 2]` or `{a: 1, b: 2}`); [] when it is not a
    literal mapping (e.g. a Makefile variable)."""
    try:
        import yaml

        loaded = yaml.safe_load(value)
    except Exception:
        loaded = None
        match = re.match(r"^\s*\{?\s*([A-Za-z_]\w*)\s*:", value)
        return [match.group(1)] if match else []
    return [str(key) for key in loaded] if isinstance(loaded, dict) else []


def parameters_named(command: str) -> Iterator[tuple[str, str | None, str]]:
    """(name, notebook number or None, problem or "") for every `-p`/`-r`/`-y` of a papermill
    command or a bare `-p`/`-y` fragment."""
    if "papermill" not in command and not re.match(r"^-[pyr]\s", command):
        return
    notebook = NOTEBOOK_REF.search(command)
    number = notebook.group(1) if notebook else None
    words = tokens(command)
    for i, word in enumerate(words):
        if word in ("-p", "--parameters", "-r", "--parameters_raw") and i + 1 < len(words):
            name = words[i + 1]
            value = words[i + 2] if i + 2 < len(words) else ""
            problem = ""
            if word in ("-p", "--parameters") and value[:1] in ("[", "{"):
                problem = f"{name}: a list or mapping goes with -y, not -p"
            if IDENTIFIER.fullmatch(name):
                yield name, number, problem
        elif word in ("-y", "--parameters_yaml") and i + 1 < len(words):
            for name in yaml_names(words[i + 1]):
                if IDENTIFIER.fullmatch(name):
                    yield name, number, ""


def unknown_command_parameters(text: str, parameters: dict[str, set[str]]) -> list[str]:
    everywhere = set().union(*parameters.values())
    problems = []
    for command in commands(text):
        for name, number, problem in parameters_named(command):
            if problem:
                problems.append(f"`{command}`: {problem}")
            if number is None:
                if name not in everywhere:
                    problems.append(f"`{command}`: {name!r} is no notebook's parameter")
            elif number not in parameters:
                problems.append(f"`{command}`: no notebook {number}")
            elif name not in parameters[number]:
                problems.append(f"`{command}`: {name!r} is not a parameter of notebook {number}")
    return problems


def pipeline_table(text: str) -> list[tuple[str, list[str]]]:
    """The README table with a "key parameters" column: (notebook number, names) per row."""
    prose, _ = split_fences(text)
    rows: list[tuple[str, list[str]]] = []
    column = None
    for line in prose.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        headers = [c.lower() for c in cells]
        if column is None:
            if "key parameters" in headers:
                column = headers.index("key parameters")
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator row
        number = re.search(r"\b(\d\d)_[a-z]", cells[0])
        assert number, f"pipeline table row without a notebook: {line}"
        names = [
            match.group(0)
            for span in re.findall(r"`([^`]+)`", cells[column])
            if (match := IDENTIFIER.match(span))
        ]
        rows.append((number.group(1), names))
    return rows


def unknown_table_parameters(text: str, parameters: dict[str, set[str]]) -> list[str]:
    problems = []
    for number, names in pipeline_table(text):
        for name in names:
            if name not in parameters.get(number, set()):
                problems.append(f"pipeline table: {name!r} is not a parameter of notebook {number}")
    return problems


def issue_numbers(text: str) -> list[str]:
    return [m.group(0) for pattern in ISSUE_PATTERNS for m in pattern.finditer(text)]


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Relative links (and their #fragments) that lead nowhere."""
    text = path.read_text(encoding="utf-8") if text is None else text
    prose, _ = split_fences(text)
    prose = re.sub(r"(`+).+?\1", "", prose, flags=re.DOTALL)  # links inside code are text
    problems = []
    for match in re.finditer(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
        target = match.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # https:, mailto:
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: ({target}) -> {linked} does not exist")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            problems.append(f"{path.name}: ({target}) -> no heading #{fragment} in {linked.name}")
    return problems


# --------------------------------------------------------------------------------------------
# The tests


def test_readme_is_a_front_page():
    n_lines = len(README.read_text(encoding="utf-8").splitlines())
    assert n_lines <= MAX_README_LINES, f"README.md: {n_lines} lines, at most {MAX_README_LINES}"


def test_readme_names_the_two_commands():
    named = {t for c in commands(README.read_text(encoding="utf-8")) for t in make_targets_named(c)}
    assert {"demo", "test"} <= named


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_make_targets_exist(path: Path):
    problems = unknown_make_targets(path.read_text(encoding="utf-8"), makefile_targets())
    assert not problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_papermill_parameters_exist(path: Path):
    problems = unknown_command_parameters(path.read_text(encoding="utf-8"), notebook_parameters())
    assert not problems


def test_pipeline_table_parameters_exist():
    text = README.read_text(encoding="utf-8")
    parameters = notebook_parameters()
    rows = pipeline_table(text)
    assert sorted(number for number, _ in rows) == sorted(parameters), "a notebook is missing"
    assert all(names for _, names in rows), "a row names no parameter"
    problems = unknown_table_parameters(text, parameters)
    assert not problems


@pytest.mark.parametrize("path", [*doc_files(), CHANGELOG], ids=lambda p: p.name)
def test_no_issue_numbers(path: Path):
    found = issue_numbers(path.read_text(encoding="utf-8"))
    assert not found


@pytest.mark.parametrize("path", [*doc_files(), CHANGELOG], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path):
    problems = broken_links(path)
    assert not problems


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


# The checks themselves catch what they are for.


def test_checks_catch_mistakes(tmp_path: Path):
    parameters = {"01": {"data_root", "shapes"}, "03": {"epochs"}}
    assert unknown_make_targets("run `make demo-typo`", {"demo"})
    assert unknown_make_targets("```bash\nmake demo \\\n  X=1 nope\n```", {"demo"})
    assert not unknown_make_targets("`make -C elsewhere thing`, `make X='a b' demo`", {"demo"})
    command = "`papermill notebooks/01_dicom_preprocess.ipynb o.ipynb -p epochs 3`"
    assert unknown_command_parameters(command, parameters)  # epochs is notebook 03's
    assert unknown_command_parameters("`-y 'nope: [1, 2]'`", parameters)
    assert unknown_command_parameters(
        "`papermill notebooks/01_x.ipynb o.ipynb -p shapes [[1,2,3]]`", parameters
    )  # a list through -p
    table = "| notebook | key parameters |\n|---|---|\n| `01_dicom` | `shapes`, `epochs` |\n"
    assert unknown_table_parameters(table, parameters)
    assert issue_numbers("before issue 11") and issue_numbers("fixed in #12")
    assert not issue_numbers("see notebooks/#1 and [x](#2d-voco)")
    page = tmp_path / "page.md"
    page.write_text("# Title\n[a](missing.md) [b](#title) [c](#nowhere)\n")
    assert len(broken_links(page)) == 2
