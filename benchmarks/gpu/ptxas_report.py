"""Registers, spills and occupancy per kernel from `nvcc -Xptxas -v` output (static evidence, no GPU).

    nvcc ... -Xptxas -v 2> ptxas.txt; python benchmarks/gpu/ptxas_report.py ptxas.txt [--arch sm_90] [--threads 256]

Occupancy: blocks of THREADS threads resident per SM from the register file alone (64 K registers,
allocated per warp in units of 256; at most 2048 threads and 32 blocks per SM on sm_80/sm_90).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except Exception:
        return names


def short(sig: str) -> str:
    """'void sn_kernels::(anonymous namespace)::row_dot_kernel<float, ...>(...)' -> 'row_dot_kernel<float, ...>'."""
    name = sig.removeprefix("void ").replace("(anonymous namespace)::", "")
    name = name.split("(")[0].replace("sn_kernels::", "").replace("c10::", "")
    return re.sub(r"\bat::cuda::detail::IntDivider<unsigned int>", "Div32", name)


def blocks_per_sm(regs: int, threads: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    warps = threads // 32
    by_regs = 65536 // (per_warp * warps) if regs else 32
    return max(0, min(by_regs, 2048 // threads, 32))


def parse(text: str, arch: str):
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current[1] == arch:
            rows.append((current[0], int(m.group(1)), spill))
            current = None
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--threads", type=int, default=256)
    ap.add_argument("--grep", default=None, help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    rows = parse(open(args.file).read(), args.arch)
    names = demangle([r[0] for r in rows])
    out = sorted((short(n), regs, spill) for n, (_, regs, spill) in zip(names, rows))
    print(f"{'kernel':72s} regs spill blocks/SM({args.threads})")
    for name, regs, spill in out:
        if args.grep and args.grep not in name:
            continue
        print(f"{name:72s} {regs:4d} {spill:5d} {blocks_per_sm(regs, args.threads):3d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
