"""The HTTP layer loads without torch: an ingress or a test of routes never pays for it."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_app_does_not_import_torch():
    code = "import sys, rerankd.api.app; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]", out
