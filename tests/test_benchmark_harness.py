"""The benchmark harness's own logic (benchmarks/run.py, _common.py, the CPU scripts, scripts/bench.sh):
what is timed, what a CSV records and which tree a script measures, on tiny shapes, so a harness bug
fails here rather than in a GPU run."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common  # noqa: E402
import run  # noqa: E402

CPU = torch.device("cpu")


def test_bwd_mode_flushes_the_l2_after_the_forward_right_before_the_timed_backward():
    """The untimed forward reads W (and writes W / sigma): a flush before it leaves W in the L2 for the
    timed backward, which the docstring says reads it from memory."""
    log = []
    case = run.Case("torch_param", [((8, 8), 0)], torch.float32, CPU)
    fwd = case.forward
    case.forward = lambda: (log.append("forward"), fwd())[1]

    def measure(fn):
        log.append("timed")
        fn()
        return 0.0

    case.samples("bwd", reps=1, warmup=0, measure=measure, sync=lambda: log.append("sync"),
                 flush=lambda: log.append("flush"))
    assert log == ["forward", "sync", "flush", "timed"]


def test_torch_compile_cases_start_from_a_fresh_dynamo():
    """Every case compiles the same forward again (a new parametrized class per module): from the 9th case
    on (dynamo's recompile limit, 1 here) torch_compile failed unless each case starts from a reset."""
    measure, sync = _common.timer(CPU)
    with torch._dynamo.config.patch(recompile_limit=1):
        for shape in ((4, 6), (6, 4), (5, 5)):
            case = run.Case("torch_compile", [(shape, 0)], torch.float32, CPU, compile_backend="eager")
            assert len(case.samples("fwd", 1, 1, measure, sync, _common._nothing)) == 1


def test_train_step_runs_the_discriminator_once_on_real_and_fake(monkeypatch):
    """D(real), D(fake), then backward fails under torch.compile in torch 2.11 (PyTorch's parametrization:
    'modified by an inplace operation'); one forward of both batches, as compile_time.py does, for every
    provider alike."""
    import models

    calls = []
    forward = models.SNGANDiscriminator.forward
    monkeypatch.setattr(models.SNGANDiscriminator, "forward", lambda self, x: (calls.append(len(x)), forward(self, x))[1])
    monkeypatch.setitem(run.TRAIN_BATCH, "cpu", 2)
    samples = run.train_step_samples("torch_param", torch.float32, CPU, reps=1, warmup=0)
    assert len(samples) == 1 and calls == [4]


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_names_the_tree(tmp_path, monkeypatch):
    """The commit of a tree, "+dirty" when it differs from it; without git (the GPU machine's copy) what
    $SN_KERNELS_COMMIT says, else "unknown"."""
    monkeypatch.delenv("SN_KERNELS_COMMIT", raising=False)
    assert _common.git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("SN_KERNELS_COMMIT", "abc1234+dirty")
    assert _common.git_commit(tmp_path) == "abc1234+dirty"
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    assert _common.git_commit(tmp_path) == "abc1234+dirty"  # a repository without a commit yet
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "a")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert _common.git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("b")
    assert _common.git_commit(tmp_path) == head + "+dirty"


def test_csv_records_the_tree_and_python_and_resume_keeps_an_older_csv_readable(tmp_path):
    """Each row carries sn_kernels' version and commit and the Python version; resuming a CSV written
    before those columns existed rewrites it under the new header instead of appending misaligned rows."""
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"tiny": [{"name": "a", "shape": [6, 4]}]}))
    out = tmp_path / "old.csv"
    old_fields = [f for f in run.FIELDS if f not in ("sn_kernels", "python")]
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields, restval="1")
        w.writeheader()
        w.writerow(dict(provider="torch_param", shape_set="tiny", mode="fwd", dtype="float32", device="x", torch="t",
                        triton="t", note="old"))
    run.main(["--device", "cpu", "--shapes", str(shapes), "--sets", "tiny", "--providers", "torch_param",
              "--modes", "fwd,bwd", "--reps", "1", "--warmup", "0", "--out", str(out), "--resume"])
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [(r["mode"], r["note"]) for r in rows] == [("fwd", "old"), ("bwd", "")]
    import sn_kernels

    new = rows[1]
    assert new["sn_kernels"] == f"{sn_kernels.__version__}+{_common.git_commit(ROOT)}"
    assert new["python"] == ".".join(map(str, sys.version_info[:3])) and rows[0]["python"] == ""
    assert float(new["median_ms"]) > 0 and new["torch"] == torch.__version__
    run.main(["--report", str(out)])  # and the report reads it back


def test_out_dir_sets_the_folder_of_the_default_csv(tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"tiny": [{"name": "a", "shape": [6, 4]}]}))
    run.main(["--device", "cpu", "--shapes", str(shapes), "--sets", "tiny", "--providers", "torch_param",
              "--modes", "fwd", "--reps", "1", "--warmup", "0", "--out-dir", str(tmp_path / "res")])
    name = _common.device_name(CPU).replace(" ", "_").replace("/", "_")
    assert (tmp_path / "res" / f"{name}.csv").is_file()


def test_bench_sh_runs_the_sets_own_tree_and_writes_into_the_repositorys_results(tmp_path):
    """--set newest builds sn_kernels in .venv-newest/src against that set's torch: bench.sh must run the
    benchmark there (as test.sh does), not in the repository root, whose build is the default set's."""
    for f in ("scripts/bench.sh", "scripts/sets.sh", "requirements/newest.txt"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "scripts" / "setup.sh").write_text("true\n")  # the environment is the test's stand-in
    py = tmp_path / ".venv-newest" / "bin" / "python"
    py.parent.mkdir(parents=True)
    (tmp_path / ".venv-newest" / "src").mkdir()
    py.write_text('#!/usr/bin/env bash\necho "cwd=$(pwd)"; printf "arg=%s\\n" "$@"\n')
    py.chmod(0o755)
    out = subprocess.run(["bash", "scripts/bench.sh", "--set", "newest", "--modes", "fwd"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == f"cwd={tmp_path / '.venv-newest' / 'src'}"
    args = [line.removeprefix("arg=") for line in out[1:]]
    assert args[0] == "benchmarks/run.py" and args[-2:] == ["--modes", "fwd"]
    assert args[args.index("--out-dir") + 1] == str(tmp_path / "benchmarks" / "results")


def _tree(tmp_path, scripts, sn_kernels=None):
    """A copy of benchmarks/ (``scripts`` and _common.py) beside ``sn_kernels`` (a folder to link, or a stub)."""
    (tmp_path / "benchmarks").mkdir(parents=True)
    for f in scripts + ["_common.py", "shapes.json"]:
        shutil.copy(ROOT / "benchmarks" / f, tmp_path / "benchmarks" / f)
    if sn_kernels is None:  # a stub that says where it was imported from
        (tmp_path / "sn_kernels").mkdir()
        (tmp_path / "sn_kernels" / "__init__.py").write_text("print('stub sn_kernels of the tree'); raise SystemExit(0)\n")
    else:
        (tmp_path / "sn_kernels").symlink_to(sn_kernels)
    return tmp_path


@pytest.mark.parametrize("script", ["cpu_native.py", "cpu_variants.py", "cpu_variants_conv.py", "cpu_layers.py"])
def test_cpu_scripts_import_their_own_tree(tmp_path, script):
    """Run as files, they must measure the sn_kernels beside them (as run.py does), not an installed one."""
    tree = _tree(tmp_path, [script])
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=tree, capture_output=True,
                          text=True, timeout=120)
    assert "stub sn_kernels of the tree" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_cpu_native_falls_back_to_the_bundled_shapes(tmp_path):
    """Without ../shared beside the clone (CI, the GPU machine) the bundled benchmarks/shapes.json is used."""
    tree = _tree(tmp_path / "clone", ["cpu_native.py"], ROOT / "sn_kernels")
    (tree / "benchmarks" / "shapes.json").write_text(json.dumps({"bundled_only": [{"name": "a", "shape": [8, 6]}]}))
    out = tmp_path / "native.csv"
    subprocess.run([sys.executable, "benchmarks/cpu_native.py", "--sets", "bundled_only", "--rounds", "1",
                    "--backward", "one", "--threads", "1", "--out", str(out)], cwd=tree,
                   check=True, capture_output=True, text=True, timeout=300)
    assert {r["shape_set"] for r in csv.DictReader(out.read_text().splitlines())} == {"bundled_only"}


def test_cpu_variants_writes_to_out(tmp_path):
    tree = _tree(tmp_path / "clone", ["cpu_variants.py"], ROOT / "sn_kernels")
    out = tmp_path / "variants.csv"
    subprocess.run([sys.executable, "benchmarks/cpu_variants.py", "--reps", "1", "--out", str(out)], cwd=tree, check=True, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert {r["variant"] for r in rows} == {"plain", "coeff_hard", "coeff_soft", "gain"}
    assert not (tree / "benchmarks" / "results").exists()


def test_cpu_layers_writes_one_row_per_case_and_mode_to_out(tmp_path):
    """The layer sweep (NOTES L4-L5): train and eval rows for both dims of each kept layer and dtype, ratios of
    ours to PyTorch's, nothing written into the tree's results."""
    tree = _tree(tmp_path / "clone", ["cpu_layers.py"], ROOT / "sn_kernels")
    out = tmp_path / "layers.csv"
    subprocess.run([sys.executable, "benchmarks/cpu_layers.py", "--only", "Linear(4096,1)", "--dtypes",
                    "float32,bfloat16", "--rounds", "1", "--out", str(out)], cwd=tree, check=True,
                   capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert {(r["dtype"], r["dim"], r["mode"]) for r in rows} == {
        (d, dim, m) for d in ("float32", "bfloat16") for dim in ("default", "1") for m in ("train", "eval")}
    assert all(r["layer"] == "Linear(4096,1)" and float(r["ratio"]) > 0 for r in rows)
    assert not (tree / "benchmarks" / "results").exists()


def test_engine_backward_accumulates_what_autograd_backward_does():
    """The grouped benchmark's backward (the engine called without torch.autograd.backward's Python
    checks) must give every weight the same .grad, accumulated, and free the graph as the public call."""
    torch.manual_seed(0)
    ws = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    grads = [torch.randn(3, 4), torch.randn(5)]

    def outputs():
        return [ws[0] * ws[0], ws[1].exp()]

    torch.autograd.backward(outputs(), grads)
    torch.autograd.backward(outputs(), grads)
    want = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    _common.engine_backward(outputs(), grads)
    _common.engine_backward(outputs(), grads)
    for w, g in zip(ws, want):
        assert torch.equal(w.grad, g)
    outs = outputs()
    _common.engine_backward(outs, grads)
    with pytest.raises(RuntimeError, match="second time"):
        _common.engine_backward(outs, grads)
