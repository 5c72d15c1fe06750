"""One preallocated KV cache per conversation.

The cache is allocated once, at the conversation's full context length, so its memory never grows
or moves: the captured decode graphs read it at fixed addresses. Slots [0, length) hold the K/V of
the conversation's tokens in prompt order (`Session.tokens` says what each slot holds); a new turn
truncates it to the prefix it shares with the new prompt and prefills the rest. Decode retrieval
gathers a subset of its slots into a second, smaller cache (`gather_into`), the decode buffer.
"""
import torch

from tinyvila.kernels.compact_kv import gather_kv


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # slots [0, length) hold valid K/V

    def layer(self, i: int):
        """This layer's K and V buffers, [H_kv, max_len, D] each."""
        return self.k[i], self.v[i]

    def address(self) -> tuple:
        """(K address, V address, capacity): this cache's column of the table the batched decode
        kernels read (kernels/decode_attention.py: decode_attention_rows)."""
        return self.k.data_ptr(), self.v.data_ptr(), self.max_len

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def truncate(self, n: int) -> None:
        """Forget slots n and beyond (their memory is reused by what is prefilled next)."""
        self.length = min(self.length, n)

    def gather_into(self, index: torch.Tensor, dst: "KVCache") -> None:
        """Compaction: dst's slots 0..S hold this cache's slots `index` [L, G, S] (G = 1: one list
        per layer; G = n_kv_heads: one per KV head), K/V moved as they are (RoPE already applied)."""
        if self.k.is_cuda:
            gather_kv(self.k, self.v, index, dst.k, dst.v)
        else:
            L, H, _, D = self.k.shape
            idx = index.expand(L, H, -1)[..., None].expand(-1, -1, -1, D)
            dst.k[:, :, :index.shape[-1]] = torch.gather(self.k, 2, idx)
            dst.v[:, :, :index.shape[-1]] = torch.gather(self.v, 2, idx)
        dst.length = index.shape[-1]
