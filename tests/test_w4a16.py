"""W4A16 linear: the repacked layout against quant/pack.py, every Triton path (GEMV, fused GEMM,
dequantize + matmul, split-K) against the PyTorch reference; tiny shapes on the CPU through the
Triton interpreter, real shapes on the GPU (`pytest -m gpu`)."""
import pytest
import torch

from tinyvila.kernels import w4a16
from tinyvila.kernels.triton_lang import tl, triton
from tinyvila.kernels.w4a16 import _cols_to_tile, dequantize_w4, repack_awq, w4a16_linear, w4a16_linear_ref
from tinyvila.quant import pack

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=[False, True], ids=["k-order", "fragment-order"])
def order(request, monkeypatch):
    """Each test under both packed row orders (the fragment order is opt-in: w4a16.FRAGMENT_ORDER)."""
    monkeypatch.setattr(w4a16, "FRAGMENT_ORDER", request.param)
    return request.param


def _layer(n, k, group, seed=0, device=DEVICE, dtype=torch.float32):
    """Random AWQ-quantized weights (scales of a real layer's size), repacked."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qweight, qzeros, scales = pack.quantize(w, group)
    packed = repack_awq(qweight.to(device), qzeros.to(device), scales.to(device), dtype)
    return packed, (qweight, qzeros, scales)


def _inputs(m, k, n, dtype, seed=1, bias=False, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) + 0.3).to(device, dtype)  # a mean: the zero-point term matters
    b = (torch.randn(n, generator=g) * 0.1).to(device, dtype) if bias else None
    return x, b


def _rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()


def _check_all_written(ours):
    assert torch.isfinite(ours).all(), "an output element was never written (or is not finite)"


@pytest.mark.parametrize("n, k, group", [(40, 64, 16), (72, 128, 32), (16, 256, 128), (24, 192, 64)])
def test_repack_and_dequantize_match_pack(n, k, group, order):
    packed, (qw, qz, sc) = _layer(n, k, group, device="cpu")
    assert torch.equal(dequantize_w4(packed, group), pack.dequantize(qw, qz, sc))
    assert packed["qweight"].shape == (k // 8, n) and packed["qweight"].dtype == torch.int32
    assert packed["zeros"].dtype == torch.uint8 and packed["zeros"].shape == sc.shape
    assert not packed["counters"].any()


@pytest.mark.parametrize("fragment, group, rows", [
    (False, 32, [24, 26, 28, 30, 25, 27, 29, 31]),  # K's own order: word r holds rows 8r + (0, 2, 4, 6, 1, 3, 5, 7)
    (True, 16, [24, 26, 28, 30, 25, 27, 29, 31]),  # groups of 16 keep K's order
    (True, 32, [6, 14, 22, 30, 7, 15, 23, 31]),  # fragment order: word 4b + c holds rows 32b + 2c + 8p (+ 1)
])
def test_repack_nibble_order_known_answer(fragment, group, rows, monkeypatch):
    """One known weight: column c, row r has value (r + 3c) % 16; zero 8, scale 1. Word (3, 5)'s
    nibbles 0..7 hold the rows `rows` of column 5."""
    monkeypatch.setattr(w4a16, "FRAGMENT_ORDER", fragment)
    K, N = 64, 16
    q = torch.tensor([[(r + 3 * c) % 16 for c in range(N)] for r in range(K)], dtype=torch.int32)
    packed = repack_awq(pack.pack(q), pack.pack(torch.full((K // group, N), 8, dtype=torch.int32)),
                        torch.ones(K // group, N, dtype=torch.float16), torch.float32)
    assert torch.equal(dequantize_w4(packed, group), (q - 8).float().t())
    word = int(packed["qweight"][3, 5]) & 0xFFFFFFFF
    assert [(word >> (4 * p)) & 0xF for p in range(8)] == [(r + 15) % 16 for r in rows]


def test_fragment_rows_permute_within_blocks_of_32():
    t = w4a16.fragment_rows(96)
    assert torch.equal(t[t], torch.arange(96))  # its own inverse
    assert torch.equal(t // 32, torch.arange(96) // 32) and torch.equal(t % 2, torch.arange(96) % 2)
    assert t[:10].tolist() == [0, 1, 8, 9, 16, 17, 24, 25, 2, 3]


@triton.jit
def _cols_tile_probe(Out, KT8: tl.constexpr, KT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Planes of the codes 1000 n + 10 r + j (column n, word row r, slot j) through _cols_to_tile."""
    n = tl.arange(0, BLOCK_N)[:, None]
    r = tl.arange(0, KT8)[None, :]
    code = (1000 * n + 10 * r).to(tl.float32)
    w = _cols_to_tile(code, code + 1, code + 2, code + 3, code + 4, code + 5, code + 6, code + 7, KT, BLOCK_N)
    tl.store(Out + n * KT + tl.arange(0, KT)[None, :], w)


def test_fragment_tile_columns_are_k_rows():
    """The swapped GEMM's fp16 tile (inline PTX, GPU only) is built by _cols_to_tile: its column t
    must be the K row that slot j of word row r holds in the fragment order, for every n, r, j."""
    KT8, N = 8, 4
    out = torch.zeros(N, 8 * KT8, device=DEVICE)
    _cols_tile_probe[(1,)](out, KT8=KT8, KT=8 * KT8, BLOCK_N=N)
    slot_of_row = w4a16.fragment_rows(8 * KT8).argsort()  # the inverse permutation
    expected = torch.tensor([[1000 * n + 10 * (s // 8) + s % 8 for s in slot_of_row.tolist()] for n in range(N)])
    assert torch.equal(out.cpu(), expected.float())


@pytest.mark.parametrize("m", [1, 3, 8, 17, 130, 260])  # GEMV, both fused tiles, the 128-row tile, dequantize
@pytest.mark.parametrize("n", [40, 72])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [16, 32])  # K's own row order always; the fragment order from 32
def test_w4a16_linear_tiny(m, n, bias, group, order):
    packed, _ = _layer(n, 64, group, seed=m + n)
    x, b = _inputs(m, 64, n, torch.float32, seed=m, bias=bias)
    ours = w4a16_linear(x, packed, group, b)
    ref = w4a16_linear_ref(x, packed, group, b)
    assert ours.shape == (m, n) and ours.dtype == x.dtype
    _check_all_written(ours)
    assert _rel_err(ours, ref) < 1e-5
    assert not packed["counters"].any(), "split-K semaphores must be back at zero"
    assert not packed["workspace"].any(), "the split-K workspace must be back at zero"


@pytest.mark.parametrize("path, split", [("gemv", 1), ("gemv", 3), ("gemm", 1), ("gemm", 3), ("swapped", 1), ("swapped", 3),
                                         ("dequant_matmul", 1)])
def test_each_path_and_split_k(path, split, order):
    """Every path forced, with and without split-K, at a group size larger than the K tile."""
    n, k, group = 72, 256, 128  # K tile 64: 4 tiles, 2 groups
    packed, _ = _layer(n, k, group, seed=3)
    x, b = _inputs(3 if path == "gemv" else 20, k, n, torch.float32, bias=True)
    if path == "gemv":
        ours = w4a16.gemv(x, packed, group, b, cols_per_thread=1, num_warps=1, split=split)
    elif path in ("gemm", "swapped"):  # 20 rows: two M tiles of 16
        ours = w4a16.gemm(x, packed, group, b, swapped=path == "swapped", block_m=16, block_n=32, split=split)
    else:
        ours = w4a16.dequant_matmul(x, packed, group, b)
    _check_all_written(ours)
    assert _rel_err(ours, w4a16_linear_ref(x, packed, group, b)) < 1e-5
    assert not packed["counters"].any() and not packed["workspace"].any()


@pytest.mark.parametrize("unroll", [1, 2, 3])
@pytest.mark.parametrize("split", [1, 3])
def test_gemv_unrolled_k_loop(unroll, split, order):
    """K steps taken `unroll` at a time: 10 steps of 64 rows over 1 or 3 splits (rounded to whole
    iterations), so the last split's iteration runs past its range and those steps must add nothing."""
    n, k, group = 72, 640, 128
    packed, _ = _layer(n, k, group, seed=11)
    x, b = _inputs(2, k, n, torch.float32, seed=4, bias=True)
    ours = w4a16.gemv(x, packed, group, b, cols_per_thread=1, num_warps=1, k_tile=64, split=split, unroll=unroll)
    _check_all_written(ours)
    assert _rel_err(ours, w4a16_linear_ref(x, packed, group, b)) < 1e-5
    assert not packed["counters"].any() and not packed["workspace"].any()


@pytest.mark.parametrize("m, split, swiglu, bias", [(1, 1, False, False), (1, 3, False, True), (2, 3, True, False),
                                                   (2, 1, False, True)])
def test_gemv_sums_read_by_add_rmsnorm(m, split, swiglu, bias, order):
    """A GEMV that ends at its split-K adds (sums=True), its sums read by add_rmsnorm (which adds
    the GEMV's bias), gives what its own output gives, and the reader zeroes the workspace: the
    next call starts from zero."""
    from tinyvila.kernels.rmsnorm import add_rmsnorm

    n, k, group = 72, 256, 64
    packed, _ = _layer(n, k, group, seed=5)
    x, b = _inputs(m, 2 * k if swiglu else k, n, torch.float16, seed=m, bias=bias)
    h, w = _inputs(m, n, n, torch.float16, seed=7, bias=True)
    kw = dict(cols_per_thread=1, num_warps=1, split=split, swiglu=swiglu)
    want = add_rmsnorm(h, w4a16.gemv(x, packed, group, b, **kw), w, 1e-6)
    for _ in range(2):
        sums = w4a16.gemv(x, packed, group, b, sums=True, **kw)
        assert sums.values.shape == (m, n) and sums.values.dtype == torch.float32 and sums.bias is b
        got = add_rmsnorm(h, sums, w, 1e-6)
        for ours, ref in zip(got, want):
            if DEVICE == "cpu" or split == 1:  # the same adds in the same order
                assert torch.equal(ours, ref)
            else:  # the GPU's fp32 atomics add in any order
                torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3)
        assert not packed["workspace"].any() and not packed["counters"].any()


@pytest.mark.parametrize("m, split", [(1, 1), (2, 3), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_swiglu_input_equals_silu_mul_then_gemv(m, split, dtype):
    """The down projection's GEMV reading gate|up itself equals silu_mul, then the GEMV: bit for
    bit at the same split (the fused input is rounded as silu_mul rounds it)."""
    from tinyvila.kernels.silu_mul import silu_mul, silu_mul_ref

    n, k, group = 40, 128, 32
    packed, _ = _layer(n, k, group, seed=9)
    gate_up, b = _inputs(m, 2 * k, n, dtype, seed=m, bias=True)
    fused = w4a16.gemv(gate_up, packed, group, b, cols_per_thread=1, num_warps=1, split=split, swiglu=True)
    two_step = w4a16.gemv(silu_mul(gate_up), packed, group, b, cols_per_thread=1, num_warps=1, split=split)
    assert torch.equal(fused, two_step)
    assert _rel_err(fused, w4a16_linear_ref(silu_mul_ref(gate_up.float()), packed, group, b)) < (
        1e-5 if dtype == torch.float32 else 2e-3)
    assert not packed["counters"].any() and not packed["workspace"].any()


def test_fp16_activations_and_leading_dims():
    packed, _ = _layer(40, 64, 16, seed=5)
    x, b = _inputs(6, 64, 40, torch.float16, bias=True)
    ours = w4a16_linear(x.view(2, 3, 64), packed, 16, b)
    assert ours.shape == (2, 3, 40) and ours.dtype == torch.float16
    ref = w4a16_linear_ref(x, packed, 16, b)
    assert _rel_err(ours.view(6, 40), ref) < 2e-3
    ours1 = w4a16_linear(x[:1], packed, 16)
    assert _rel_err(ours1, w4a16_linear_ref(x[:1], packed, 16)) < 2e-3


def test_wrong_nibble_order_is_caught():
    """The tolerance above is far below what one swapped pair of columns in a word gives."""
    packed, (qw, qz, sc) = _layer(40, 64, 16, seed=7, device="cpu")
    q = pack.unpack(qw)
    swapped = q.clone()
    swapped[:, [0, 1]] = q[:, [1, 0]]
    bad = repack_awq(pack.pack(swapped), qz, sc, torch.float32)
    x, _ = _inputs(1, 64, 40, torch.float32, device="cpu")
    assert _rel_err(w4a16_linear_ref(x, bad, 16), w4a16_linear_ref(x, packed, 16)) > 1e-2


# Compiles the swapped fused GEMM for an H100 (sm_90) on this machine (Triton's NVIDIA backend and its
# bundled ptxas and nvdisasm need no GPU; a process of its own, as the tests' kernels are interpreted)
# and prints how many wgmmas its SASS holds and how many full waits for them.
SM90_SWAPPED_GEMM = """
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tinyvila.kernels import w4a16

block_m, fragment = int(sys.argv[1]), sys.argv[2] == "1"
nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
pointers = dict(X="*fp16", Q="*i32", S="*fp16", Z="*u8", Bias="*fp16", Y="*fp16", Part="*fp32", Counters="*i32")
signature = dict(pointers, **{n: "i32" for n in ("M", "N8", "K", "stride_xm", "splits", "tiles_per_split")})
constants = dict(KT8=16, GROUP=128, BLOCK_M=block_m, BLOCK_N=64, GROUP_M=8, SWAPPED=True, SPLIT_K=False,
                 HAS_BIAS=False, PRECISION="tf32", PTX=True, ORDER=fragment)
names = list(signature) + list(constants)
src = ASTSource(w4a16._gemm_kernel, dict(signature, **{n: "constexpr" for n in constants}),
                constexprs={(names.index(n),): v for n, v in constants.items()},
                attrs={(names.index(n),): [["tt.divisibility", 16]] for n in list(pointers) + ["N8", "stride_xm"]})
cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["cubin"]
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(cubin)
    f.flush()
    sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
print(sass.count("HGMMA."), sass.count("DEPBAR.LE gsb0, 0x0"))
"""


@pytest.mark.parametrize("block_m, fragment", [(16, False), (32, True)])
def test_swapped_gemm_keeps_its_wgmmas_in_flight(block_m, fragment):
    """ptxas serializes every wgmma of a loop whose accumulator can also reach the pipeline's end
    from outside it (a zero-trip path): a full wait, DEPBAR.LE gsb0 0x0, after each. The swapped
    tiles were so compiled until the kernel stated that its K loop runs."""
    import os
    import subprocess
    import sys

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("this Triton has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SM90_SWAPPED_GEMM, str(block_m), str(int(fragment))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wgmmas, full_waits = map(int, out.stdout.split())
    assert wgmmas >= 8  # eight K slices of 16 in a 128-row step
    assert full_waits <= 2, f"{full_waits} full waits for {wgmmas} wgmmas: serialized"


# ---------------------------------------------------------------------------------------------- GPU


# One-hot activation rows for the exactness tests (K = 1024, G = 128): row i picks k = 16i + (i // 2) % 16,
# distinct, in every group, and every residue mod 32, so every nibble slot of a word in either row order.
ONE_HOT_K = torch.arange(64) * 16 + (torch.arange(64) // 2) % 16


def _gpu_case(m, k, n, group, dtype, bias, seed=0):
    packed, _ = _layer(n, k, group, seed=seed, device="cuda")
    x, b = _inputs(m, k, n, dtype, seed=seed + 1, bias=bias, device="cuda")
    ref = w4a16_linear_ref(x, packed, group, b)
    return packed, x, b, ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 8, 100, 2048])
@pytest.mark.parametrize("k, n, group", [(4096, 12288, 128), (11008, 4104, 128), (3584, 4608, 64), (512, 136, 32)])
def test_w4a16_linear_real_shapes(dtype, m, k, n, group, order):
    packed, x, b, ref = _gpu_case(m, k, n, group, dtype, bias=(m % 3 != 2), seed=m)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    out.copy_(w4a16_linear(x, packed, group, b))
    _check_all_written(out)
    # fp16 / bf16 output rounding (and bf16 weights in the tensor-core paths)
    assert _rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 8e-3)
    assert not packed["counters"].any() and not packed["workspace"].any()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k, n, swiglu", [(4096, 4096, False), (4096, 12288, False), (11008, 4096, True)])
def test_gemv_sums_read_by_add_rmsnorm_real_shapes(m, k, n, swiglu, order):
    """The decode shapes' GEMVs ending at their adds: add_rmsnorm of their Sums equals add_rmsnorm of
    their output, call after call (each read zeroes the workspace)."""
    from tinyvila.kernels.rmsnorm import add_rmsnorm

    packed, _ = _layer(n, k, 128, seed=m, device="cuda")
    x, _ = _inputs(m, 2 * k if swiglu else k, n, torch.float16, seed=m + 1, device="cuda")
    h, w = _inputs(m, n, n, torch.float16, seed=7, bias=True, device="cuda")
    want = add_rmsnorm(h, w4a16.gemv(x, packed, 128, swiglu=swiglu), w, 1e-6)
    for _ in range(3):
        got = add_rmsnorm(h, w4a16.gemv(x, packed, 128, swiglu=swiglu, sums=True), w, 1e-6)
        for ours, ref in zip(got, want):  # the fp32 adds land in any order
            torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3)
        assert not packed["workspace"].any() and not packed["counters"].any()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 17, 64, 150])
def test_gemv_and_gemm_forced_at_small_m(m, order):
    packed, x, b, ref = _gpu_case(m, 4096, 4096, 128, torch.float16, bias=True, seed=10 + m)
    fused = [w4a16.gemm(x, packed, 128, b, swapped=swapped) for swapped in (False, True)]
    for out in ([w4a16.gemv(x, packed, 128, b)] if m <= 4 else []) + fused + [w4a16.dequant_matmul(x, packed, 128, b)]:
        _check_all_written(out)
        assert _rel_err(out, ref) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("swapped", [False, True])
def test_ptx_dequantization_is_bit_identical(monkeypatch, swapped, order):
    """The fused GEMM's inline-PTX fp16 dequantization against its fp32 form: one-hot rows pick
    single weights (every nibble position, edge zeros, a scale whose products are subnormal, a
    large one), which must be the reference's values rounded to fp16 by both; random rows agree."""
    packed, _ = _layer(256, 1024, 128, seed=5, device="cuda")
    packed["zeros"][0, :2] = torch.tensor([0, 15], dtype=torch.uint8)
    packed["scales"][1, :2] = torch.tensor([3e-5, 60.0], dtype=torch.float16)
    x = torch.zeros(64, 1024, device="cuda", dtype=torch.float16)
    x[torch.arange(64), ONE_HOT_K] = 1
    x = torch.cat([x, torch.randn(64, 1024, device="cuda", dtype=torch.float16)])
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("TINYVILA_W4_PTX", flag)
        assert w4a16.ptx_dequant(x, packed) == (flag == "1")
        outs[flag] = w4a16.gemm(x, packed, 128, swapped=swapped, block_m=64 if swapped else 16)
    want = dequantize_w4(packed, 128)[:, ONE_HOT_K].t().half()
    assert torch.equal(outs["1"][:64], want) and torch.equal(outs["0"][:64], want)
    assert _rel_err(outs["1"][64:], outs["0"][64:]) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_ptx_step_against_the_fp32_step(monkeypatch, m, order):
    """The GEMV's fp16x2 inline-PTX step (products summed in fp16, four to a lane) against its fp32
    step and the reference: one-hot rows pick single weights (every nibble position, edge zeros, a
    subnormal and a large scale: a wrong plane, shift or activation pair shows), random rows agree
    to fp16 rounding, activations in the thousands (outlier channels) do not overflow the fp16
    partial sums; a SwiGLU input goes through SiLU-mul first."""
    from tinyvila.kernels.silu_mul import silu_mul_ref

    k, n = 1024, 264
    packed, _ = _layer(n, k, 128, seed=6, device="cuda")
    scales = packed["scales"].clone()
    packed["zeros"][0, :2] = torch.tensor([0, 15], dtype=torch.uint8)
    packed["scales"][1, :2] = torch.tensor([3e-5, 60.0], dtype=torch.float16)
    w = dequantize_w4(packed, 128)
    for rows in ONE_HOT_K.split(m):
        x = torch.zeros(len(rows), k, device="cuda", dtype=torch.float16)
        x[torch.arange(len(rows)), rows] = 1
        want = w[:, rows].t().half()
        assert torch.equal(w4a16.gemv(x, packed, 128, ptx=True), want), rows
        assert torch.equal(w4a16.gemv(x, packed, 128, ptx=False), want), rows
    packed["scales"].copy_(scales)  # a scale of 60 would overflow fp16 at the large activations below
    for scale in (1.0, 3000.0):
        x, b = _inputs(m, k, n, torch.float16, seed=m, bias=True, device="cuda")
        x = (x.float() * scale).half()
        ref = w4a16_linear_ref(x, packed, 128, b)
        ptx = w4a16.gemv(x, packed, 128, b, ptx=True)
        _check_all_written(ptx)
        assert _rel_err(ptx, ref) < 2e-3 and _rel_err(ptx, w4a16.gemv(x, packed, 128, b, ptx=False)) < 2e-3
    gate_up, b = _inputs(m, 2 * k, n, torch.float16, seed=m + 7, bias=True, device="cuda")
    ref = w4a16_linear_ref(silu_mul_ref(gate_up.float()), packed, 128, b)
    for ptx in (True, False):
        assert _rel_err(w4a16.gemv(gate_up, packed, 128, b, swiglu=True, ptx=ptx), ref) < 2e-3
    # the default: PTX for fp16 rows 4-byte aligned, unless TINYVILA_W4_PTX=0
    odd = torch.randn(k + 1, device="cuda", dtype=torch.float16)[1:].view(1, k)  # 2-byte aligned
    assert w4a16.gemv_ptx(x, packed) and not w4a16.gemv_ptx(odd, packed)
    assert _rel_err(w4a16.gemv(odd, packed, 128), w4a16_linear_ref(odd, packed, 128)) < 2e-3
    monkeypatch.setenv("TINYVILA_W4_PTX", "0")
    assert not w4a16.gemv_ptx(x, packed)
    assert not packed["counters"].any() and not packed["workspace"].any()


@pytest.mark.gpu
def test_cuda_graph_replay():
    """Captured once, replayed with new inputs: the split-K semaphores must reset themselves."""
    packed, x, b, _ = _gpu_case(1, 4096, 4096, 128, torch.float16, bias=True)
    xs = [torch.randn(m, 4096, device="cuda", dtype=torch.float16) for m in (1, 6, 64)]
    w4a16_linear(xs[0], packed, 128, b)  # compile outside the capture
    for x in xs:
        w4a16_linear(x, packed, 128, b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs, outs = [], []
    with torch.cuda.stream(stream):
        for x in xs:
            gph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gph, stream=stream):
                outs.append(w4a16_linear(x, packed, 128, b))
            graphs.append(gph)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        for x, gph, out in zip(xs, graphs, outs):
            x.normal_()
            gph.replay()
            torch.cuda.synchronize()
            assert _rel_err(out, w4a16_linear_ref(x, packed, 128, b)) < 2e-3
    assert not packed["counters"].any() and not packed["workspace"].any()


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(4096, 4104), (11008, 4096)])
def test_gemv_split_k_every_config(k, n):
    """Many programs per column block and 1..4 rows, several layouts of the partial sums: the
    split-K tail once read the workspace and zeroed it from different threads (a race)."""
    packed, _ = _layer(n, k, 128, seed=3, device="cuda")
    for m in (1, 2, 3, 4):
        x, b = _inputs(m, k, n, torch.float16, seed=m, bias=True, device="cuda")
        ref = w4a16_linear_ref(x, packed, 128, b)
        for nw, cpt, kt, u in [(4, 4, 64, 1), (4, 8, 32, 2), (2, 4, 16, 3), (8, 4, 32, 1), (2, 8, 32, 3),
                               (1, 4, 64, 2), (2, 4, 64, 3)]:
            for _ in range(3):
                out = w4a16.gemv(x, packed, 128, b, num_warps=nw, cols_per_thread=cpt, k_tile=kt, waves=8, unroll=u)
                assert _rel_err(out, ref) < 2e-3, (m, nw, cpt, kt, u)
        assert not packed["counters"].any() and not packed["workspace"].any()


def test_gemv_ptx_step_off_on_the_cpu():
    """The interpreter and the CPU run no PTX: the GEMV takes its fp32 step there."""
    packed, _ = _layer(40, 128, 32, seed=2, device="cpu")
    assert not w4a16.gemv_ptx(torch.randn(1, 128, dtype=torch.float16), packed)


def test_pdl_off_on_the_cpu_and_by_environment(monkeypatch):
    from tinyvila.kernels import pdl

    assert pdl.launch_options(torch.device("cpu"), dependent=True) == {"PDL": False}
    monkeypatch.setenv("TINYVILA_PDL", "0")
    assert pdl.launch_options(torch.device("cuda", 0), dependent=True) == {"PDL": False}


@pytest.mark.gpu
def test_pdl_chain_in_a_cuda_graph_matches_plain_launches(monkeypatch):
    """Decode's chain (RMSNorm, gate/up GEMV, SwiGLU-fused down GEMV, residual add + RMSNorm, ...)
    with programmatic dependent launch, each kernel starting while the one before still runs,
    replayed in a CUDA graph with new inputs: what plain launches give. A kernel that read its
    input before the previous one had written it would be off by the whole value, not by the
    rounding that the split-K atomics' order leaves."""
    from tinyvila.kernels.rmsnorm import add_rmsnorm, rmsnorm

    K, I, G = 2048, 5632, 128
    up, _ = _layer(2 * I, K, G, seed=1, device="cuda", dtype=torch.float16)
    down, _ = _layer(K, I, G, seed=2, device="cuda", dtype=torch.float16)
    weight = torch.rand(K, device="cuda", dtype=torch.float16) + 0.5

    def chain(x):
        h, n = x, rmsnorm(x, weight, 1e-6)
        for _ in range(4):
            delta = w4a16.gemv(w4a16.gemv(n, up, G), down, G, swiglu=True)
            n, h = add_rmsnorm(h, delta, weight, 1e-6)
        return n

    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    chain(x)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = chain(x)
    torch.cuda.current_stream().wait_stream(stream)
    monkeypatch.setenv("TINYVILA_PDL", "0")
    for _ in range(50):
        x.normal_()
        graph.replay()
        plain = chain(x)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and _rel_err(out, plain) < 1e-2
    assert not up["counters"].any() and not down["counters"].any()
