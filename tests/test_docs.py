"""The documentation site builds with no warning (mkdocs --strict), API reference included."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("material")
ROOT = Path(__file__).resolve().parent.parent


def test_site_builds_strictly_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    conversion = (site / "api" / "conversion" / "index.html").read_text()
    # docstring examples highlighted as code (a ">>>" prompt span), not read as Markdown block quotes
    assert "gate_sites" in conversion and '<span class="gp">&gt;&gt;&gt; </span>' in conversion
    assert ":func:" not in conversion
    assert "GateCallback" in (site / "api" / "logging" / "index.html").read_text()
    assert "register_model" in (site / "api" / "adapters" / "index.html").read_text()
