"""Per-request KV cache for a slice of layers, preallocated and compacted in place.

Tree verification appends every drafted node; a prune keeps the accepted path and the
surviving subtree. Gathering the kept entries to the front (instead of recomputing them)
is what makes accepted tokens free after verification.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Keys/values for ``n_layers`` local layers; entries ``[0, length)`` are live."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        capacity: int = 256,
        max_capacity: int = 1 << 16,
    ):
        self.n_layers, self.n_kv_heads, self.head_dim, self.dtype = n_layers, n_kv_heads, head_dim, dtype
        self.max_capacity = max_capacity
        self.length = 0
        self.k = torch.zeros(n_layers, n_kv_heads, capacity, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @torch.inference_mode()
    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more entries, doubling so appends stay amortised O(1)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        if need > self.max_capacity:
            raise RuntimeError(
                f"KV cache would hold {need} entries, over the limit of {self.max_capacity}; "
                "shorten the prompt or max_tokens, or raise the context limit."
            )
        cap = min(self.max_capacity, max(need, 2 * self.capacity))
        k = torch.zeros(self.n_layers, self.n_kv_heads, cap, self.head_dim, dtype=self.dtype)
        v = torch.zeros_like(k)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    @torch.inference_mode()
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (heads, T, dim) after the live entries; return the live views including them.

        ``length`` advances only in :meth:`commit`, once every layer of the forward has written.
        """
        t = k.shape[1]
        end = self.length + t
        self.k[layer, :, self.length : end] = k
        self.v[layer, :, self.length : end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, t: int) -> None:
        self.length += t

    @torch.inference_mode()
    def keep(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Gather the entries at ``indices`` (ascending) to the front and drop the rest."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        n = int(idx.numel())
        if n and int(idx[-1]) >= self.length:
            raise IndexError(f"keep index {int(idx[-1])} beyond cache length {self.length}")
        # Entries already in place (the committed prefix, every round) need no copy: only the
        # tail from the first moved index is gathered, so a prune costs O(tree), not O(context).
        same = int((idx == torch.arange(n)).cumprod(0).sum()) if n else 0
        if same < n:
            tail = idx[same:]
            self.k[:, :, same:n] = self.k[:, :, : self.length].index_select(2, tail)
            self.v[:, :, same:n] = self.v[:, :, : self.length].index_select(2, tail)
        self.length = n

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise IndexError(f"cannot truncate cache of length {self.length} to {n}")
        self.length = n

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_per_entry(self) -> int:
        """Keys and values of one position over all of this cache's layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.k.element_size()

    @torch.inference_mode()
    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start from a stored prefix: copy ``k, v`` (layers, heads, n, dim) into entries ``[0, n)``.

        A copy, not a view: this cache then writes after them and compacts in place, while the
        stored prefix must stay as it was for the next request that reuses it."""
        if tuple(k.shape[:2]) != (self.n_layers, self.n_kv_heads) or k.shape[3] != self.head_dim:
            raise ValueError(
                f"a stored prefix of shape {tuple(k.shape)} does not fit a cache of {self.n_layers} layers, "
                f"{self.n_kv_heads} KV heads and head dim {self.head_dim}"
            )
        n = k.shape[2]
        self.length = 0
        self.reserve(n)
        self.k[:, :, :n] = k
        self.v[:, :, :n] = v
        self.length = n

    @torch.inference_mode()
    def gather(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """New tensors holding the entries at ``slots``, in that order (what a stored prefix keeps)."""
        idx = torch.as_tensor(slots, dtype=torch.long)
        if idx.numel() and int(idx.max()) >= self.length:
            raise IndexError(f"gather slot {int(idx.max())} beyond cache length {self.length}")
        return self.k[:, :, : self.length].index_select(2, idx), self.v[:, :, : self.length].index_select(2, idx)
