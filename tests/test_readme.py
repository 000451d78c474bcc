"""The README's stage commands are exactly the ones `make quickstart` and `make quickstart-flow` run."""

import re

import pytest

from conftest import ROOT
from scripts.quickstart import PIPELINES, display

STAGES = [(f"{pipeline}-{name}", cmd) for pipeline, (_, stages) in PIPELINES.items() for name, cmd in stages]


def readme_commands() -> set[str]:
    """Every command line of the README's bash blocks: continuations joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.add(" ".join(line.split()))
    return commands


@pytest.mark.parametrize("name, cmd", STAGES, ids=[name for name, _ in STAGES])
def test_readme_gives_each_quickstart_stage_command(name, cmd):
    assert display(cmd) in readme_commands(), f"README lacks the {name} stage as run: {display(cmd)}"
