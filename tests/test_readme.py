"""The README's Python API example runs as written (against a real worker on loopback)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .support import REPO, RunningWorker, make_file


def test_python_api_example_runs(
    worker: RunningWorker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8081", worker.url)
    make_file(tmp_path / "model.gguf", 20 * 1024 * 1024)
    monkeypatch.chdir(tmp_path)
    for var, sub in (("STAGING_CLI_STATE_DIR", "state"), ("STAGING_CLI_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    exec(compile(source, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "sent 20971520 bytes" in out and '"event": "file_started"' not in out
    assert "'event': 'progress'" in out
    assert os.listdir(worker.dir / "blobs" / "sha256")
