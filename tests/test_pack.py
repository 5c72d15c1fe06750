"""The AutoAWQ GEMM layout: known-answer vectors for the nibble order, round trips, an independent
bit-by-bit unpacker, and the quantization error bound."""
import pytest
import torch

from tinyvila.quant.pack import AWQ_ORDER, dequantize, pack, quantize, unpack


def unpack_by_hand(word: int) -> list:
    """Column values of one int32 of the AWQ layout, read bit by bit (independent of quant/pack.py)."""
    word &= 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    columns = [0] * 8
    for i, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):  # nibble i holds this column
        columns[column] = nibbles[i]
    return columns


def test_known_answer_vectors():
    # columns 0..7 hold the values 0..7: nibble i holds column AWQ_ORDER[i], i.e. the value AWQ_ORDER[i]
    expected = sum(v << (4 * i) for i, v in enumerate([0, 2, 4, 6, 1, 3, 5, 7]))
    assert expected == 0x75316420
    assert pack(torch.arange(8).view(1, 8)).item() == 0x75316420
    # a 15 in column 7 (nibble 7) sets the sign bit of the int32
    values = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]])
    assert pack(values).item() == -(2**31) + 0x70000000
    assert unpack(pack(values)).tolist() == values.tolist()


def test_round_trip_and_independent_unpacker():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (5, 64), generator=g)
    packed = pack(values)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert torch.equal(unpack(packed), values.to(torch.int32))
    for r in range(5):
        for c in range(8):
            assert unpack_by_hand(int(packed[r, c])) == values[r, 8 * c:8 * c + 8].tolist()
    assert AWQ_ORDER == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("group", [16, 32, 128])
def test_quantize_dequantize_error_bound(group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g)
    qweight, qzeros, scales = quantize(w, group)
    assert qweight.shape == (256, 6) and qzeros.shape == (256 // group, 6) and scales.shape == (256 // group, 48)
    back = dequantize(qweight, qzeros, scales)
    step = scales.float().repeat_interleave(group, 0).t()  # [N, K]
    # random normal groups straddle zero, so no zero point is clamped: the error stays near half a step
    assert ((back - w).abs() <= step * 1.01 + 1e-3).all()
    assert (back - w).abs().mean() < step.mean() / 2


def test_bad_shapes():
    with pytest.raises(AssertionError):
        pack(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(AssertionError):
        quantize(torch.zeros(8, 100), 16)
