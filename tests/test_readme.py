"""Each quickstart's stage commands are given, exactly as `scripts/quickstart.py` runs them, on
the page that documents it: `make quickstart`'s in README.md, the others' on their method's page
in docs/. (tests/test_docs.py checks that every command of every page is a real one.)"""

import re

import pytest

from conftest import ROOT
from scripts.quickstart import PIPELINES, display

# pipeline -> the page that gives its stages; a pipeline not named here may be on any page
PAGE_OF = {"token": "README.md", "flow": "docs/flow.md", "scale": "docs/next-scale.md",
           "t2i": "docs/text-and-token-shuffle.md", "jitter64": "docs/speculative.md"}
STAGES = [(pipeline, f"{pipeline}-{name}", cmd) for pipeline, (_, stages) in PIPELINES.items()
          for name, cmd in stages]


def page_commands(page: str) -> set[str]:
    """Every command line of a page's bash blocks: continuations joined, comments dropped."""
    text = (ROOT / page).read_text()
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.add(" ".join(line.split()))
    return commands


def all_pages() -> list[str]:
    return ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("pipeline, name, cmd", STAGES, ids=[name for _, name, _ in STAGES])
def test_each_quickstart_stage_command_is_on_its_page(pipeline, name, cmd):
    pages = [PAGE_OF[pipeline]] if pipeline in PAGE_OF else all_pages()
    assert any(display(cmd) in page_commands(p) for p in pages), \
        f"{' or '.join(pages)} lacks the {name} stage as run: {display(cmd)}"


def test_readme_gives_the_set_up_commands():
    assert {"make quickstart", "make test"} <= page_commands("README.md")
