"""Read bandwidth of the GPU's L2 (and of HBM), the ceiling the prefill GEMMs' operand traffic runs against.

Each Triton program reads 16 KB blocks of an int32 buffer in turn (program i, then i + programs, ... wrapping
over the buffer), 400 blocks a program, and sums them so that the loads are not dropped. A buffer well inside
the L2 (8-40 MB on an H100, 50 MB of L2) measures the L2's read rate; 512 MB measures HBM.
Median of `triton.testing.do_bench`.

    python benchmarks/l2_bandwidth.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _read_blocks(x_ptr, out_ptr, n_elems, iters, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    offs = tl.arange(0, BLOCK)
    blocks = n_elems // BLOCK
    for i in range(iters):
        block = (pid + i * programs) % blocks
        acc += tl.load(x_ptr + block * BLOCK + offs)
    tl.store(out_ptr + pid * BLOCK + offs, acc)


def read_tbps(buffer_mb: int, programs: int, iters: int = 400, block: int = 4096) -> float:
    """TB/s read by `programs` programs of `iters` blocks of `block` int32 each from a `buffer_mb` MB buffer."""
    n = buffer_mb * (1 << 20) // 4
    x = torch.randint(0, 100, (n,), device="cuda", dtype=torch.int32)
    out = torch.empty(programs * block, device="cuda", dtype=torch.int32)
    ms = triton.testing.do_bench(lambda: _read_blocks[(programs,)](x, out, n, iters, BLOCK=block, num_warps=8),
                                 warmup=50, rep=300)
    return programs * iters * block * 4 / (ms * 1e-3) / 1e12


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("l2_bandwidth.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
    for buffer_mb in (8, 24, 40, 512):
        for per_sm in (2, 4, 8):
            tbps = read_tbps(buffer_mb, per_sm * props.multi_processor_count)
            print(f"buffer {buffer_mb} MB, {per_sm} programs an SM: {tbps:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
