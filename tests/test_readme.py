"""The README's command blocks stay true: every command they name exists and takes the flags they
give, and the "Train your own" block can be run twice as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.DOTALL | re.MULTILINE)
    assert match, title
    return match.group(1)


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block (continuation lines joined), as argument lists."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = body.replace("\\\n", " ")
        lines = [line.split("#", 1)[0].strip() for line in joined.splitlines()]
        blocks.append([shlex.split(line) for line in lines if line])
    return blocks


def captioner_commands() -> list[list[str]]:
    return [command for block in bash_blocks(README) for command in block if command[:1] == ["captioner"]]


def test_the_train_your_own_block_can_be_run_twice():
    # a command that writes a folder refuses an existing one unless told to replace it
    block = bash_blocks(section("Train your own"))[0]
    writers = [command for command in block if command[1] in ("prepare", "train")]
    assert len(writers) == 2
    assert all("--overwrite" in command for command in writers), writers


@pytest.mark.parametrize("command", captioner_commands(), ids=lambda command: " ".join(command[:3]))
def test_every_readme_command_parses(command):
    # the parser accepts every flag the README gives (placeholders such as FLICKR8K_IMAGES are fine)
    code = (
        "import sys; from captioner.cli.main import build_parser; "
        "build_parser().parse_args(sys.argv[1:])"
    )
    result = subprocess.run([sys.executable, "-c", code, *command[1:]], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
