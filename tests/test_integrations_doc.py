"""Every Python snippet of docs/integrations.md runs as written (each in a fresh namespace)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def snippets() -> list[tuple[str, str]]:
    """``(heading, code)`` of each ```python block, under the nearest ``##`` heading."""
    text = DOC.read_text()
    out = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        out.append((headings[-1] if headings else "intro", match.group(1)))
    return out


def test_the_guide_has_a_snippet_per_section():
    sections = re.findall(r"^## (.+)$", DOC.read_text(), re.M)
    assert sections and set(sections) == {heading for heading, _ in snippets()}


@pytest.mark.parametrize("index", range(len(snippets())), ids=[f"{i}-{h[:30]}" for i, (h, _) in enumerate(snippets())])
def test_snippet_runs(index):
    heading, code = snippets()[index]
    exec(compile(code, f"{DOC.name}[{index}: {heading}]", "exec"), {"__name__": "snippet"})
