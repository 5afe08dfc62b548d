"""The README and the documents say what the project does: no dead links or anchors, the README
short, its JSON sections valid, its ``hybridfc plan`` commands running, its Python blocks
compiling (and the self-contained ones running), and the repository paths it names present.

Fast: no launcher, no process group (the Python block that needs the launcher, the README's
"Switching a DeepSpeed script" one, is run by ``tests/e2e/test_deepspeed_e2e.py``)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hybridfc.config import (CommunicationConfig, HFSelectionConfig, HybridFCConfig, KNNSelectionConfig, PartialSelectionConfig,
                             parse_hybridfc_section, split_ds_config)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS, REPO / "benchmarks" / "RESULTS.md"]
MAX_README_LINES = 300
REPO_PREFIXES = ("hybridfc/", "examples/", "ds_configs/", "benchmarks/", "tests/", "docs/")
SWITCHING = "## Switching a DeepSpeed script to hybridfc"
RUN_MARK = "<!-- readme-test: run -->"
"""An HTML comment (invisible on GitHub) on the line before a ```python block that runs as it is,
in one process, in a second or two; every other block is only compiled."""

ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
"""The subprocesses' environment: one thread, and this checkout's hybridfc whether installed or not."""

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`]+)`")


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(text: str, language: str) -> list[tuple[str, str]]:
    """``(the line before the block, its content)`` of each fenced block in ``language``."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) == language:
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            blocks.append((before, match.group(2)))
    return blocks


def prose(text: str) -> str:
    """``text`` with its fenced blocks blanked (their lines kept, so line numbers still hold)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (a link's text, no markup), lowercased, every
    character but letters, digits, ``_``, ``-`` and spaces dropped, spaces made ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated slug gets ``-1``, ``-2``… as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


@pytest.mark.parametrize("heading, slug", [
    ("Switching a DeepSpeed script to hybridfc", "switching-a-deepspeed-script-to-hybridfc"),
    ('The `"hybridfc"` section of the ds_config', "the-hybridfc-section-of-the-ds_config"),
    ("Top-k sparsified backbone gradients: `communication.grad_topk` against DeepSpeed's dense reduction",
     "top-k-sparsified-backbone-gradients-communicationgrad_topk-against-deepspeeds-dense-reduction"),
    ("History of the head step at C = 1M", "history-of-the-head-step-at-c--1m"),
    ("The small real image set: `--task digits`", "the-small-real-image-set---task-digits"),
    ("Capacity planning: `hybridfc plan`", "capacity-planning-hybridfc-plan"),
    ("Room for random rows: `hard_fraction`", "room-for-random-rows-hard_fraction"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_anchors_number_repeated_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Command\n\n## Command\n\n```\n# not a heading\n```\n### Output (verbatim)\n")
    assert anchors(page) == {"command", "command-1", "output-verbatim"}


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_no_dead_links(document):
    """Every relative link resolves to a file or folder of the repository, and its ``#anchor`` to a
    heading of the target; http(s) and mailto links are not checked."""
    dead = []
    for number, line in enumerate(prose(document.read_text()).splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^(https?|mailto):", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists():
                dead.append(f"line {number}: {target}: no {resolved}")
            elif anchor and (resolved.is_dir() or anchor not in anchors(resolved)):
                dead.append(f"line {number}: {target}: no heading #{anchor} in {_name(resolved)}")
    assert not dead, f"{_name(document)}:\n" + "\n".join(dead)


def test_documents_name_no_design_md():
    """The design document is docs/design.md; DESIGN.md is not in the project."""
    assert (REPO / "docs" / "design.md").is_file()
    for document in DOCUMENTS:
        assert "DESIGN.md" not in document.read_text(), _name(document)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details to docs/"


def _config_keys() -> set[str]:
    keys = set(HybridFCConfig.model_fields)
    for model in (PartialSelectionConfig, KNNSelectionConfig, HFSelectionConfig):
        keys |= {f"selection.{key}" for key in model.model_fields if key != "type"}
    return keys | {f"communication.{key}" for key in CommunicationConfig.model_fields}


def test_only_config_keys_start_a_row_with_code():
    """tests/test_config.py reads the key table as the rows that start with ``| `key` |``; every
    such row of the README is a key of the section, so no other table can pass for it."""
    rows = [line.split("`")[1] for line in README.read_text().splitlines() if line.startswith("| `")]
    assert set(rows) - _config_keys() == set()
    assert len(rows) == len(set(rows)), "a key has two rows"


def test_json_blocks_parse_and_validate():
    """Every ```json block of the README is JSON; a ds_config's ``"hybridfc"`` section, or a block
    of section keys alone (``num_classes`` and ``embedding_size`` filled in where it leaves them
    out), validates with hybridfc.config."""
    blocks = fenced_blocks(README.read_text(), "json")
    assert blocks, "the README shows the section as a ```json block"
    sections = 0
    for _, block in blocks:
        data = json.loads(block)
        if isinstance(data, dict) and "hybridfc" in data:
            split_ds_config(data)
            sections += 1
        elif isinstance(data, dict) and data and set(data) <= set(HybridFCConfig.model_fields):
            parse_hybridfc_section({"num_classes": 16, "embedding_size": 8, **data})
            sections += 1
    assert sections, "no ```json block of the README holds a hybridfc section"


def _plan_commands() -> list[tuple[str, str]]:
    """``(where, command)`` of each ``hybridfc plan`` line of a ```bash block in the README and
    docs/planner.md, each command once; a line with a literal ``...`` placeholder is left out."""
    commands: dict[str, str] = {}
    for document in (README, REPO / "docs" / "planner.md"):
        for _, block in fenced_blocks(document.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line.startswith("hybridfc plan") and "..." not in line:
                    commands.setdefault(line, _name(document))
    return [(where, command) for command, where in commands.items()]


PLAN_DRIVER = """
import json, sys
from hybridfc.cli import main          # the `hybridfc` console entry point
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:          # argparse's errors
        codes.append(exc.code)
print("EXIT CODES", json.dumps(codes))
"""


def test_plan_commands_run():
    """Every ``hybridfc plan`` command shown exits 0: all of them in one fresh interpreter (one
    import of torch), each through the console entry point ``hybridfc.cli:main``."""
    commands = _plan_commands()
    assert any(where == "README.md" for where, _ in commands), "the README shows a hybridfc plan command"
    argvs = [shlex.split(command)[1:] for _, command in commands]
    result = subprocess.run([sys.executable, "-c", PLAN_DRIVER, json.dumps(argvs)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.rsplit("EXIT CODES", 1)[1])
    failed = [f"{where}: {command} (exit {code})" for (where, command), code in zip(commands, codes) if code != 0]
    assert not failed, "\n".join(failed) + "\n" + result.stderr[-3000:]


def _python_blocks() -> list[tuple[str, int, str, bool]]:
    """``(document, index, code, runs)`` of every ```python block of the README and docs/*.md."""
    return [(_name(document), index, code, before.strip() == RUN_MARK)
            for document in (README, *DOCS)
            for index, (before, code) in enumerate(fenced_blocks(document.read_text(), "python"))]


def test_the_switching_block_is_where_the_e2e_test_finds_it():
    """tests/e2e/test_deepspeed_e2e.py runs the first ```python block after this heading through the
    launcher; here it only has to be there and compile."""
    text = README.read_text()
    after = text[text.index(SWITCHING + "\n"):]
    start = after.index("```python\n") + len("```python\n")
    code = after[start: after.index("```", start)]
    compile(code, "README.md: switching", "exec")
    assert "hybridfc.initialize(" in code and "engine.step()" in code


@pytest.mark.parametrize("document, index, code, runs",
                         [pytest.param(*block, id=f"{block[0]}-{block[1]}") for block in _python_blocks()])
def test_python_blocks(document, index, code, runs, tmp_path):
    """Every block compiles. The ones marked to run (today docs/design.md's head used alone, with no
    process group) run in a fresh interpreter; the README's blocks need the launcher or names of
    the reader's script (``args``, ``backbone``, ``epochs``), so they are compiled only."""
    compile(code, f"{document}: python block {index}", "exec")
    if runs:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120, env=ENV)
        assert result.returncode == 0, f"{document}: python block {index}\n{result.stderr[-3000:]}"


def test_some_python_block_runs():
    assert any(runs for *_, runs in _python_blocks()), f"no block is marked {RUN_MARK}"


def _named_paths(document: Path) -> set[str]:
    """Repository paths a document names: code spans that are a path, and path words of its
    ```bash blocks (``ds_configs/cpu.json``, ``examples/train.py``)."""
    text = document.read_text()
    words = set(CODE_SPAN.findall(prose(text)))
    for _, block in fenced_blocks(text, "bash"):
        words |= set(block.split())
    return {word.rstrip(".,;:)") for word in words if word.startswith(REPO_PREFIXES) and " " not in word}


@pytest.mark.parametrize("document", [README, *DOCS], ids=_name)
def test_named_paths_exist(document):
    missing = [path for path in sorted(_named_paths(document)) if not glob.glob(str(REPO / path))]
    assert not missing, f"{_name(document)} names paths that are not in the repository: {missing}"


def test_readme_names_paths():
    assert {"examples/train.py", "ds_configs/cpu.json"} <= _named_paths(README)
