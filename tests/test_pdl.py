"""Programmatic dependent launch (ops/pdl.py): off unless asked for and on a GPU that has it;
every kernel of the decode chain compiles for Hopper (sm_90) with and without it, here on
CPU through Triton's compiler and its bundled ptxas (this also catches what Triton's
interpreter lets through: a helper whose returns differ in type compiled nowhere else);
and on a Hopper GPU (`-m gpu`) the engine gives bit-identical results with it on and off."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.ops import pdl  # noqa: E402

_FLOAT_ARGS = {"eps", "scale_log2", "alpha", "limit"}
_PTR_DTYPES = {"block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "pos_ptr": "*i64",
               "slot_ptr": "*i64", "cos_sin_ptr": "*fp32", "seg_acc_ptr": "*fp32", "seg_max_ptr": "*fp32",
               "seg_sum_ptr": "*fp32", "idx_ptr": "*i64", "counter_ptr": "*i32"}


def _compile_sm90(kernel, constexprs: dict, num_warps: int = 4):
    """PTX and cubin of `kernel` for an H100, compiled here (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    sig = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _PTR_DTYPES.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    return compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "launch_pdl": constexprs["PDL"]})


def _chain_kernels():
    from pagedserve.ops.activation import _silu_and_mul_kernel
    from pagedserve.ops.argmax import _argmax_kernel
    from pagedserve.ops.gemv import _gemv_kernel
    from pagedserve.ops.paged_attention import _paged_attention_kernel
    from pagedserve.ops.rms_norm import _rms_norm_kernel
    from pagedserve.ops.rotary import _rotary_and_cache_kernel

    gemv = dict(HAS_BIAS=False, SILU_MUL=False, NORM=True, HAS_RES=True, BLOCK_N=8, BLOCK_K=512, UPCAST=False,
                X_BCAST=False)
    return {
        "gemv_norm_fma": (_gemv_kernel, {**gemv, "BLOCK_M": 1, "USE_DOT": False}),
        "gemv_silu_dot": (_gemv_kernel, {**gemv, "NORM": False, "HAS_RES": False, "SILU_MUL": True,
                                         "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "USE_DOT": True}),
        "gemv_plain_fma_m4": (_gemv_kernel, {**gemv, "NORM": False, "HAS_RES": False, "HAS_BIAS": True,
                                             "BLOCK_M": 4, "USE_DOT": False}),
        "gemv_silu_fma_m2": (_gemv_kernel, {**gemv, "NORM": False, "HAS_RES": False, "SILU_MUL": True,
                                            "BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_K": 1024, "USE_DOT": False}),
        "gemv_norm_bcast": (_gemv_kernel, {**gemv, "BLOCK_M": 1, "USE_DOT": False, "X_BCAST": True}),
        "gemv_silu_bcast_m4": (_gemv_kernel, {**gemv, "NORM": False, "HAS_RES": False, "SILU_MUL": True,
                                              "BLOCK_M": 4, "BLOCK_N": 4, "BLOCK_K": 1024, "USE_DOT": False,
                                              "X_BCAST": True}),
        "gemv_norm_dot": (_gemv_kernel, {**gemv, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "USE_DOT": True}),
        "rms_norm": (_rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=2048)),
        "silu_and_mul": (_silu_and_mul_kernel, dict(BLOCK=1024, ACT=0)),
        "rotary_and_cache": (_rotary_and_cache_kernel, dict(NUM_Q=32, NUM_K=4, QH_P=32, KH_P=4, HALF=32, HALF_P=32,
                                                            BLOCK_SIZE=16)),
        "paged_attention_decode": (_paged_attention_kernel, dict(
            GROUP=8, GROUP_P=8, HEAD_DIM=64, HEAD_DIM_P=64, BLOCK_SIZE=16, TILE_N=32, BLOCK_M=16, BLOCK_Q=1, IS_DECODE=True,
            NUM_SEGMENTS=8, DOT_PRECISION="tf32", UPCAST_DOT=False, K_ROWS=True, ROPE=False)),
        "paged_attention_decode_rope": (_paged_attention_kernel, dict(
            GROUP=8, GROUP_P=8, HEAD_DIM=64, HEAD_DIM_P=64, BLOCK_SIZE=16, TILE_N=32, BLOCK_M=16, BLOCK_Q=1, IS_DECODE=True,
            NUM_SEGMENTS=16, DOT_PRECISION="tf32", UPCAST_DOT=False, K_ROWS=True, ROPE=True)),
        "paged_attention_prefill": (_paged_attention_kernel, dict(
            GROUP=8, GROUP_P=8, HEAD_DIM=64, HEAD_DIM_P=64, BLOCK_SIZE=16, TILE_N=64, BLOCK_M=64, BLOCK_Q=8, IS_DECODE=False,
            NUM_SEGMENTS=1, DOT_PRECISION="tf32", UPCAST_DOT=False, K_ROWS=True, ROPE=False)),
        "argmax": (_argmax_kernel, dict(BLOCK=16384)),
    }


def test_pdl_is_off_unless_asked_for_on_a_gpu(monkeypatch):
    cpu = torch.device("cpu")
    assert pdl.pdl_launch(cpu) == {"PDL": False}
    monkeypatch.setattr(pdl, "REQUESTED", True)
    assert pdl.pdl_launch(cpu) == {"PDL": False}  # CPU tensors (and Triton's interpreter) never take it


def _ptx_report() -> dict:
    """Run in a child process without TRITON_INTERPRET (the kernels must be JIT functions):
    {kernel: facts about its PTX with PDL off and on}, or {"skip": why}."""
    import json

    if pdl.gdc_wait is None:
        return {"skip": "this Triton has no grid dependency control"}
    out = {}
    for name, (kernel, constexprs) in _chain_kernels().items():
        try:
            off = _compile_sm90(kernel, {**constexprs, "PDL": False}).asm["ptx"]
        except RuntimeError as e:  # no ptxas for this host
            return {"skip": f"cannot compile for sm_90 here: {e}"}
        on = _compile_sm90(kernel, {**constexprs, "PDL": True}).asm["ptx"]
        out[name] = {"off_gdc": "griddepcontrol" in off, "on_launch": "griddepcontrol.launch_dependents" in on,
                     "on_wait": "griddepcontrol.wait" in on,
                     "load_before_wait": "griddepcontrol.wait" in on and on.index("ld.global") < on.index(
                         "griddepcontrol.wait")}
    out["attention_stack_bytes"] = _attention_stack_bytes()
    print(json.dumps(out))
    return out


def _attention_stack_bytes() -> "dict | str":
    """Stack bytes (register spills) of the attention kernel built for sm_90 in its default
    launch shapes at head dims 64 and 128: decode with and without RoPE, unsplit and split in
    16, and prefill (cuobjdump's resource usage); or why they cannot be read here."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    from pagedserve.ops.paged_attention import _paged_attention_kernel, block_m_for, num_warps_for, tile_n_for

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        return "no cuobjdump in this Triton"
    cases = [(g, d, True, rope, segments) for g, d in ((8, 64), (7, 128)) for rope in (False, True)
             for segments in (1, 16)]
    cases += [(g, d, False, False, 1) for g, d in ((8, 64), (7, 128), (1, 128))]  # prefill (MHA at 64: 32 B)
    out = {}
    for group, head_dim, decode, rope, segments in cases:
        block_m = block_m_for(group, decode)
        c = _compile_sm90(_paged_attention_kernel, dict(
            GROUP=group, GROUP_P=triton.next_power_of_2(group), HEAD_DIM=head_dim, HEAD_DIM_P=head_dim,
            BLOCK_SIZE=16, TILE_N=tile_n_for(head_dim, decode), BLOCK_M=block_m,
            BLOCK_Q=1 if decode else block_m // group, IS_DECODE=decode, NUM_SEGMENTS=segments,
            DOT_PRECISION="tf32", UPCAST_DOT=False, K_ROWS=True, ROPE=rope, PDL=False),
            num_warps=num_warps_for(block_m, head_dim))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        kind = ("rope" if rope else "plain") if decode else "prefill"
        out[f"g{group}_d{head_dim}_{kind}_s{segments}"] = int(re.search(r"STACK:(\d+)", usage)[1])
    return out


@pytest.fixture(scope="module")
def ptx_report() -> dict:
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = "import sys; sys.path.insert(0, 'tests'); import test_pdl; test_pdl._ptx_report()"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_attention_does_not_spill_on_hopper(ptx_report):
    """The attention kernel in its default launch shapes (decode with and without RoPE,
    unsplit and split; prefill, GQA and MHA) keeps everything in registers on sm_90 at head
    dims 64 and 128: at 128 the shapes before spilled 48-992 bytes."""
    if "skip" in ptx_report:
        pytest.skip(ptx_report["skip"])
    stacks = ptx_report["attention_stack_bytes"]
    if isinstance(stacks, str):
        pytest.skip(stacks)
    assert len(stacks) == 11 and not any(stacks.values()), stacks


@pytest.mark.parametrize("name", list(_chain_kernels()))
def test_chain_kernels_compile_for_hopper_with_and_without_pdl(ptx_report, name):
    """With PDL the kernel signals its dependents and waits for the kernel before it; without,
    neither instruction is there. The GEMV kernel's first weight load comes before the wait
    (weights are never written, so they may be read while the previous kernel finishes)."""
    if "skip" in ptx_report:
        pytest.skip(ptx_report["skip"])
    facts = ptx_report[name]
    assert not facts["off_gdc"]
    assert facts["on_launch"] and facts["on_wait"]
    if name.startswith("gemv"):
        assert facts["load_before_wait"]


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(8, 256, 4, 3, 0), (2, 1024, 4, 2, 2)], ids=["fma", "fma_bcast"])
def test_pdl_engine_matches_without_on_hopper(llama_dir, monkeypatch, config):
    """Every decode-chain kernel through PDL (and every layer through the GEMV kernel, so the
    whole chain is Triton): greedy tokens and logprobs bit-identical to the same engine
    without PDL, CUDA graphs on."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9 or pdl.gdc_wait is None:
        pytest.skip("needs a Hopper GPU and a Triton with grid dependency control")
    import gc

    from test_gemv import _Every

    from pagedserve import LLM, SamplingParams
    from pagedserve.ops import gemv as gemv_mod

    monkeypatch.setattr(gemv_mod, "GEMV_SHAPES", _Every(config))
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 900 + 4 for j in range(5 + 9 * i)]} for i in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    runs = []
    for on in (False, True):
        monkeypatch.setattr(pdl, "REQUESTED", on)
        for bs in (1, len(prompts)):  # batch 1 and 4: the sizes the GEMV kernel takes
            llm = LLM(llama_dir, device="cuda", dtype="bfloat16", max_num_seqs=bs, kv_cache_memory_bytes=64 << 20)
            assert llm.llm_engine.runner.graphs is not None
            outs = llm.generate(prompts, sp, use_tqdm=False)
            runs.append([(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                         for o in outs])
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    assert runs[0] == runs[2] and runs[1] == runs[3]
