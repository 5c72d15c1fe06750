"""Triton kernels against their PyTorch references: tiny shapes on the CPU through the Triton
interpreter (CI), real shapes on the GPU (`pytest -m gpu`)."""
import pytest
import torch

from tinyvila.kernels.decode_attention import decode_attention, decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _decode_case(hq, hkv, s, d, length, dtype, window=None, splits=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(hkv, s, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(hkv, s, d, generator=g).to(DEVICE, dtype)
    n = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    ours = decode_attention(q, k, v, n, window=window, splits=splits, block=16)
    ref = decode_attention_ref(q, k, v, length, window=window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (ours.float() - ref.float()).abs().max() <= tol


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("length", [1, 7, 37, 64])
def test_decode_attention_tiny(hq, hkv, length):
    _decode_case(hq, hkv, 64, 16, length, torch.float32, splits=4)


def test_decode_attention_window_and_split_edges():
    _decode_case(4, 2, 80, 16, 75, torch.float32, window=20, splits=4)  # window inside one split
    _decode_case(4, 2, 80, 16, 75, torch.float32, window=50, splits=8)  # window across splits
    _decode_case(2, 2, 48, 16, 48, torch.float32, splits=1)  # one split, full buffer


def test_decode_attention_length_is_read_on_the_device():
    """The same launch with another length in the tensor gives the other answer (graph replay)."""
    q, k, v = torch.randn(2, 16), torch.randn(2, 32, 16), torch.randn(2, 32, 16)
    n = torch.tensor([5], dtype=torch.int32)
    a = decode_attention(q, k, v, n, splits=2, block=16)
    n.fill_(30)
    b = decode_attention(q, k, v, n, splits=2, block=16)
    assert torch.allclose(a, decode_attention_ref(q, k, v, 5), atol=1e-5)
    assert torch.allclose(b, decode_attention_ref(q, k, v, 30), atol=1e-5)


def test_decode_attention_reuses_one_workspace():
    """One workspace serves call after call (as in a replayed graph), its split count taken from
    it, at lengths shorter than, equal to and longer than the split count, GQA too."""
    from tinyvila.kernels.decode_attention import decode_workspace

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(6, 16, generator=g), torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    ws = decode_workspace(6, 8, 16, "cpu")
    n = torch.zeros(1, dtype=torch.int32)
    for length in (3, 8, 40, 1, 27):
        n.fill_(length)
        out = decode_attention(q, k, v, n, workspace=ws, block=16)
        assert torch.allclose(out, decode_attention_ref(q, k, v, length), atol=1e-5), length


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, length", [(32, 32, 2979), (28, 4, 2363), (32, 8, 8191), (28, 4, 1)])
def test_decode_attention_real_shapes(dtype, hq, hkv, length):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(hq, 128, generator=g).cuda().to(dtype)
    k = torch.randn(hkv, 8192, 128, generator=g).cuda().to(dtype)
    v = torch.randn(hkv, 8192, 128, generator=g).cuda().to(dtype)
    n = torch.tensor([length], dtype=torch.int32, device="cuda")
    ours = decode_attention(q, k, v, n)
    ref = decode_attention_ref(q, k, v, length)
    assert (ours.float() - ref.float()).abs().max() <= 2e-2


from tinyvila.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref  # noqa: E402
from tinyvila.kernels.decode_attention import decode_attention_rows, decode_attention_rows_ref  # noqa: E402
from tinyvila.kernels.rope_append import rope_append, rope_append_ref, rope_append_rows, rope_append_rows_ref  # noqa
from tinyvila.kernels.silu_mul import silu_mul, silu_mul_ref  # noqa: E402


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("rows, n", [(1, 64), (3, 40), (2, 100)])
def test_rmsnorm_and_add_rmsnorm(rows, n):
    x, d, w = torch.randn(rows, n), torch.randn(rows, n), torch.randn(n)
    assert torch.allclose(rmsnorm(x.to(DEVICE), w.to(DEVICE), 1e-6).cpu(), rmsnorm_ref(x, w, 1e-6), atol=1e-5)
    y, s = add_rmsnorm(x.to(DEVICE), d.to(DEVICE), w.to(DEVICE), 1e-5)
    y_ref, s_ref = add_rmsnorm_ref(x, d, w, 1e-5)
    assert torch.allclose(s.cpu(), s_ref) and torch.allclose(y.cpu(), y_ref, atol=1e-5)


@pytest.mark.parametrize("rows, inter", [(1, 48), (2, 100)])
def test_silu_mul(rows, inter):
    gu = torch.randn(rows, 2 * inter)
    assert torch.allclose(silu_mul(gu.to(DEVICE), block=32).cpu(), silu_mul_ref(gu), atol=1e-5)
    wide = silu_mul(gu.to(DEVICE), block=32, width=inter + 12).cpu()  # a padded down projection's input
    assert torch.allclose(wide[:, :inter], silu_mul_ref(gu), atol=1e-5) and not wide[:, inter:].any()


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
def test_rope_append(hq, hkv):
    D, S, slot = 16, 10, 7
    qkv = torch.randn(1, (hq + 2 * hkv) * D)
    ang = torch.randn(1, D // 2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    k_ref, v_ref = torch.randn(hkv, S, D), torch.randn(hkv, S, D)
    k, v = k_ref.clone().to(DEVICE), v_ref.clone().to(DEVICE)
    q = rope_append(qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), k, v, torch.tensor([slot], device=DEVICE), hq, hkv)
    q_ref = rope_append_ref(qkv, cos, sin, k_ref, v_ref, slot, hq, hkv)
    assert torch.allclose(q.cpu(), q_ref, atol=1e-5)
    assert torch.allclose(k.cpu(), k_ref, atol=1e-5) and torch.equal(v.cpu(), v_ref)


def _row_caches(caps, layers, hkv, d, dtype, seed=0):
    """Each row's own cache [L, Hkv, cap, D] (K, V) and the address table the row kernels read."""
    g = torch.Generator().manual_seed(seed)
    caches = [tuple(torch.randn(layers, hkv, cap, d, generator=g).to(DEVICE, dtype) for _ in "kv") for cap in caps]
    table = torch.tensor([[k.data_ptr() for k, _ in caches], [v.data_ptr() for _, v in caches], caps],
                         dtype=torch.int64, device=DEVICE)
    return caches, table


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window, splits", [(None, 1), (None, 4), (20, 2)])
def test_decode_attention_rows(hq, hkv, window, splits):
    """Rows of different capacities and lengths (one of a single key), each over its own cache."""
    caps, lengths, D = [40, 9, 70], [33, 1, 64], 16
    caches, table = _row_caches(caps, 3, hkv, D, torch.float32)
    q = torch.randn(len(caps), hq, D).to(DEVICE)
    for layer in (0, 2):
        ours = decode_attention_rows(q, table, layer, torch.tensor(lengths, dtype=torch.int32, device=DEVICE), hkv,
                                     window=window, splits=splits, block=16)
        ref = decode_attention_rows_ref(q, [(k[layer], v[layer]) for k, v in caches], lengths, window=window)
        assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.gpu
def test_gpu_decode_attention_rows_real_shapes():
    caps, lengths = [4096, 3100, 600, 9000], [2990, 3100, 17, 8192]
    caches, table = _row_caches(caps, 2, 8, 128, torch.float16)
    q = torch.randn(len(caps), 32, 128, device=DEVICE, dtype=torch.float16)
    ours = decode_attention_rows(q, table, 1, torch.tensor(lengths, dtype=torch.int32, device=DEVICE), 8)
    ref = decode_attention_rows_ref(q, [(k[1], v[1]) for k, v in caches], lengths)
    assert (ours.float() - ref.float()).abs().max() <= 2e-2


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_append_rows(qk_norm):
    """Rows writing their k and v into their own caches at their own slots, q rotated per row."""
    hq, hkv, D, caps, slots, layer = 4, 2, 16, [40, 9, 70], [33, 0, 69], 1
    caches, table = _row_caches(caps, 3, hkv, D, torch.float32)
    before = [(k.cpu().clone(), v.cpu().clone()) for k, v in caches]
    qkv = torch.randn(3, (hq + 2 * hkv) * D)
    ang = torch.randn(3, D // 2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    norm = (torch.randn(D) + 1, torch.randn(D) + 1, 1e-6) if qk_norm else None
    q = rope_append_rows(qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), table, layer,
                         torch.tensor(slots, device=DEVICE), hq, hkv, None if norm is None else
                         (norm[0].to(DEVICE), norm[1].to(DEVICE), norm[2]))
    q_ref = rope_append_rows_ref(qkv, cos, sin, [(k[layer], v[layer]) for k, v in before], slots, hq, hkv, norm)
    assert torch.allclose(q.cpu(), q_ref, atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(caches, before):  # the written slots, and nothing else
        assert torch.allclose(k.cpu(), k_ref, atol=1e-5) and torch.equal(v.cpu(), v_ref)


@pytest.mark.parametrize("qk_norm, bias", [(False, False), (True, False), (False, True)])
def test_rope_append_reads_and_zeroes_gemv_sums(qk_norm, bias):
    """qkv given as a decode GEMV's fp32 Sums (fp16 activations): the same q, k and v as the sums
    plus the GEMV's bias, rounded to fp16, give, one row or several, and the sums are zeroed for the
    GEMV's next call."""
    from tinyvila.kernels.w4a16 import Sums

    hq, hkv, D, caps, slots, layer = 4, 2, 16, [12, 9], [5, 8], 0
    g = torch.Generator().manual_seed(3)
    sums = (torch.randn(2, (hq + 2 * hkv) * D, generator=g) * 2).to(DEVICE)
    b = (torch.randn((hq + 2 * hkv) * D, generator=g)).to(DEVICE, torch.float16) if bias else None
    ang = torch.randn(2, D // 2, generator=g)
    cos, sin = (torch.cat([a, a], -1).to(DEVICE, torch.float16) for a in (ang.cos(), ang.sin()))
    norm = (torch.randn(D, generator=g) + 1, torch.randn(D, generator=g) + 1, 1e-6) if qk_norm else None
    norm = None if norm is None else (norm[0].to(DEVICE, torch.float16), norm[1].to(DEVICE, torch.float16), 1e-6)
    outs = []
    plain = (sums + b.float()).half() if bias else sums.half()  # as the GEMV's own store rounds
    for given in (plain, Sums(sums.clone(), b)):
        caches, table = _row_caches(caps, 1, hkv, D, torch.float16, seed=1)
        k, v = (t.clone() for t in _row_caches(caps, 1, hkv, D, torch.float16, seed=2)[0][0])
        one = given[:1] if isinstance(given, torch.Tensor) else Sums(given.values[:1].clone(), b)
        q1 = rope_append(one, cos[:1], sin[:1], k[0], v[0], torch.tensor([3], device=DEVICE), hq, hkv, norm)
        q = rope_append_rows(given, cos, sin, table, layer, torch.tensor(slots, device=DEVICE), hq, hkv, norm)
        outs.append((q1, k, v, q, caches))
        if not isinstance(given, torch.Tensor):
            assert not given.values.any() and not one.values.any()
    (q1, k, v, q, caches), (q1s, ks, vs, qs, caches_s) = outs
    assert torch.equal(q1, q1s) and torch.equal(k, ks) and torch.equal(v, vs) and torch.equal(q, qs)
    for (a, b), (c, d) in zip(caches, caches_s):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_append_with_qk_norm(dtype):
    """Qwen3's per-head q/k RMSNorm fused before the rotation equals the RMSNorm module, then RoPE."""
    from tinyvila.models.layers import RMSNorm, apply_rope

    hq, hkv, D, S, slot = 4, 2, 16, 10, 3
    qkv = (torch.randn(1, (hq + 2 * hkv) * D) * 3).to(dtype)
    ang = torch.randn(1, D // 2)
    cos, sin = (torch.cat([a, a], -1).to(dtype) for a in (ang.cos(), ang.sin()))
    q_norm, k_norm = RMSNorm(D, 1e-6), RMSNorm(D, 1e-6)
    with torch.no_grad():
        q_norm.weight.normal_(1, 0.3)
        k_norm.weight.normal_(1, 0.3)
    q_norm, k_norm = q_norm.to(dtype), k_norm.to(dtype)
    k, v = torch.zeros(hkv, S, D, dtype=dtype, device=DEVICE), torch.zeros(hkv, S, D, dtype=dtype, device=DEVICE)
    norms = (q_norm.weight.to(DEVICE), k_norm.weight.to(DEVICE), 1e-6)
    q = rope_append(qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), k, v, torch.tensor([slot], device=DEVICE), hq,
                    hkv, norms)
    qs, ks, vs = qkv.view(-1).split([hq * D, hkv * D, hkv * D])
    with torch.no_grad():
        q_ref = apply_rope(q_norm(qs.view(hq, 1, D)), cos, sin).view(hq, D)
        k_ref = apply_rope(k_norm(ks.view(hkv, 1, D)), cos, sin).view(hkv, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (q.cpu().float() - q_ref.float()).abs().max() <= tol
    assert (k[:, slot].cpu().float() - k_ref.float()).abs().max() <= tol
    assert torch.equal(v[:, slot].cpu(), vs.view(hkv, D)) and not k[:, slot - 1].any()
    ref_k, ref_v = torch.zeros(hkv, S, D, dtype=dtype), torch.zeros(hkv, S, D, dtype=dtype)
    q_ref2 = rope_append_ref(qkv, cos, sin, ref_k, ref_v, slot, hq, hkv, (q_norm.weight, k_norm.weight, 1e-6))
    assert (q_ref2.float() - q_ref.float()).abs().max() <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_kernels_real_shapes(dtype):
    x, d = torch.randn(1, 3584, device="cuda", dtype=dtype), torch.randn(1, 3584, device="cuda", dtype=dtype)
    w = torch.randn(3584, device="cuda", dtype=dtype)
    y, s = add_rmsnorm(x, d, w, 1e-6)
    y_ref, s_ref = add_rmsnorm_ref(x, d, w, 1e-6)
    assert torch.equal(s, s_ref) and (y.float() - y_ref.float()).abs().max() <= _tol(dtype) * 4
    gu = torch.randn(1, 2 * 18944, device="cuda", dtype=dtype)
    assert (silu_mul(gu).float() - silu_mul_ref(gu).float()).abs().max() <= _tol(dtype) * 4
    hq, hkv, D = 28, 4, 128
    qkv = torch.randn(1, (hq + 2 * hkv) * D, device="cuda", dtype=dtype)
    ang = torch.randn(1, D // 2, device="cuda")
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(dtype) for f in (torch.cos, torch.sin))
    k, v = torch.zeros(hkv, 64, D, device="cuda", dtype=dtype), torch.zeros(hkv, 64, D, device="cuda", dtype=dtype)
    k2, v2 = k.clone(), v.clone()
    q = rope_append(qkv, cos, sin, k, v, torch.tensor([33], device="cuda"), hq, hkv)
    q_ref = rope_append_ref(qkv, cos, sin, k2, v2, 33, hq, hkv)
    assert (q.float() - q_ref.float()).abs().max() <= _tol(dtype) * 4 and torch.equal(v, v2)
    assert (k.float() - k2.float()).abs().max() <= _tol(dtype) * 4


from tinyvila.kernels.rope import rope_, rope_ref  # noqa: E402


def test_rope_in_place_on_a_strided_view():
    T, Hq, Hkv, D = 5, 4, 2, 16
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D)
    ang = torch.randn(T, D // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    ref = rope_ref(qkv[:, Hq * D:(Hq + Hkv) * D].reshape(T, Hkv, D), cos, sin)
    dev = qkv.clone().to(DEVICE)
    k = dev[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)  # a view into the fused projection
    rope_(k, cos.to(DEVICE), sin.to(DEVICE), block_h=1)
    assert torch.allclose(k.cpu(), ref, atol=1e-5)
    assert torch.equal(dev[:, :Hq * D].cpu(), qkv[:, :Hq * D])  # nothing else touched


def test_rope_with_fp32_tables_rounds_once():
    """Qwen2.5-VL's ViT rotates in fp32: with fp32 tables the kernel computes in fp32 and rounds to
    the activation dtype once, as rope_fp32's PyTorch path does."""
    from tinyvila.models.qwen2_5_vl import rope_fp32

    T, H, D = 6, 3, 40  # half of D not a power of two, like the ViT's 80
    x = (torch.randn(T, 2, H, D) * 4).to(torch.bfloat16)
    ang = torch.randn(T, D // 2) * 3
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    ref = rope_fp32(x[:, 1], cos, sin)  # the CPU path
    dev = x.clone().to(DEVICE)
    rope_(dev[:, 1], cos.to(DEVICE), sin.to(DEVICE))
    assert (dev[:, 1].float().cpu() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert torch.equal(dev[:, 0].cpu(), x[:, 0])


@pytest.mark.gpu
def test_row_kernels_past_two_to_the_31_elements():
    """A 256-frame video prompt (66K rows) times Qwen2's 2 x 18944 gate/up width passes 2**31."""
    rows, inter = 57000, 18944
    gu = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.float16)
    out = silu_mul(gu)
    tail = slice(rows - 3, rows)
    assert (out[tail].float() - silu_mul_ref(gu[tail]).float()).abs().max() <= 4e-2
    del gu, out
    x = torch.randn(rows * 8, 4096 + 512, device="cuda", dtype=torch.float16)
    w = torch.randn(4096 + 512, device="cuda", dtype=torch.float16)
    y = rmsnorm(x, w, 1e-6)
    assert (y[-2:].float() - rmsnorm_ref(x[-2:], w, 1e-6).float()).abs().max() <= 4e-2


def test_fused_decoder_paths_match_the_eager_decoder():
    """The GPU code paths (fused blocks, the Triton decode step) run here through the interpreter
    and must give the eager decoder's logits: prefill, then one decode token at slot T."""
    from tinyvila.kv_cache import KVCache
    from tinyvila.models.layers import DecoderLM, TextConfig

    cfg = TextConfig.from_dict(dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6), "qwen2")
    torch.manual_seed(0)
    lm = DecoderLM(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.3)
    T = 7
    ids = torch.randint(0, 64, (T + 1,))
    new = lambda: KVCache(2, 2, 8, 16, "cpu", torch.float32)  # noqa: E731
    with torch.no_grad():
        ref_cache, fused_cache = new(), new()
        ref = lm(lm.embed(ids), torch.arange(T + 1), ref_cache, 0, logits="all")
        cos, sin = lm.rope_tables(torch.arange(T), torch.float32)
        mask = lm.attention_mask(T, 0, "cpu")
        h = lm.fused_blocks(lm.embed(ids[:T]),
                            lambda i, layer, x: layer.self_attn(x, cos, sin, fused_cache.layer(i), 0, mask))
        assert torch.allclose(lm.project(h), ref[:T], atol=1e-4)
        from tinyvila.kernels.decode_attention import decode_workspace, split_count

        ws = decode_workspace(4, split_count(16, 2), 8, "cpu")
        step = lm.decode_step(ids[T:], torch.tensor([T]), fused_cache, torch.tensor([T]),
                              torch.tensor([T + 1], dtype=torch.int32), ws)
    assert torch.allclose(step[0], ref[T], atol=1e-4)
