"""The README's SDK example is executed as written, so the documentation cannot drift from the code."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


def test_readme_sdk_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Packets get lost; tokens should not." in out.stdout
    assert "digest verified" in out.stdout


def test_readme_kv_example_runs():
    code = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "fetch_kv" in b)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "200 tokens of KV" in out.stdout and "deadline met: True" in out.stdout
    # 200 stored tokens are three whole 64-token chunks and a shorter one: the next turn reuses all four
    assert "next turn: 200 tokens of KV, 50 to prefill" in out.stdout
