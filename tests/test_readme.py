"""The README's Python API tour runs as written (with 3 steps, fewer prompts and output under a temporary directory)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_tour_runs(tmp_path, monkeypatch):
    code = _api_block()
    small = {"steps=300": "steps=3", "tokenizer, 200,": "tokenizer, 48,", "tokenizer, 2000,": "tokenizer, 64,"}
    for old, new in small.items():
        assert old in code, old  # the tour still has what we shrink
        code = code.replace(old, new)
    assert '"runs/one"' in code and '"runs/cmp"' in code
    monkeypatch.chdir(tmp_path)  # runs/one and runs/cmp land in the temp dir
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert (tmp_path / "runs/one/student/config.json").exists()
    assert (tmp_path / "runs/one/metrics.jsonl").read_text().count("step_seconds") == 3
    assert (tmp_path / "runs/cmp/report.html").exists()
    assert 0 < scope["result"].trained_fraction < 0.2
