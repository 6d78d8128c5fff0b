"""
Every Python example in ``README.md`` and ``docs/**/*.md`` runs.

Each page's Python blocks run in order in one fresh module namespace, in a
temporary working directory, so a page reads as one script. A block runs if
it is fenced as ``python`` / ``py`` / ``python3``, or is a MyST
``{code-block}`` / ``{code}`` / ``{code-cell}`` directive with one of those
languages (with ````` or ``:::`` fences); ``pycon`` blocks and Python blocks
that start with ``>>>`` run as doctests in the same namespace. A block is
skipped when the closest non-blank line before its fence is
``<!-- no-run -->``. ``{doctest}`` directives are left to Sphinx's doctest
builder, which gives them the setup they expect.
"""

from __future__ import annotations

import doctest
import os
import re
import sys
import types
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_RUN = "<!-- no-run -->"
PYTHON = frozenset({"python", "py", "python3", "pycon"})
DIRECTIVES = frozenset({"code-block", "code", "code-cell", "sourcecode"})
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,}|:{3,})\s*(?P<info>.*?)\s*$")
_OPTION = re.compile(r"^:[\w-]+:")


@attrs.frozen
class Block:
    """
    One runnable example: its source and the line of the page it starts on.
    """

    line: int
    source: str
    doctest: bool


def _language(info: str, fence: str) -> str | None:
    """
    The language of a fence's info string, or ``None`` if it is not code.
    """
    if not info:
        return None
    word, _, rest = info.partition(" ")
    if word.startswith("{") and word.endswith("}"):
        return rest.strip().split(" ")[0].lower() if word[1:-1] in DIRECTIVES else None
    if fence.startswith(":"):  # colon fences are only for directives
        return None
    return word.lower()


def _strip_options(body: list[str]) -> tuple[int, list[str]]:
    """
    Drop a directive's ``:option: value`` lines or ``---`` YAML front matter;
    return how many lines were dropped and the rest.
    """
    if body and body[0].strip() == "---":
        for i, text in enumerate(body[1:], start=1):
            if text.strip() == "---":
                return i + 1, body[i + 1 :]
        return 0, body
    dropped = 0
    while dropped < len(body) and _OPTION.match(body[dropped].strip()):
        dropped += 1
    return dropped, body[dropped:]


def extract(text: str, *, no_run: bool = False) -> list[Block]:
    """
    The runnable Python blocks of a Markdown page, in order; with *no_run*,
    also the blocks marked not to run (they must still read right).
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"]
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines):
            closing = _FENCE.match(lines[i])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"]
            ):
                break
            body.append(lines[i])
            i += 1
        i += 1
        language = _language(info, fence)
        if language not in PYTHON or (not no_run and _marked_no_run(lines, start)):
            continue
        indent = len(opening["indent"])
        body = [text[indent:] if text[:indent].isspace() else text for text in body]
        dropped = 0
        if info.startswith("{"):
            dropped, body = _strip_options(body)
        source = "\n".join(body)
        is_doctest = language == "pycon" or source.lstrip().startswith(">>>")
        blocks.append(Block(start + 2 + dropped, source, is_doctest))
    return blocks


def _marked_no_run(lines: list[str], fence_index: int) -> bool:
    for text in reversed(lines[:fence_index]):
        if text.strip():
            return text.strip() == NO_RUN
    return False


def _pages() -> list[Path]:
    pages = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    readme = ROOT / "README.md"
    return [readme, *pages] if readme.exists() else pages


def _id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


PAGES = [page for page in _pages() if extract(page.read_text(encoding="utf-8"))]


def run_page(path: Path) -> None:
    """
    Run every block of *path* in one module namespace; a failure names the
    page and line in its traceback. The environment variables are restored
    afterwards: a page may set what its host code reads (embed.md's data
    directory), and the next page must not inherit it.
    """
    name = "docs_example_" + re.sub(r"\W", "_", str(path))
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses, pickling and typing look modules up here
    environ = os.environ.copy()
    try:
        for block in extract(path.read_text(encoding="utf-8")):
            if block.doctest:
                _run_doctest(block, path, module.__dict__)
            else:
                padded = "\n" * (block.line - 1) + block.source + "\n"
                exec(compile(padded, str(path), "exec"), module.__dict__)  # noqa: S102 - running our docs is the point
    finally:
        del sys.modules[name]
        os.environ.clear()
        os.environ.update(environ)


def _run_doctest(block: Block, path: Path, namespace: dict[str, object]) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.source, namespace, str(path), str(path), block.line - 1)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    runner.run(test, out=output.append, clear_globs=False)
    if runner.failures:
        pytest.fail(f"{path.name}, block at line {block.line}:\n{''.join(output)}", pytrace=False)


class TestDocsExamples:
    @pytest.mark.parametrize("path", PAGES, ids=[_id(p) for p in PAGES])
    def test_page_runs(self, path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every Python block of the page runs, in order, as one script."""
        monkeypatch.chdir(tmp_path)

        run_page(path)

    def test_testing_page_is_collected(self) -> None:
        """The testing guide is among the pages run, so its examples cannot rot."""
        assert ROOT / "docs" / "testing.md" in PAGES


_HOST_FILE = re.compile(r"\A# (?P<module>myapp/\w+)\.py\b")
_HOST_IMPORT = re.compile(r"^from (?P<module>myapp\.\w+) import (?P<names>[\w, ]+)$", re.MULTILINE)


def _host_modules() -> dict[str, list[str]]:
    """
    The sample host's modules the pages show as files (a block starting
    ``# myapp/name.py``), each as the blocks that make it up.
    """
    modules: dict[str, list[str]] = {}
    for page in _pages():
        for block in extract(page.read_text(encoding="utf-8"), no_run=True):
            if (header := _HOST_FILE.match(block.source)) is not None:
                modules.setdefault(header["module"].replace("/", "."), []).append(block.source)
    return modules


class TestHostModules:
    """The sample host's files, as the pages show them, work when copied into an app."""

    def test_imports_resolve(self) -> None:
        """Every name a block imports from myapp is defined in that file's blocks."""
        modules = _host_modules()
        undefined: list[str] = []
        for page in _pages():
            for block in extract(page.read_text(encoding="utf-8"), no_run=True):
                for line in _HOST_IMPORT.finditer(block.source):
                    defined = "\n".join(modules.get(line["module"], []))
                    undefined += [
                        f"{_id(page)}:{block.line}: {line['module']}.{name}"
                        for name in (n.strip() for n in line["names"].split(","))
                        if not re.search(
                            rf"^(def|class) {name}\b|^{name}\b.*=", defined, re.MULTILINE
                        )
                    ]

        assert [] == undefined

    def test_no_temporary_store(self) -> None:
        """
        No host file puts its store in a temporary directory: each process
        importing it (a worker, cron) would get an empty store of its own.
        """
        modules = _host_modules()

        assert "myapp.cohortsync_app" in modules
        assert [] == [m for m, blocks in modules.items() if "tempfile" in "\n".join(blocks)]


class TestExtract:
    def test_fenced_python(self) -> None:
        """Plain python fences are extracted with the page line they start on."""
        text = "# Title\n\n```python\nx = 1\n```\n\n```sh\npip install x\n```\n"

        assert [Block(4, "x = 1", doctest=False)] == extract(text)

    def test_code_block_directive_with_options(self) -> None:
        """MyST code-block directives run, without their option lines."""
        text = "```{code-block} python\n:caption: Example\n:linenos:\ny = 2\n```\n"

        assert [Block(4, "y = 2", doctest=False)] == extract(text)

    def test_colon_fence_directive(self) -> None:
        """Colon-fenced directives count; colon fences of other directives do not."""
        text = ":::{code-block} python\nz = 3\n:::\n\n:::{note}\nnot code\n:::\n"

        assert [Block(2, "z = 3", doctest=False)] == extract(text)

    def test_no_run_marker(self) -> None:
        """A block right after <!-- no-run --> is skipped; the next one is not."""
        text = "<!-- no-run -->\n\n```python\nboom()\n```\n\n```python\nok = 1\n```\n"

        assert ["ok = 1"] == [b.source for b in extract(text)]

    def test_no_run_blocks_on_request(self) -> None:
        """With no_run=True the blocks marked not to run are extracted too."""
        text = "<!-- no-run -->\n\n```python\nboom()\n```\n\n```python\nok = 1\n```\n"

        assert ["boom()", "ok = 1"] == [b.source for b in extract(text, no_run=True)]

    def test_nested_fences_are_not_blocks(self) -> None:
        """A python fence shown inside a longer Markdown fence is text, not an example."""
        text = "````md\n```python\nboom()\n```\n````\n"

        assert [] == extract(text)

    def test_doctest_blocks(self) -> None:
        """pycon blocks and python blocks of >>> prompts run as doctests; {doctest} is Sphinx's."""
        text = (
            "```pycon\n>>> 1 + 1\n2\n```\n"
            "```python\n>>> 2 + 2\n4\n```\n"
            "```{doctest}\n>>> 3\n3\n```\n"
        )

        assert [True, True] == [b.doctest for b in extract(text)]

    def test_failure_points_at_the_page_line(self, tmp_path: Path) -> None:
        """A failing example's traceback names the Markdown file and line."""
        page = tmp_path / "page.md"
        page.write_text("text\n\n```python\nx = 1\nraise ValueError('in the docs')\n```\n")

        with pytest.raises(ValueError, match="in the docs") as caught:
            run_page(page)

        frame = caught.traceback[-1]
        assert (str(page), 5) == (str(frame.path), frame.lineno + 1)  # lineno is 0-based

    def test_doctest_failure_reported(self, tmp_path: Path) -> None:
        """A doctest block whose output differs fails the page."""
        page = tmp_path / "page.md"
        page.write_text("```pycon\n>>> 1 + 1\n3\n```\n")

        with pytest.raises(pytest.fail.Exception, match=r"page\.md, block at line 2"):
            run_page(page)

    def test_page_environment_is_restored(self, tmp_path: Path) -> None:
        """A variable a page sets is gone after it ran, so pages stay independent."""
        page = tmp_path / "page.md"
        page.write_text("```python\nimport os\nos.environ['COHORTSYNC_DOCS_PROBE'] = '1'\n```\n")

        run_page(page)

        assert "COHORTSYNC_DOCS_PROBE" not in os.environ

    def test_page_shares_one_namespace(self, tmp_path: Path) -> None:
        """Later blocks see what earlier blocks defined, doctests included."""
        page = tmp_path / "page.md"
        page.write_text("```python\nx = 41\n```\n\n```pycon\n>>> x + 1\n42\n```\n")

        run_page(page)
