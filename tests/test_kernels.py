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
