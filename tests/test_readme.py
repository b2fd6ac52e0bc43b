"""The README's commands on the shipped models run as written and print what it quotes."""

import re
import shlex
from pathlib import Path

import pytest

from onnxrep.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> list[str]:
    """Every `onnxrep ...` command line in the README's code blocks that names a shipped file
    (continuation lines joined; a leading `$ ` or `pip install . && ` dropped)."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^(\$ |pip install \. && )", "", line.strip())
            if line.startswith("onnxrep ") and "models/" in line and "#" not in line:
                found.append(line)
    return found


def test_the_readme_has_commands_to_check():
    assert len(commands()) >= 3


@pytest.mark.parametrize("line", commands())
def test_readme_command_runs(line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = [str(tmp_path / Path(a).name) if a.startswith("/tmp/") else a
            for a in shlex.split(line)[1:]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for quoted in quotes(line):
        assert quoted in out
    if line.startswith("onnxrep quantize") and "--eval" in line:
        # INT8 top-1 depends on the CPU's int8 kernels (AVX2 saturates u8s8 pairs, VNNI does not)
        stated = float(re.search(r"\(\d+\.\d+ -> (\d+\.\d+) top-1", README).group(1))
        measured = float(re.search(r"^top-1\s+\S+\s+(\d+\.\d+)", out, re.M).group(1))
        assert abs(measured - stated) <= 0.3


def quotes(line: str) -> list[str]:
    """Figures the README states for a command's output."""
    if line.startswith("onnxrep quantize") and "--eval" in line:
        return [re.search(r"\((\d+\.\d+) -> \d+\.\d+ top-1", README).group(1)]
    if line.startswith("onnxrep optimize") and "--calib" not in line:
        return [re.search(r"(equalized \d+/\d+ pairs in \d+ rounds)", README).group(1),
                re.search(r"(worst spread \d+ -> [\d.]+)", README).group(1)]
    return []
