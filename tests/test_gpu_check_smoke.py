"""The CPU dress rehearsal of the GPU check (issue 14): the whole path of benchmarks/gpu_check.py
with the triton backend under TRITON_INTERPRET=1 and tiny shapes, the benchmark harness
(benchmarks/run.py: one compile per case, no recompile while timing, resume, report) and the
GPU step scripts' own logic (dry runs, as a rehearsal and as on a cold machine that builds first; a
failing build), so harness bugs fail CI rather than a GPU run."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["step1_build_test.sh", "step2_checks.sh", "step3_bench.sh", "step4_compile.sh"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "SN_KERNELS_BACKEND"}
    env.update(TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(args, env, timeout=300):
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_check_smoke_triton(tmp_path):
    out = _run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--backend", "triton", "--out", str(tmp_path)],
               _env())
    assert re.search(r"(\d+)/\1 checks passed", out), out[-3000:]
    path = tmp_path / "gpu_check_smoke_triton.csv"  # one CSV per backend: native no longer overwrites triton
    rows = list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))
    steps = {r["step"] for r in rows}
    assert {"vs-torch", "determinism", "cuda-graph", "autocast", "torch.compile"} <= steps, steps
    assert all(r["ok"] == "PASS" for r in rows), rows
    assert any("independent Adam states" in r["case"] for r in rows)
    assert any("train step" in r["case"] and "replays vs eager" in r["case"] for r in rows)


def test_run_py_rehearsal(tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"tiny": [{"name": "a", "shape": [24, 40]}, {"name": "b", "shape": [6, 4, 3, 3]}],
                                  "single_dim1": [{"name": "c", "shape": [6, 8, 2, 2], "dim": 1}]}))
    out_csv = tmp_path / "bench.csv"
    args = [sys.executable, "benchmarks/run.py", "--device", "cpu", "--shapes", str(shapes),
            "--sets", "tiny,single_dim1", "--per-weight", "single_dim1", "--providers", "torch_param,torch_compile,sn_kernels_native",
            "--modes", "fwd,fwd_bwd", "--reps", "2", "--warmup", "1", "--compile-backend", "aot_eager",
            "--out", str(out_csv)]
    _run(args, _env())
    rows = list(csv.DictReader(out_csv.open()))
    cases = {(r["provider"], r["shape_set"], r["mode"]) for r in rows}
    assert len(rows) == len(cases) == 3 * 2 * 2, rows
    assert ("sn_kernels_native", "single_dim1/6x8x2x2.dim1", "fwd_bwd") in cases
    compiled = [r for r in rows if r["provider"] == "torch_compile"]
    assert compiled and all("no recompile while timing" in r["note"] for r in compiled), compiled
    assert all(float(r["median_ms"]) > 0 for r in rows), rows
    assert all(r["sn_kernels"].startswith("0.") and r["python"] for r in rows), rows  # provenance of each row
    _run(args + ["--resume"], _env())  # nothing left to run: no new rows
    assert len(list(csv.DictReader(out_csv.open()))) == len(rows)
    report = _run([sys.executable, "benchmarks/run.py", "--report", str(out_csv)], _env())
    assert "| tiny | float32 | fwd_bwd | sn_kernels_native |" in report


def test_gpu_step_scripts_dry_run(tmp_path):
    """The step scripts in rehearsal + dry mode: their own logic, budget and output files
    (at most 8 plain-named files per step folder, as the device tool brings back)."""
    env = _env(SN_GPU_REHEARSAL="1", SN_GPU_DRY="1", PYTHON=sys.executable, SN_GPU_WORK=str(tmp_path / "work"))
    for step in STEPS:
        outdir = tmp_path / step.split("_")[0]
        out = _run(["bash", f"benchmarks/gpu/{step}", str(outdir)], env, timeout=120)
        assert "done: 0 part(s) failed" in out, out[-3000:]
        files = sorted(p.name for p in outdir.iterdir())
        assert 0 < len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
        assert "summary.txt" in files
        text = (ROOT / "benchmarks" / "gpu" / step).read_text()
        assert "common.sh" in text and "finish" in text


# stands in for the GPU machine's python in the step scripts: answers their own questions (device name,
# CUDA kernels built?), writes the plot that `run.py --report X.csv` writes, and builds as STUB_PIP_RC says
STUB_PYTHON = r"""#!/usr/bin/env bash
case "$*" in
  *"pip install"*) echo "SN_KERNELS_BUILD=${SN_KERNELS_BUILD:-unset}"; echo "csrc/ops.cu(7): error: stub failure"
                   exit "${STUB_PIP_RC:-0}" ;;
  *has_kernel*) exit "${STUB_HAS_CUDA:-0}" ;;
  *get_device_name*) echo STUB_GPU ;;
  *--report*) for last; do :; done; touch "${last%.csv}.png" ;;
esac
exit 0
"""


def _stub_python(tmp_path) -> str:
    path = tmp_path / "python"
    path.write_text(STUB_PYTHON)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("rehearsal", ["0", "1"])
def test_gpu_step_scripts_files_on_a_cold_machine(tmp_path, rehearsal):
    """Dry runs that build first, as on a fresh machine (rehearsal 0), with the files each command would
    write: at most 8 per step folder, the build log kept on the machine (step 1 brings it back)."""
    py = _stub_python(tmp_path)
    found = {}
    for step in STEPS:
        env = _env(SN_GPU_REHEARSAL=rehearsal, SN_GPU_DRY="1", PYTHON=py, SN_GPU_WORK=str(tmp_path / f"work_{step}"))
        outdir = tmp_path / step.split("_")[0]
        out = _run(["bash", f"benchmarks/gpu/{step}", str(outdir)], env, timeout=120)
        assert "done: 0 part(s) failed" in out, out[-3000:]
        found[step] = sorted(p.name for p in outdir.iterdir())
        assert len(found[step]) <= 8, found
    dev = "cpu-rehearsal" if rehearsal == "1" else "STUB_GPU"
    assert found["step3_bench.sh"] == sorted(["summary.txt", "bench.log", "ops.csv", f"{dev}.csv", f"{dev}.png",
                                              "report.md", "certified.csv", "certified.log"])
    assert ("build.log" in found["step1_build_test.sh"]) == (rehearsal == "0"), found
    assert not any("build.log" in found[s] for s in STEPS[1:]), found


@pytest.mark.parametrize("pip_rc, has_cuda", [(1, 1), (0, 1)], ids=["compile error", "built without CUDA"])
def test_gpu_step_stops_when_the_cuda_build_fails(tmp_path, pip_rc, has_cuda):
    """The build requires the CUDA kernels (SN_KERNELS_BUILD=cuda); a failed build stops the step with the
    compiler's errors in the summary (the end of the output) and writes no build stamp, and an extension
    built without them does too (it would time the C++ kernels and rebuild in every later step)."""
    work, outdir = tmp_path / "work", tmp_path / "s3"
    env = _env(PYTHON=_stub_python(tmp_path), SN_GPU_WORK=str(work), STUB_PIP_RC=str(pip_rc),
               STUB_HAS_CUDA=str(has_cuda))
    proc = subprocess.run(["bash", "benchmarks/gpu/step3_bench.sh", str(outdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert sorted(p.name for p in outdir.iterdir()) == ["build.log", "summary.txt"]
    assert "SN_KERNELS_BUILD=cuda" in (outdir / "build.log").read_text()
    summary = (outdir / "summary.txt").read_text()
    assert "csrc/ops.cu(7): error: stub failure" in summary and "build failed" in summary, summary
    assert not (work / "build.stamp").exists()
