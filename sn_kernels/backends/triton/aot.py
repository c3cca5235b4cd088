"""Ahead-of-time compilation of every kernel, for every dtype and tile config of the table.

``python -m sn_kernels.backends.triton.aot [--arch 90]`` compiles them all for a CUDA
target without a GPU (the real compiler catches code the interpreter accepts)
and prints one line per kernel plus a summary; exit status 1 on any failure.
Must run WITHOUT TRITON_INTERPRET (the interpreter replaces @jit functions).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64"}


def configs():
    """Yield (name, kernel, signature, constexprs, num_warps) for every variant the host launches."""
    from . import host
    from . import kernels as K

    tiles = sorted({t for cls in host.TILES.values() for t in cls.values()})
    for dt, ptr in PTR.items():
        acc = "*fp64" if dt == "float64" else "*fp32"
        # (x, y_prev): the first pass of "vu"/"uv" reads the stored vectors (ptr, ptr), its second
        # pass the acc vector with the stored previous one (acc, ptr), later iterations (acc, acc)
        vectors = sorted({(ptr, ptr), (acc, ptr), (acc, acc)})
        for bm, bn, warps in tiles:
            for kern in (K.row_pass_kernel, K.col_pass_kernel):
                for x, prev in vectors:
                    for split in (False, True):
                        for two in (False, True):
                            sig = {"W": ptr, "x": x, "y_raw": acc, "y_prev": prev, "partials": acc, "counter": "*i32",
                                   "y_acc": acc, "y_out": ptr, "y_copy": ptr, "sigma": acc, "y_part": acc,
                                   "M": "i32", "N": "i32", "B": "i32", "MB": "i32", "eps": "fp64", "K_SPLIT": "i32",
                                   "final": "i32"}
                            cx = {"SPLIT": split, "TWO_STAGE": two, "BLOCK_M": bm, "BLOCK_N": bn,
                                  "BLOCK_V": host.FINISH_BLOCK, "SPLIT_BLOCK": host.SPLIT_BLOCK}
                            yield f"{kern.__name__}[{dt},x={x},prev={prev},{bm}x{bn},split={split},two={two}]", \
                                kern, sig, cx, warps
            for split in (False, True):
                sig = {"W": ptr, "u": ptr, "v": ptr, "partials": acc, "counter": "*i32", "u_copy": ptr,
                       "v_copy": ptr, "sigma": acc, "M": "i32", "N": "i32", "B": "i32", "MB": "i32", "K_SPLIT": "i32"}
                cx = {"SPLIT": split, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_V": host.FINISH_BLOCK}
                yield f"eval_pass_kernel[{dt},{bm}x{bn},split={split}]", K.eval_pass_kernel, sig, cx, warps
        w = host.ELEM_WARPS
        yield f"divide_kernel[{dt}]", K.divide_kernel, \
            {"W": ptr, "sigma": acc, "out": ptr, "numel": "i32"}, {"BLOCK": host.ELEM_BLOCK}, w
        yield f"dot_pass_kernel[{dt}]", K.dot_pass_kernel, \
            {"G": ptr, "W": ptr, "partials": acc, "counter": "*i32", "sigma": acc, "c_out": acc, "numel": "i32",
             "CHUNK": "i32"}, {"BLOCK": host.ELEM_BLOCK, "BLOCK_V": host.FINISH_BLOCK}, w
        yield f"grad_pass_kernel[{dt}]", K.grad_pass_kernel, \
            {"G": ptr, "u": ptr, "v": ptr, "c_ptr": acc, "sigma": acc, "out": ptr, "numel": "i32", "M": "i32",
             "B": "i32"}, {"BLOCK": host.ELEM_BLOCK}, w
        yield from _group_configs(dt, ptr, acc)


def _group_configs(dt: str, ptr: str, acc: str):
    """The multi-tensor kernels (group_kernels.py) as group_host launches them: int64 address, meta and
    item tables; the mat-vec passes for each (X_STORED, PREV_STORED) that an iteration uses (first pass
    of the first iteration, its second pass, later ones), SPLIT and TWO_STAGE, in place (and once not)."""
    from . import group_host as GH
    from . import group_kernels as GK
    from . import host

    tables = {"ptrs": "*i64", "meta": "*i64", "items": "*i64"}
    passes = {**tables, "ws": acc, "counters": "*i32", "used": ptr, "sigmas": acc, "eps": "fp64", "final": "i32"}
    stored = [(True, True), (False, True), (False, False)]  # (X_STORED, PREV_STORED)
    for kern, (bm, bn, warps) in ((GK.group_row_kernel, GH.ROW_TILE), (GK.group_col_kernel, GH.COL_TILE)):
        variants = [(x, prev, True, split, two) for x, prev in stored for split in (False, True) for two in (False, True)]
        for x, prev, in_place, split, two in variants + [(True, True, False, False, False)]:
            cx = {"X_STORED": x, "PREV_STORED": prev, "IN_PLACE": in_place, "SPLIT": split, "TWO_STAGE": two,
                  "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_V": host.FINISH_BLOCK, "SPLIT_BLOCK": host.SPLIT_BLOCK}
            yield (f"{kern.__name__}[{dt},x_stored={x},prev_stored={prev},in_place={in_place},split={split},"
                   f"two={two}]"), kern, passes, cx, warps
    bm, bn, warps = GH.ROW_TILE
    for split in (False, True):
        sig = {k: passes[k] for k in ("ptrs", "meta", "items", "ws", "counters", "used", "sigmas")}
        cx = {"SPLIT": split, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_V": host.FINISH_BLOCK}
        yield f"group_eval_kernel[{dt},split={split}]", GK.group_eval_kernel, sig, cx, warps
    w = host.ELEM_WARPS
    yield f"group_divide_kernel[{dt}]", GK.group_divide_kernel, {**tables, "sigmas": acc, "out": ptr}, \
        {"CHUNK": GH.CHUNK, "BLOCK": host.ELEM_BLOCK}, w
    for flat in (False, True):
        yield f"group_dot_kernel[{dt},flat={flat}]", GK.group_dot_kernel, \
            {**tables, "ws": acc, "counters": "*i32", "cs": acc, "out": ptr, "g_flat": ptr, "sigmas": acc}, \
            {"FLAT": flat, "CHUNK": GH.CHUNK, "BLOCK": host.ELEM_BLOCK, "BLOCK_V": host.FINISH_BLOCK}, w
        yield f"group_grad_kernel[{dt},flat={flat}]", GK.group_grad_kernel, \
            {**tables, "cs": acc, "out": ptr, "g_flat": ptr, "used": ptr, "sigmas": acc}, \
            {"FLAT": flat, "CHUNK": GH.CHUNK, "BLOCK": host.ELEM_BLOCK}, w


def stop_at_llir() -> None:
    """Make triton.compile stop after LLVM IR: for machines without a working ptxas
    (the PTX and cubin stages need it). Still catches what the interpreter lets through."""
    from triton import knobs

    os.environ.setdefault("TRITON_MOCK_PTX_VERSION", "12.8")  # the backend hash asks ptxas its version

    def hook(backend=None, stages=None, options=None, language=None, capability=None):
        if stages is None:  # asked for a cache key: keep these builds apart from full ones
            return "sn_kernels_stop_at_llir_v3", "v3"
        stages.pop("ptx", None)
        stages.pop("cubin", None)
        make_llir = stages["llir"]

        def llir(src, metadata):
            ir = make_llir(src, metadata)
            # the PTX stage names the kernel; without it, take the name from the LLVM IR
            metadata.setdefault("name", re.search(r"define\s[^@]*@([A-Za-z_][A-Za-z0-9_]*)", ir).group(1))
            return ir

        stages["llir"] = llir
        stages["cubin"] = lambda src, metadata: b""  # CompiledKernel insists on a binary

    knobs.runtime.add_stages_inspection_hook = hook


def ptxas_works(arch: int = 90) -> bool:
    """Whether triton finds a ptxas that runs (triton wheels ship one)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        return bool(get_ptxas_version(arch))
    except Exception:
        return False


def compile_one(kernel, signature, constexprs, num_warps, arch=90, aligned=False):
    """Compile one variant for ``cuda:arch``; return the compiled kernel (its .asm has ttir..cubin).

    ``aligned``: mark every pointer and every int argument but ``final`` divisible by 16, as
    the JIT does for 16-byte aligned tensors and sizes that are multiples of 16 (the variant
    a large power-of-two weight runs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})  # triton >= 3.2 lists constexprs in the signature too
    sig = {name: sig[name] for name in kernel.arg_names}  # in argument order
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if aligned and name != "final" and (ty.startswith("*") or ty == "i32")}
    src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def resources(compiled, arch: int = 90) -> str:
    """'regs R, spill S B, smem M B' of a compiled variant, from ``ptxas -v`` on its PTX (no GPU needed)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return (f"regs {regs.group(1) if regs else '?'}, spill {spill.group(1) if spill else '?'} B, "
            f"smem {compiled.metadata.shared} B")


def dump(compiled, name: str, folder: str) -> None:
    """Write the variant's PTX and its SASS (cuobjdump from triton's package) to ``folder``."""
    import subprocess

    from triton import knobs

    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, re.sub(r"[^A-Za-z0-9_.=-]+", "_", name))
    with open(stem + ".ptx", "w") as f:
        f.write(compiled.asm["ptx"])
    with open(stem + ".cubin", "wb") as f:
        f.write(compiled.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with open(stem + ".sass", "w") as f:
        subprocess.run([cuobjdump, "-sass", stem + ".cubin"], stdout=f, stderr=subprocess.STDOUT)


def main(argv=None) -> int:
    """Compile everything; print one line each and a summary; 0 when all compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET (the interpreter replaces @triton.jit functions)", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="one tile config per kernel and dtype")
    ap.add_argument("--dtype", choices=sorted(PTR), action="append", help="only these weight dtypes")
    ap.add_argument("--stop-at-llir", action="store_true", help="skip PTX/cubin (forced when ptxas is missing)")
    ap.add_argument("--report", action="store_true", help="print registers, spills and shared memory per variant")
    ap.add_argument("--only", default=None, help="only variants whose name contains this string")
    ap.add_argument("--aligned", action="store_true", help="pointers and sizes divisible by 16 (the JIT's variant "
                    "for large power-of-two weights)")
    ap.add_argument("--dump", default=None, help="folder: write each variant's PTX and SASS there")
    args = ap.parse_args(argv)
    final = "cubin"
    if args.stop_at_llir or not ptxas_works(args.arch):
        print("aot: no working ptxas (or --stop-at-llir): compiling to LLVM IR only")
        stop_at_llir()
        final = "llir"
    failures, n, seen = 0, 0, set()
    for name, kernel, sig, cx, warps in configs():
        if args.dtype and name.split("[")[1].split(",")[0].rstrip("]") not in args.dtype:
            continue
        if args.only and args.only not in name:
            continue
        key = (kernel.__name__, tuple(sig.values()), cx.get("SPLIT"), cx.get("TWO_STAGE"))  # --quick: one tile
        if args.quick and key in seen:
            continue
        seen.add(key)
        n += 1
        try:
            compiled = compile_one(kernel, sig, cx, warps, args.arch, args.aligned)
            if args.dump and final == "cubin":
                dump(compiled, name, args.dump)
            stages = [s for s in ("ttir", "ttgir", "llir", "ptx", "cubin") if s in compiled.asm]
            ok = len(compiled.asm.get(final) or "") > 0
            extra = f"  [{resources(compiled, args.arch)}]" if args.report and final == "cubin" else ""
            print(f"{'ok ' if ok else 'BAD'} {name}: {'/'.join(stages)}{extra}")
            failures += not ok
        except Exception:
            failures += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
    print(f"aot sm_{args.arch}: {n - failures}/{n} kernel variants compiled to {final}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
