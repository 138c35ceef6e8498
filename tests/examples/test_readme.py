"""The Python code of README.md: copies of the examples, and snippets that must run.

A ```python block whose first line is ``# examples/NAME.py`` must be exactly the content
of that file. A block whose first line is ``# test: run`` is run as a script, in a
subprocess, and must exit with status 0. The tour's program, which serves forever when
run, is run in process by its own test. Other blocks are fragments and are not checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*")
COPY = re.compile(r"# (examples/[\w./-]+\.py)[ \t]*")
RUN = "# test: run"


@dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown document."""

    line: int  # 1-based number of its first line of code
    info: str  # the info string: "python", "sh" ...
    code: str  # its lines, each ending with a newline, without the fence's indentation

    @property
    def first(self) -> str:
        return self.code.partition("\n")[0]


def blocks(markdown: str) -> list[Block]:
    """Return the fenced code blocks of `markdown`, in order."""
    found = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.fullmatch(lines[i])
        i += 1
        if opening is None:
            continue
        indent, fence = opening["indent"], opening["fence"]
        start, body = i, []
        # The block ends at a fence of the same character, at least as long, or at the end.
        while i < len(lines):
            closing = FENCE.fullmatch(lines[i])
            if (
                closing is not None
                and not closing["info"]
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
            ):
                break
            body.append(lines[i].removeprefix(indent))
            i += 1
        i += 1
        code = "".join(line + "\n" for line in body)
        found.append(Block(start + 1, opening["info"].split(" ")[0].lower(), code))
    return found


def python_blocks(kind: str) -> list[Any]:
    """The README's python blocks of one kind ("copy" or "run"), as test parameters."""
    params = []
    for block in blocks(README.read_text("utf-8")):
        if block.info not in ("python", "py"):
            continue
        copy = COPY.fullmatch(block.first)
        if (kind == "copy" and copy) or (kind == "run" and block.first.strip() == RUN):
            params.append(pytest.param(block, id=f"README.md:{block.line}"))
    return params


@pytest.mark.parametrize("block", python_blocks("copy"))
def test_an_example_shown_in_the_readme_is_the_example_file(block: Block) -> None:
    match = COPY.fullmatch(block.first)
    assert match is not None
    path = ROOT / match[1]
    assert path.is_file(), f"README.md:{block.line} shows {match[1]}, which does not exist"
    assert block.code == path.read_text("utf-8"), (
        f"README.md:{block.line} differs from {match[1]}: copy the file into the README"
    )


@pytest.mark.parametrize("block", python_blocks("run"))
def test_a_runnable_readme_snippet_exits_with_status_0(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, "utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, (
        f"README.md:{block.line} exited with status {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


# -- the block finder itself ----------------------------------------------------------------

SAMPLE = """\
# Title

```sh
pip install dispatch-aio
```

```python
# examples/getting_started.py
print("hi")

```

- a list item:

  ```python
  # test: run
  if True:
      print("indented")
  ```

````markdown
```python
not a block of its own
```
````

~~~py
# test: run
~~~
"""


def test_blocks_are_found_with_their_exact_content() -> None:
    found = blocks(SAMPLE)
    assert [(b.line, b.info) for b in found] == [
        (4, "sh"),
        (8, "python"),
        (16, "python"),
        (22, "markdown"),
        (28, "py"),
    ]
    assert found[1].code == '# examples/getting_started.py\nprint("hi")\n\n'
    assert found[2].code == '# test: run\nif True:\n    print("indented")\n'
    assert found[3].code == "```python\nnot a block of its own\n```\n"
    assert found[4].code == "# test: run\n"


def test_a_block_left_open_runs_to_the_end() -> None:
    assert blocks("```python\nx = 1\n") == [Block(2, "python", "x = 1\n")]


def test_the_readme_is_read() -> None:
    # Guards against a finder that silently finds nothing: the README has a shell block.
    assert any(block.info == "sh" for block in blocks(README.read_text("utf-8")))


async def test_tour_program_works() -> None:
    """The tour's program (it serves forever when run) works as it says, in process."""
    from dispatch_aio.testing import Environment

    [tour] = [b for b in blocks(README.read_text()) if "async def total(n: int)" in b.code]
    namespace: dict[str, Any] = {"__name__": "readme_tour"}  # not __main__: no serving
    exec(compile(tour.code, f"README.md:{tour.line}", "exec"), namespace)
    async with Environment(namespace["dispatch"], replay="always", shuffle=True) as env:
        start = env.time()
        assert await env.call(namespace["total"], 10) == 90
        assert env.time() - start >= 3600
        assert len(env.calls(namespace["double"])) == 10
