"""Compile every kernel for the H100 (sm_90) without a GPU and report its resources.

Triton's wheel carries ptxas and cuobjdump, so a CPU machine can check what the interpreter cannot: each
kernel compiles for Hopper in the dtypes and block configs the GPU runs, the attention dots become
warpgroup tensor-core instructions (wgmma), shared memory fits, nothing spills to local memory, and how
many registers a thread holds. Speed still needs a GPU.

    python -m ditengine.bench.sm90 [--json PATH]

Needs native Triton: run without TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

SHARED_LIMIT = 227 * 1024  # usable shared memory per block on an H100


def compile_sm90(fn, pointers: dict, scalars: dict, constexprs: dict, num_warps=4, num_stages=3):
    """Compile `fn` for sm_90: pointers name -> element type ("bf16"), scalars name -> "i32" / "i64" / "fp32"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers
                 else scalars[name] for name in fn.arg_names}
    index = {name: i for i, name in enumerate(fn.arg_names)}
    src = ASTSource(fn=fn, signature=signature, constexprs={(index[k],): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(kernel) -> dict:
    """Registers and local memory per thread (cuobjdump's report) and shared memory per block."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        report = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", report).group(1)),
            "local_bytes": int(re.search(r"LOCAL:(\d+)", report).group(1)),
            "shared_bytes": kernel.metadata.shared, "wgmma": "wgmma.mma_async" in kernel.asm["ptx"]}


def attention_case(dtype, head_dim, head_split=True, config=None, key_lens=False):
    """The attention kernel as the GPU launches it: self-attention, or with `key_lens` cross-attention."""
    from ditengine.kernels.attention import PINNED_GPU, PINNED_GPU_FP32, _attention_fwd_kernel, head_blocks

    config = config or (PINNED_GPU_FP32 if dtype == "fp32" else PINNED_GPU)
    d1, d2 = head_blocks(head_dim, head_split)
    strides = [n for n in _attention_fwd_kernel.arg_names if n.startswith("stride")]
    return compile_sm90(
        _attention_fwd_kernel, {**{p: dtype for p in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}, "lens_ptr": "i64"},
        {**dict.fromkeys(strides, "i64"), "H": "i32", "T_Q": "i32", "T_K": "i32", "qk_scale": "fp32"},
        dict(HEAD_DIM=head_dim, D1=d1, D2=d2, PRECISION="ieee" if dtype == "fp32" else "tf32", KEY_LENS=key_lens,
             BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"]), config["num_warps"], config["num_stages"])


def adaln_cases(x_dtype, y_dtype):
    from ditengine.kernels.adaln import _adaln_modulate_kernel, _gated_residual_adaln_kernel

    second = dict(shift2_ptr=y_dtype, scale2_ptr=y_dtype, y2_ptr=y_dtype)
    for fn, pointers in ((_adaln_modulate_kernel, dict(x_ptr=x_dtype, shift_ptr=y_dtype, scale_ptr=y_dtype,
                                                       weight_ptr=y_dtype, y_ptr=y_dtype, **second)),
                         (_gated_residual_adaln_kernel, dict(x_ptr=x_dtype, gate_ptr=y_dtype, o_ptr=y_dtype,
                                                             shift_ptr=y_dtype, scale_ptr=y_dtype, weight_ptr=y_dtype,
                                                             x_out_ptr=x_dtype, y_ptr=y_dtype, **second))):
        scalars = {n: "i64" for n in fn.arg_names if n.startswith("stride")} | {"T": "i32", "D": "i32", "eps": "fp32"}
        # DiT's LayerNorm at D = 1152, ACE-Step 1.5's weighted RMSNorm at D = 2048, and SD3.5's one LayerNorm
        # with two modulations (its dual-attention layers) at D = 1536.
        for label, flags in (("", dict(RMS=False, HAS_WEIGHT=False, SECOND=False)),
                             (" rms+weight", dict(RMS=True, HAS_WEIGHT=True, SECOND=False)),
                             (" second", dict(RMS=False, HAS_WEIGHT=False, SECOND=True))):
            yield f"{fn.__name__}{label}", compile_sm90(fn, pointers, scalars, dict(BLOCK_D=2048, **flags),
                                                        num_warps=8)


def scheduler_step_case(all_on: bool):
    from ditengine.kernels.scheduler_step import BLOCK, NUM_COLUMNS, _scheduler_step_kernel

    flags = dict.fromkeys(("HAS_CFG", "HAS_HISTORY", "HAS_HISTORY2", "HAS_NOISE", "CLIP", "LEARNED", "WRITE_NEXT",
                           "NEXT_TWICE", "STEP_FROM_PTR"), all_on)
    return compile_sm90(
        _scheduler_step_kernel,
        dict(x_ptr="fp32", out_ptr="bf16", coef_ptr="fp32", step_ptr="i64", hist_ptr="fp32", hist2_ptr="fp32",
             noise_ptr="fp32", x_next_ptr="fp32", next_in_ptr="bf16"),
        dict(N="i32", HW="i32", C="i32", MODEL_C="i32", HALF="i32", k="i32", cfg_scale="fp32", step_const="i32"),
        dict(flags, NCOL=NUM_COLUMNS, BLOCK=BLOCK))


def cases(quick: bool = False):
    """(name, kind, compile thunk) for every kernel variant the GPU path launches; `quick` skips the
    attention autotune sweep and two head dims."""
    from ditengine.kernels.attention import _autotune_configs

    variants = [("bf16", 72, True), ("bf16", 72, False), ("fp16", 64, True), ("bf16", 128, True), ("fp32", 128, True)]
    for dtype, head_dim, split in [variants[0], variants[1], variants[4]] if quick else variants:
        yield (f"attention {dtype} Dh={head_dim}{'' if split else ' padded'} (pinned)", "attention",
               lambda d=dtype, h=head_dim, s=split: attention_case(d, h, s))
    for config in [] if quick else _autotune_configs():
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        yield (f"attention bf16 Dh=72 {meta}", "attention", lambda m=meta: attention_case("bf16", 72, config=m))
    for x_dtype, y_dtype in (("bf16", "bf16"), ("fp32", "bf16"), ("fp16", "fp16")):
        for name, kernel in adaln_cases(x_dtype, y_dtype):
            yield f"{name.strip('_')} x={x_dtype} y={y_dtype}", "adaln", lambda k=kernel: k
    for all_on in (True, False):
        yield f"scheduler_step flags {'all on' if all_on else 'all off'}", "scheduler_step", \
            lambda a=all_on: scheduler_step_case(a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditengine.bench.sm90", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--quick", action="store_true", help="skip the attention autotune sweep and two head dims")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this report compiles")
    rows = []
    for name, kind, build in cases(args.quick):
        try:
            rows.append({"kernel": name, "kind": kind, **resources(build())})
        except Exception as err:  # report every failure, not just the first
            rows.append({"kernel": name, "kind": kind, "error": f"{type(err).__name__}: {err}"[:500]})
    print("| kernel | registers | local B | shared B | wgmma |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kernel']} | compile failed: {r['error'][:120]} | | | |")
        else:
            print(f"| {r['kernel']} | {r['registers']} | {r['local_bytes']} | {r['shared_bytes']} | {r['wgmma']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
