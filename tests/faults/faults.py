"""The faults: each one realistic mistake in one file, and the tests that must catch it.

A fault is a search/replace pair on one file of the repository: `old` must occur exactly once in `path` (else the
runner reports the fault as stale and it needs updating), `new` is the mistake. `tests` is the pytest selection
that must fail once the fault is in: test files (or node ids) and, optionally, a `-k` expression. Keep the
selection narrow (the test that exercises the faulty path, not the whole file): every fault runs it, and the
runner also runs it once on the unpatched tree, where it must pass.

`probe` (optional) is a small Python script run by `run.py --probe`: it computes the op's output and assigns it
to `out`, a tensor; the runner runs it on the unpatched and on the patched tree and reports whether the output
changed. That is how a fault is confirmed to be real (not a no-op) when no test catches it yet. The script runs
in the scratch copy's root with `tests/` on sys.path, after `import torch` and `import ditengine as de`, with
TRITON_INTERPRET=1 set (Triton on CPU runs through its interpreter).
"""
from __future__ import annotations

from dataclasses import dataclass

# The parallel runs on two and on four gloo processes.
SEQUENCE_2 = "tests/test_parallel.py::test_sequence_parallel_equals_one_process_on_every_rank[2]"
SEQUENCE_4 = "tests/test_parallel.py::test_sequence_parallel_equals_one_process_on_every_rank[4]"


@dataclass(frozen=True)
class Fault:
    name: str           # unique, kebab-case: what `--only` takes
    path: str           # repository-relative file the fault patches
    old: str            # text that must occur exactly once in `path`
    new: str            # what replaces it: the mistake
    tests: tuple        # pytest selection: test files or node ids
    k: str | None       # pytest -k expression, or None
    why: str            # one line: the mistake, and when it shows
    probe: str | None = None
    needs: str | None = None  # "amx": a path only a CPU with AMX takes; elsewhere the fault is reported n/a

    @property
    def native(self) -> bool:
        """A fault in the C++ sources: the extension is rebuilt with it."""
        return self.path.startswith("csrc/")

    @property
    def selection(self) -> tuple:
        """The pytest arguments of the selection."""
        return (*self.tests, *(("-k", self.k) if self.k else ()))


# -- probes: each leaves the op's output in `out` ---------------------------------------------------------------
def _gqa_probe(**kw) -> str:
    """gqa_attention on one backend with the given keyword arguments (python literals or names defined below)."""
    args = ", ".join(f"{k}={v}" for k, v in kw.items())
    return f"""
from ditengine.kernels import gqa_attention
g = torch.Generator().manual_seed(0)
B, T, Hq, Hkv, Dh = 1, 70, 4, 2, 32
q, k, v = (torch.randn(B, T, h, Dh, generator=g) for h in (Hq, Hkv, Hkv))
qw, kw = torch.rand(Dh, generator=g) + 0.5, torch.rand(Dh, generator=g) + 0.5
w2 = torch.rand(2, Dh, generator=g) + 0.5
ang = torch.randn(T, Dh, generator=g)
cos, sin = ang.cos(), ang.sin()
out = gqa_attention(q, k, v, {args})
"""


REUSE_BLOCKS = "StaticCache(2, warmup=1, cooldown=1, reuse='blocks')"  # skipped steps run reuse_block
SKIP_TO_FINAL_NORM = "FirstBlockCache(threshold=10.0)"  # every step that may skip does, through final_norm


def _sampler_probe(family: str, cache: str) -> str:
    """A family's FastSampler (fp32, eager) with a step cache, on its case in tests/test_conformance.py."""
    return f"""
from ditengine.cache import FirstBlockCache, StaticCache
import test_conformance
model, sched, noise, args, named, cfg = test_conformance.CASES[{family!r}]()
out = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None, cache={cache})(
    noise, *args, **named)
"""


FAULTS: list[Fault] = [
    # -- the fused denoisers' cache and final-norm paths (tests being written alongside the harness) ------------
    Fault("flux-reuse-block-gates-swapped", "engine/fast/flux.py",
          "gates = ((m[:, 2], m[:, 5]), (m[:, 8], m[:, 11]))",
          "gates = ((m[:, 5], m[:, 2]), (m[:, 11], m[:, 8]))",
          ("tests/test_conformance.py",), "reuse_block or cache",
          "Flux's cached double block reads its (attention, MLP) gates in the wrong order",
          _sampler_probe("flux", REUSE_BLOCKS)),
    Fault("ace-step-reuse-block-no-cross", "engine/fast/ace_step.py",
          "resid.addcmul_(m[:, 2, None], kept[0]).add_(kept[1])",
          "resid.addcmul_(m[:, 2, None], kept[0])",
          ("tests/test_conformance.py",), "reuse_block or cache",
          "ACE-Step's cached block drops the kept cross-attention output from the residual",
          _sampler_probe("ace_step", REUSE_BLOCKS)),
    Fault("pixart-reuse-block-no-cross", "engine/fast/pixart.py",
          "resid.addcmul_(m[:, 2, None], kept[0]).add_(kept[1])",
          "resid.addcmul_(m[:, 2, None], kept[0])",
          ("tests/test_conformance.py",), "reuse_block or cache",
          "PixArt's cached block drops the kept cross-attention output from the residual",
          _sampler_probe("pixart", REUSE_BLOCKS)),
    Fault("flux-final-norm-shift-scale-swapped", "engine/fast/flux.py",
          "return adaln_modulate(resid, final[:, 1], final[:, 0], out_dtype",
          "return adaln_modulate(resid, final[:, 0], final[:, 1], out_dtype",
          ("tests/test_conformance.py",), "final_norm or cache",
          "Flux's final_norm (used after a cached last block) takes the scale-first chunks as shift, scale",
          _sampler_probe("flux", SKIP_TO_FINAL_NORM)),
    Fault("sd3-final-norm-shift-scale-swapped", "engine/fast/sd3.py",
          "return adaln_modulate(resid, mod[0][:, f + 1], mod[0][:, f], out_dtype",
          "return adaln_modulate(resid, mod[0][:, f], mod[0][:, f + 1], out_dtype",
          ("tests/test_conformance.py",), "final_norm or cache",
          "SD3's final_norm (used after a cached last block) takes the scale-first chunks as shift, scale",
          _sampler_probe("sd3", SKIP_TO_FINAL_NORM)),
    # -- GQA attention: window bounds ------------------------------------------------------------------------------
    Fault("gqa-triton-window-loop-end", "kernels/gqa_attention.py",
          "hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M + window, T_K)",
          "hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M + window - 1, T_K)",
          ("tests/test_gqa_attention.py",), "window",
          "the Triton key loop ends one key early: the last key block is skipped when window % BLOCK_N == 1",
          _gqa_probe(window=17, backend='"triton"', config="dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)")),
    Fault("gqa-triton-window-shortcut", "kernels/gqa_attention.py",
          "return window is not None and window < T - 1",
          "return window is not None and window < T - 2",
          ("tests/test_gqa_attention.py",), "window",
          "Triton's 'the window covers every key' shortcut is off by one: window = T - 2 runs unmasked",
          _gqa_probe(window=68, backend='"triton"')),
    Fault("gqa-native-window-shortcut", "csrc/gqa_attention.cpp",
          "if (window.has_value() && *window < T - 1) pr.window = *window;",
          "if (window.has_value() && *window < T - 2) pr.window = *window;",
          ("tests/test_gqa_attention.py",), "window",
          "the C++ 'the window covers every key' shortcut is off by one: window = T - 2 runs unmasked",
          _gqa_probe(window=68, backend='"native"')),
    # -- GQA attention: norms, RoPE, head mapping --------------------------------------------------------------
    Fault("gqa-triton-rope-halves-sign", "kernels/gqa_attention.py",
          "sign = tl.where(cols < HEAD_DIM // 2, -1.0, 1.0)",
          "sign = tl.where(cols < HEAD_DIM // 2, 1.0, -1.0)",
          ("tests/test_gqa_attention.py",), "test_matches_reference and triton and qk-half",
          "Triton's rotate-half RoPE rotates the wrong way: rot(x) = cat(x2, -x1)",
          _gqa_probe(rope="(cos, sin)", backend='"triton"')),
    Fault("gqa-triton-rope-interleaved-pairing", "kernels/gqa_attention.py",
          "partner = cols ^ 1",
          "partner = (cols + 1) % HEAD_DIM",
          ("tests/test_gqa_attention.py",), "test_matches_reference and triton and qk-pairs",
          "Triton's interleaved RoPE pairs each lane with the next one, so odd lanes pair across pairs",
          _gqa_probe(rope="(cos, sin)", rope_interleaved=True, backend='"triton"')),
    Fault("gqa-triton-k-norm-q-weight", "kernels/gqa_attention.py",
          "k1 = _prologue(k1, k_base, cols, col_ok, stride_kt, d1, k_rstd, kw_ptr, stride_kw,",
          "k1 = _prologue(k1, k_base, cols, col_ok, stride_kt, d1, k_rstd, qw_ptr, stride_qw,",
          ("tests/test_gqa_attention.py",), "test_matches_reference and triton and qk-half",
          "Triton's k RMSNorm multiplies by q's norm weight (a copy-paste of the q prologue)",
          _gqa_probe(q_norm="qw", k_norm="kw", backend='"triton"')),
    Fault("gqa-triton-head-mapping", "kernels/gqa_attention.py",
          "hk = h // GROUP",
          "hk = h % (HQ // GROUP)",
          ("tests/test_gqa_attention.py",), "test_matches_reference and triton and qk-half",
          "Triton maps q head h to kv head h % Hkv (interleaved) instead of h // (Hq / Hkv) (grouped)",
          _gqa_probe(backend='"triton"')),
    Fault("gqa-triton-norm-split-off-by-one", "kernels/gqa_attention.py",
          "w = tl.where(rows[:, None] >= split, w1, w)",
          "w = tl.where(rows[:, None] > split, w1, w)",
          ("tests/test_gqa_attention.py",), "test_triton_joint_split_on_a_key_block_edge",
          "Triton's joint attention normalises the second stream's first row with the first stream's weight",
          _gqa_probe(q_norm="w2", k_norm="w2", norm_split=30, backend='"triton"')),
    # -- GQA attention: the log-sum-exp (Ring attention's merge) -------------------------------------------------
    Fault("gqa-triton-lse-base-2", "kernels/gqa_attention.py",
          "lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln 2",
          "lse = m_i + tl.log2(l_i)",
          ("tests/test_gqa_attention.py",), "test_lse_matches_reference and triton",
          "Triton's lse stays in the online softmax's log2 domain (the ln 2 factor dropped): merged ring blocks are "
          "weighted 2^x instead of e^x",
          _gqa_probe(q_norm="qw", k_norm="kw", return_lse=True, backend='"triton"') + "out = out[1]\n"),
    Fault("gqa-native-lse-no-running-max", "csrc/gqa_attention.cpp",
          "lse_rows[i * pr.HQ] = m_all[hh * BLOCK_M + i] + std::log(l_all[hh * BLOCK_M + i]);",
          "lse_rows[i * pr.HQ] = std::log(l_all[hh * BLOCK_M + i]);",
          ("tests/test_gqa_attention.py",), "test_lse_matches_reference and native",
          "the C++ lse forgets the running max the row's sum is relative to: log(l) instead of m + log(l)",
          _gqa_probe(window=17, return_lse=True, backend='"native"') + "out = out[1]\n"),
    # -- adaLN -------------------------------------------------------------------------------------------------------
    Fault("adaln-native-rms-no-eps", "csrc/adaln.cpp",
          "const float rstd = kRms ? 1.f / std::sqrt(sum / static_cast<float>(D) + p.eps)",
          "const float rstd = kRms ? 1.f / std::sqrt(sum / static_cast<float>(D))",
          ("tests/test_adaln.py",), "rms",
          "the C++ RMS adaLN drops eps from its statistic: rows near zero blow up",
          """
from ditengine.kernels import adaln_modulate
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 5, 64, generator=g) * 1e-3
shift, scale = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
out = adaln_modulate(x, shift, scale, eps=1e-6, rms=True, backend="native")
"""),
    Fault("adaln-native-dual-second-scale", "csrc/adaln.cpp",
          "xf, mean, rstd, weight, shift2, scale2,",
          "xf, mean, rstd, weight, shift2, scale,",
          ("tests/test_adaln.py",), "test_second_modulation_matches_reference and native and float32",
          "the C++ dual adaLN writes y2 with the first modulation's scale (a copy-paste of the y line)"),
    Fault("adaln-triton-modulate-without-one", "kernels/adaln.py",
          "return h * (1.0 + scale) + shift",
          "return h * scale + shift",
          ("tests/test_adaln.py",), "test_norm_forms_match_reference and triton and float32",
          "Triton's adaLN modulates with scale instead of (1 + scale)"),
    Fault("adaln-triton-dual-second-scale", "kernels/adaln.py",
          "y2 = _modulate(h, shift2_ptr + b * stride_shift2, scale2_ptr + b * stride_scale2, cols, mask)\n"
          "        tl.store(y2_ptr + b * stride_yb + t * stride_yt + cols, y2.to(y2_ptr.dtype.element_ty), mask=mask)\n"
          "\n\n@triton.jit",
          "y2 = _modulate(h, shift2_ptr + b * stride_shift2, scale_ptr + b * stride_scale, cols, mask)\n"
          "        tl.store(y2_ptr + b * stride_yb + t * stride_yt + cols, y2.to(y2_ptr.dtype.element_ty), mask=mask)\n"
          "\n\n@triton.jit",
          ("tests/test_adaln.py",), "test_second_modulation_matches_reference and triton and 2-16-64",
          "Triton's dual adaLN (K1) writes y2 with the first modulation's scale"),
    # -- SwiGLU -----------------------------------------------------------------------------------------------------
    Fault("swiglu-triton-silu-sign", "kernels/linear_swiglu.py",
          "y = g / (1.0 + tl.exp(-g)) * u",
          "y = g / (1.0 + tl.exp(g)) * u",
          ("tests/test_linear_swiglu.py",), "test_matches_diffusers_ace_step_mlp_before_its_down_projection",
          "Triton's SwiGLU epilogue computes g * sigmoid(-g) instead of silu(g)"),
    Fault("swiglu-panels-gate-up-swapped", "kernels/linear_swiglu.py",
          "torch.cat([blocks(gate), blocks(up)], dim=-1)",
          "torch.cat([blocks(up), blocks(gate)], dim=-1)",
          ("tests/test_linear_swiglu.py",), "test_matches_reference",
          "prepack_swiglu packs each panel up-then-gate, so the native GEMM gates the wrong half"),
    Fault("swiglu-native-partial-panel-up-offset", "csrc/linear_swiglu.cpp",
          "finish(t_row, t_row + BN, bg, bu, out + (r0 + i) * F + c0, cols);",
          "finish(t_row, t_row + cols, bg, bu, out + (r0 + i) * F + c0, cols);",
          ("tests/test_linear_swiglu.py",), "test_matches_reference",
          "the C++ fp32 epilogue reads the up columns `cols` in, not BN: wrong on a last panel when F % 32 != 0"),
    # -- linear + GELU on a column range (gelu_from) -----------------------------------------------------------
    Fault("gelu-from-mkldnn-whole-row", "kernels/linear_gelu.py",
          "if apply_gelu and gelu_from == 0:",
          "if apply_gelu:",
          ("tests/test_linear_gelu.py",), "test_gelu_columns and mkldnn and float32",
          "the oneDNN form applies its GELU post-op to the whole row, ignoring gelu_from"),
    Fault("gelu-from-native-tile-offset", "csrc/linear_gelu.cpp",
          "cols, gelu_from - c0);",
          "cols, gelu_from);",
          ("tests/test_linear_gelu.py",), "test_native_gelu_columns_cross_the_tiles and float32",
          "the C++ epilogue takes gelu_from as a tile column: wrong on every column tile after the first"),
    # -- cross-attention kv_lens ---------------------------------------------------------------------------------
    Fault("kv-lens-triton-first-row", "kernels/attention.py",
          "tl.load(lens_ptr + b * stride_lens)",
          "tl.load(lens_ptr)",
          ("tests/test_cross_attention.py",), "test_matches_reference and triton and float32",
          "Triton's cross-attention uses batch row 0's valid length for every row"),
    Fault("kv-lens-native-ignored", "csrc/cross_attention.cpp",
          "T_q, L, lens.data(), Dh, scale);",
          "T_q, L, nullptr, Dh, scale);",
          ("tests/test_cross_attention.py",), "test_matches_reference and native and float32",
          "the C++ cross-attention is not given the lengths: it attends to the padding keys too"),
    Fault("kv-lens-pixart-negative-prompt", "engine/fast/pixart.py",
          "lengths = torch.cat([cond[m] for _, m in halves])",
          "lengths = cond[\"prompt_attention_mask\"].repeat(len(halves))",
          ("tests/test_pixart.py",), "test_fast_sampler_matches_the_reference_in_fp32",
          "PixArt's fast path gives the negative prompt the prompt's valid length"),
    # -- APG guidance --------------------------------------------------------------------------------------------
    Fault("apg-triton-clamp-not-min-1", "kernels/apg_guidance.py",
          "scale = thr / tl.maximum(tl.sqrt(mm), thr)",
          "scale = thr / tl.sqrt(mm)",
          ("tests/test_apg_guidance.py",), "test_matches_diffusers_over_four_steps and triton",
          "Triton's APG norm clamp scales every row to the threshold, also rows below it (no min(1, .))"),
    Fault("apg-triton-eta-term", "kernels/apg_guidance.py",
          "coef_c = 1.0 + gs * (tl.cast(eta, tl.float64) - 1.0) * k",
          "coef_c = 1.0 + gs * tl.cast(eta, tl.float64) * k",
          ("tests/test_apg_guidance.py",), "test_interpreter_matches_reference",
          "Triton's APG keeps the parallel component (eta - 1 written as eta)"),
    # -- int8 ----------------------------------------------------------------------------------------------------
    Fault("int8-per-tensor-weight-scale", "kernels/linear_int8.py",
          "amax = xf.abs().amax(-1, keepdim=True)",
          "amax = xf.abs().amax(keepdim=True)",
          ("tests/test_linear_int8.py",), None,
          "the quantiser takes one scale for the whole weight (and for the activations) instead of one per row",
          """
from ditengine.kernels.linear_int8 import prepack_int8, linear_int8
g = torch.Generator().manual_seed(0)
w = torch.randn(16, 64, generator=g) * torch.logspace(-2, 0, 16)[:, None]
x = torch.randn(8, 64, generator=g)
out = linear_int8(x, prepack_int8(w, None))
"""),
    Fault("int8-torch-body-no-weight-scale", "kernels/linear_int8.py",
          "y = torch._int_mm(q, weight.t()).float() * (s * weight_scale)",
          "y = torch._int_mm(q, weight.t()).float() * s",
          ("tests/test_linear_int8.py",), "test_within_the_bound and reference",
          "the int8 torch body dequantises with the activation scale only, not the weight's"),
    # -- the scheduler step (K4) -----------------------------------------------------------------------------------
    Fault("sched-triton-guided-channels", "kernels/scheduler_step.py",
          "m = tl.where(c < k, unc + cfg_scale * (m - unc), m)",
          "m = tl.where(c <= k, unc + cfg_scale * (m - unc), m)",
          ("tests/test_scheduler_step.py",), "test_half_precision_model_output_and_device_step_index and triton",
          "Triton's K4 guides one channel too many (c <= guided_channels)"),
    Fault("sched-native-history-order", "csrc/scheduler_step.cpp",
          "s_n[i] += ch * hist[i];\n          hist[i] = s_0[i];",
          "hist[i] = s_0[i];\n          s_n[i] += ch * hist[i];",
          ("tests/test_scheduler_step.py",), "test_matches_sched_step_over_a_trajectory and dpm and native",
          "the C++ K4 stores this step's x0 in the history before reading the previous one (DPM-Solver++)"),
    Fault("sched-native-history2-shift", "csrc/scheduler_step.cpp",
          "hist2[i] = hist[i];\n          hist[i] = s_0[i];",
          "hist[i] = s_0[i];\n          hist2[i] = hist[i];",
          ("tests/test_scheduler_step.py",), "test_matches_sched_step_over_a_trajectory and unipc and native",
          "the C++ K4 overwrites the history with x0 before moving it into history2 (UniPC's x0 of two steps back)"),
    Fault("sched-triton-history2-shift", "kernels/scheduler_step.py",
          "tl.store(hist2_ptr + offs, hist, mask=mask)",
          "tl.store(hist2_ptr + offs, x0, mask=mask)",
          ("tests/test_scheduler_step.py",), "test_matches_sched_step_over_a_trajectory and unipc and triton",
          "Triton's K4 writes this step's x0 into history2 instead of the previous one (UniPC)"),
    Fault("unipc-corrector-unshifted-predictor", "engine/schedulers.py",
          "correction = self._corrector(lam, alpha, i, order) - np.array([0.0, pred[0], pred[1]])",
          "correction = self._corrector(lam, alpha, i, order) - np.array([pred[0], pred[1], 0.0])",
          ("tests/test_schedulers.py",), "unipc_matches_diffusers",
          "UniPC's table takes the last predictor's x0 terms back off the corrected sample one step out of place"),
    Fault("attention-native-flash-default-scale", "csrc/attention.cpp",
          "at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, softmax_scale)",
          "at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, std::nullopt)",
          ("tests/test_attention.py",), "test_long_keys_across_key_blocks and native",
          "the C++ attention's ATen branch (bf16 on AMX, float64) drops the softmax scale for SDPA's default",
          needs="amx"),
    Fault("gqa-native-flash-k-takes-q-prologue", "csrc/gqa_attention.cpp",
          "prepared(kr, pr.pk).transpose(1, 2)",
          "prepared(kr, pr.pq).transpose(1, 2)",
          ("tests/test_gqa_attention.py",), "test_matches_reference and native and bfloat16 and qk",
          "the C++ GQA attention's ATen branch (bf16 on AMX) normalises the keys with the queries' weight",
          needs="amx"),
    # -- fused denoisers -------------------------------------------------------------------------------------------
    Fault("ace-step-window-dropped", "engine/fast/ace_step.py",
          "window=cfg.window(i))",
          "window=None)",
          ("tests/test_ace_step.py",), "test_turbo_run_matches_the_reference_in_fp32",
          "ACE-Step's fused block runs its sliding-window layers with full attention"),
    Fault("dit-attention-gate-is-mlp-gate", "engine/fast/dit.py",
          "gated_residual_adaln(resid, m[:, 2], o, m[:, 3], m[:, 4], eps=cfg.mlp_norm_eps",
          "gated_residual_adaln(resid, m[:, 5], o, m[:, 3], m[:, 4], eps=cfg.mlp_norm_eps",
          ("tests/test_fast.py",), "test_fused_forward_matches_reference_in_fp32_through_the_kernels",
          "the fused DiT block gates its attention output with the MLP's gate chunk"),
    Fault("sd3-dual-attention-gate", "engine/fast/sd3.py",
          "gate_x = m[:, a + G3]",
          "gate_x = m[:, a + G1]",
          ("tests/test_sd3.py",), "test_run_matches_the_reference_in_fp32",
          "SD3.5's dual-attention layer gates its second attention with the first one's gate"),
    # -- the sampler loop --------------------------------------------------------------------------------------------
    Fault("sampler-unguided-steps-uncond-modulation", "engine/fast/plan.py",
          "mod = tuple(m[:rows] for m in self.modulation(step, expert))",
          "mod = tuple(m[rows:] for m in self.modulation(step, expert))",
          ("tests/test_cfg_interval.py",), "test_fused_dit_matches_the_reference",
          "outside the CFG interval the loop runs the conditional rows with the unconditional rows' modulation"),
    Fault("sampler-first-input-scaled-by-next", "engine/fast/plan.py",
          "self.write_input(0)",
          "self.write_input(1)",
          ("tests/test_fast.py",), "test_fast_sampler_matches_reference_sampler and euler",
          "the loop scales the first model input with step 1's c_in instead of step 0's"),
    Fault("sampler-unipc-history2-dropped", "engine/fast/plan.py",
          "history2=self.history2,",
          "history2=None,",
          ("tests/test_fast.py",), "test_fast_sampler_matches_reference_sampler and unipc",
          "the fused loop steps UniPC without its second history (the corrector's x0 of two steps back)"),
    Fault("sampler-callback-state-not-fed-forward", "engine/fast/plan.py",
          "if i + 1 < len(sched):",
          "if i + 1 < 0:",
          ("tests/test_sampling.py",), "callback",
          "a step callback's new state is kept, but the next step's model input is still the old state's"),
    # -- LoRA and the image-conditioned pipelines ----------------------------------------------------------------------
    Fault("lora-refit-never-written", "engine/fast/base.py",
          "copy_fields(self.packed, fresh.packed)",
          "copy_fields(fresh.packed, fresh.packed)",
          ("tests/test_lora.py",), "every_adapter_change and fused and flux",
          "a LoRA refit builds the folded packed weights and never writes them into the form the GEMMs read"),
    Fault("lora-call-scale-ignored", "engine/lora.py",
          "adapters, factor = _active(layer), scale",
          "adapters, factor = _active(layer), 1.0",
          ("tests/test_lora.py",), "every_adapter_change and fused and flux",
          "joint_attention_kwargs' LoRA scale is not applied to the folded deltas"),
    Fault("flux-kontext-reference-outputs-kept", "engine/fast/flux.py",
          "return unpack_latents(out[:, L:L + gh * gw], 2 * gh, 2 * gw)",
          "return unpack_latents(out[:, -gh * gw:], 2 * gh, 2 * gw)",
          ("tests/test_flux_pipeline.py",), "kontext",
          "Flux's output projection takes the last tokens of the stream, Kontext's reference tokens among them"),
    Fault("inpaint-blend-at-this-steps-sigma", "engine/pipelines/base.py",
          "sigma = sigmas[begin + i + 1]",
          "sigma = sigmas[begin + i]",
          ("tests/test_flux_pipeline.py",), "inpaint",
          "inpainting mixes in the original latents noised to the step just run instead of the next one"),
    # -- Wan (video) --------------------------------------------------------------------------------------------------
    Fault("wan-k-norm-takes-q-weight", "engine/fast/wan.py",
          "k = rms_across_heads(qkv[:, :, 1], layers[\"norm_k\"]",
          "k = rms_across_heads(qkv[:, :, 1], layers[\"norm_q\"]",
          ("tests/test_wan.py",), "fast_sampler_matches_the_reference and t2v",
          "Wan's self-attention normalises k with q's RMSNorm weight"),
    Fault("wan-rope-rotate-half", "engine/fast/wan.py",
          "q, k, v, rope=ctx[\"rope\"], rope_interleaved=True)",
          "q, k, v, rope=ctx[\"rope\"], rope_interleaved=False)",
          ("tests/test_wan.py",), "fast_sampler_matches_the_reference and t2v",
          "Wan's 3-D RoPE pairs the halves of the head dim instead of interleaved pairs"),
    Fault("wan-image-attention-dropped", "engine/fast/wan.py",
          "        if ctx[\"image_kv\"] is not None:  # the image's own attention, summed with the text's",
          "        if False:",
          ("tests/test_wan.py",), "fast_sampler_matches_the_reference and i2v",
          "Wan I2V's cross-attention to the CLIP image tokens is left out"),
    Fault("wan-first-frame-gate-at-t", "engine/fast/wan.py",
          "self._gate0(ctx, i, 5), o)",
          "self._gate0(ctx, i, 2), o)",
          ("tests/test_wan.py",), "ti2v_image_mode",
          "TI2V's first-frame tokens take t = 0's attention gate for the FFN's"),
    Fault("expert-boundary-inclusive", "engine/experts.py",
          "return [float(t) < self.boundary for t in timesteps.tolist()]",
          "return [float(t) <= self.boundary - 200 for t in timesteps.tolist()]",
          ("tests/test_wan.py",), "accelerate_returns and a14b and fused",
          "the second expert takes over later than the pipelines' boundary"),
    Fault("expert-scale-ignored", "engine/fast/sampler.py",
          "            self.cfg_scales.append(expert.scale(cfg_scale))",
          "            self.cfg_scales.append(float(cfg_scale))",
          ("tests/test_wan.py",), "second_expert",
          "the fused loop guides the second expert's steps with the first model's scale"),
    Fault("cfg-parallel-both-ranks-conditional", "engine/fast/plan.py",
          "rows, start = self.batch, s.cfg_group.rank * self.batch",
          "rows, start = self.batch, 0",
          ("tests/test_parallel.py",), "cfg_parallel_equals_one_process",
          "with CFG parallel both ranks run the conditional rows: the guidance combines the prompt with itself"),
    Fault("sequence-every-rank-takes-the-first-shard", "engine/parallel.py",
          "        return self.group.rank * self.per_rank",
          "        return 0",
          (SEQUENCE_2,), None,
          "on a token shard every rank embeds the first shard of the tokens"),
    Fault("ulysses-heads-back-in-the-wrong-order", "engine/parallel.py",
          "return recv.movedim(0, -3).reshape(N, T // P, *mid, P * Hp, Dh).contiguous()",
          "return recv.movedim(0, -2).reshape(N, T // P, *mid, P * Hp, Dh).contiguous()",
          (SEQUENCE_2,), None,
          "the all-to-all after the attention interleaves the ranks' heads instead of concatenating them"),
    Fault("sequence-padded-keys-attended", "engine/parallel.py",
          "out = pad_rows(attend(*(t[:, :self.tokens] for t in tensors), **prologue), self.chunk)",
          "out = attend(*tensors, **prologue)",
          (SEQUENCE_2,), None,
          "Ulysses attends the padding rows' keys of a token count the degree does not divide (Flux's 19 tokens)"),
    Fault("ring-partials-not-merged", "engine/parallel.py",
          "else merge_attention(out, lse, o, o_lse)",
          "else (o.float(), o_lse)",
          (SEQUENCE_2,), None,
          "the ring keeps the last block's partial attention instead of merging it with the others"),
    Fault("ring-prologue-at-local-positions", "engine/parallel.py",
          "q, k, kw = apply_prologue(q, k, ring.rank * self.chunk, **prologue)",
          "q, k, kw = apply_prologue(q, k, 0, **prologue)",
          (SEQUENCE_2,), None,
          "the ring rotates (and splits the norms of) each chunk as if it started at position 0"),
    Fault("ring-source-counted-the-wrong-way", "engine/parallel.py",
          "source = (ring.rank - hop) % ring.size",
          "source = (ring.rank + hop) % ring.size",
          (SEQUENCE_4,), None,
          "the ring cuts each received chunk to another chunk's valid count (shows with 4 chunks and padding)"),
    Fault("ring-band-ignores-the-next-chunk", "engine/parallel.py",
          "after = 0 if last else min(window, self.valid(r + 1))",
          "after = 0",
          (SEQUENCE_2,), None,
          "a sliding window over ring chunks drops the next chunk's keys at the chunk's end"),
    Fault("first-block-decision-per-rank", "engine/fast/plan.py",
          "new, old, reduce = new[:, :shards.rows], old[:, :shards.rows], shards.sum",
          "new, old, reduce = new[:, :shards.rows], old[:, :shards.rows], None",
          (SEQUENCE_2,), None,
          "the first-block cache decides from each rank's own tokens: the ranks may decide differently"),
    Fault("teacache-abs-of-the-polynomial", "engine/cache.py",
          "total += float(np.polyval(coefficients, x))",
          "total += abs(float(np.polyval(coefficients, x))) + 0.1",
          ("tests/test_wan.py",), "teacache_follows_the_published_rule",
          "TeaCache's accumulated change is not the published rule's"),
]
