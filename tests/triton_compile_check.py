"""Compiles every dsmtp Triton kernel for Hopper (sm90) on this machine, GPU or not: Triton's wheel
brings the compiler down to the cubin. Catches what Triton's interpreter lets through (globals that are
not constexpr, type errors in the lowering) before a GPU run does. Run with TRITON_INTERPRET unset:

    python -m tests.triton_compile_check      # one line per kernel, exit status 1 if any failed
"""

import os
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsmtp.model import cross_entropy_triton, moe_triton
from dsmtp.train import multi_tensor_adamw

HOPPER = GPUTarget("cuda", 90, 32)
ROW_TILES = {"BLOCK_ROWS": moe_triton.BLOCK_ROWS, "BLOCK_COLUMNS": moe_triton.BLOCK_COLUMNS}

# kernel -> (argument types in order, constexpr values): the types the launches in dsmtp pass
KERNELS = {
    "moe_triton._gather_rows": (
        moe_triton._gather_rows,
        ["*bf16", "*i64", "*fp32", "*bf16", "i32", "i32"],
        dict(HAS_SCALE=True, OUT_DTYPE=tl.bfloat16, **ROW_TILES)),
    "moe_triton._swiglu_backward": (
        moe_triton._swiglu_backward,
        ["*bf16", "*bf16", "*bf16", "i32", "i32"],
        dict(OUT_DTYPE=tl.bfloat16, **ROW_TILES)),
    "cross_entropy_triton._cross_entropy_rows": (
        cross_entropy_triton._cross_entropy_rows,
        ["*bf16", "*i64", "*fp32", "*i1", "i32"],
        dict(BLOCK=cross_entropy_triton.BLOCK)),
    "multi_tensor_adamw._adamw_blocks": (
        multi_tensor_adamw._adamw_blocks,
        ["*i64", "*i32", "*i64", "*i64", "i32", "*fp32", "*fp32", "*u8"] + ["fp32"] * 6,
        dict(PARAM_DTYPE=tl.float32, MOMENT_DTYPE=tl.bfloat16, HAS_MASTER=False,
             BLOCK=multi_tensor_adamw.LAUNCH[torch.float32][0], ITERS=4)),
    "multi_tensor_adamw._adamw_blocks[bf16_params_fp32_masters]": (
        multi_tensor_adamw._adamw_blocks,
        ["*i64", "*i32", "*i64", "*i64", "i32", "*fp32", "*fp32", "*u8"] + ["fp32"] * 6,
        dict(PARAM_DTYPE=tl.bfloat16, MOMENT_DTYPE=tl.bfloat16, HAS_MASTER=True,
             BLOCK=multi_tensor_adamw.LAUNCH[torch.bfloat16][0], ITERS=4)),
    "multi_tensor_adamw._sum_squares_blocks": (
        multi_tensor_adamw._sum_squares_blocks,
        ["*i64", "*i32", "*i64", "*i64", "*fp32"],
        dict(DTYPE=tl.bfloat16, BLOCK=multi_tensor_adamw.LAUNCH[torch.bfloat16][0], ITERS=4)),
}


def compile_for_hopper(kernel, types: list[str], constexprs: dict) -> None:
    names = kernel.arg_names
    signature = dict(zip(names, types + ["constexpr"] * len(constexprs)))
    assert list(signature) == names and set(constexprs) == set(names[len(types):]), f"{names} against the table"
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=HOPPER)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: the kernels are interpreted, not compiled; unset it")
        return 2
    failed = 0
    for name, (kernel, types, constexprs) in KERNELS.items():
        try:
            compile_for_hopper(kernel, types, constexprs)
            print(f"compiled {name}")
        except Exception as err:
            failed += 1
            print(f"FAILED {name}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
