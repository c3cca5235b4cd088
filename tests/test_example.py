"""The toy SN-GAN example runs end to end (short) and writes its picture."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sngan_toy_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "toy.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "sngan_toy.py"), "--steps", "150",
                           "--out", str(out), "--tolerance", "0.2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.stat().st_size > 10_000
    assert "|W/sigma|_2" in proc.stdout
