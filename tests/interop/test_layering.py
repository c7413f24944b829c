"""ldmkit.interop is pure torch/safetensors at run time: diffusers and transformers are test-only references."""

from __future__ import annotations

import subprocess
import sys


def test_interop_imports_no_reference_libraries() -> None:
    code = ("import sys, ldmkit.interop.convert, ldmkit.interop.sd_import, ldmkit.interop.sd_export, ldmkit.interop.single_file; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'lightning', 'hydra'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
