"""Memory-augmented attention: learned persistent memory slots, and a kNN memory of past keys and values.

Papers: Sainbayar Sukhbaatar, Edouard Grave, Guillaume Lample, Herve Jegou, Armand Joulin, "Augmenting
Self-attention with Persistent Memory", 2019, arXiv:1907.01470; Yuhuai Wu, Markus N. Rabe, DeLesley
Hutchins, Christian Szegedy, "Memorizing Transformers", 2022, arXiv:2203.08913.

Idea: two ways to let attention read more than the current input. Persistent memory adds N learned key
and value vectors per head to every attention call; they do not depend on the input, every query may
always see them (no mask hides them), and they act like a learned, input-independent feed-forward store.
A kNN memory keeps the keys and values of PAST segments (not trained through); each query retrieves its
top-k keys by dot product, attends over those k with its own softmax, and a learned per-head gate mixes
the result with ordinary attention over the current input.

Equation:  local_h  = softmax(q K_h'^T / sqrt(Dh) + log M) V_h',   K_h' = [P^K_h ; K_h], V_h' = [P^V_h ; V_h]
           memory_h = softmax over the top-k of (q . m^K_j / sqrt(Dh)) of the matching m^V_j
           head_h   = g_h * memory_h + (1 - g_h) * local_h,  g_h = sigmoid(b_h);  out = Concat(heads) W^O

Complexity (Tq queries, Tk keys, N persistent slots, M memory entries): time O(H Tq (N + Tk + M) Dh) with
exact retrieval (an approximate index makes the memory term sub-linear in M), memory O(H Tq (N + Tk + M))
for the scores.

Reduces to / oracle: with no persistent slots and no kNN memory it is multi-head attention,
torch.nn.MultiheadAttention with copied weights (tests/test_memory_augmented_attention.py::
test_without_memory_it_is_torch_multihead_attention); the kNN lookup equals a brute-force sort (test_knn_
lookup_equals_brute_force_top_k); the gate at 1 and 0 gives each branch alone (test_gate_at_one_and_zero_
gives_each_branch_alone).

Docs page: docs/mechanisms/memory_augmented_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def knn_lookup(query: torch.Tensor, memory_keys: torch.Tensor, memory_values: torch.Tensor,
               top_k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact k-nearest-neighbour retrieval by scaled dot product, eq. (3).

    query (B, H, Tq, Dh); memory_keys, memory_values (B, H, M, Dh). Returns (scores (B, H, Tq, k),
    values (B, H, Tq, k, Dh), indices (B, H, Tq, k)) for the k = min(top_k, M) best keys of each query,
    best first. Memorizing Transformers uses an approximate index over a huge memory; exact top-k is the
    answer that index approximates.
    """
    _check_positive_int(top_k, "top_k")
    scores = query @ memory_keys.transpose(-2, -1) / math.sqrt(query.size(-1))  # (B, H, Tq, M)
    top_scores, indices = scores.topk(min(top_k, memory_keys.size(2)), dim=-1)  # (B, H, Tq, k)
    batch = torch.arange(query.size(0), device=query.device)[:, None, None, None]  # (B, 1, 1, 1)
    heads = torch.arange(query.size(1), device=query.device)[None, :, None, None]  # (1, H, 1, 1)
    values = memory_values[batch, heads, indices]  # (B, H, Tq, k, Dh): the values of the retrieved keys
    return top_scores, values, indices


class MemoryAugmentedAttention(nn.Module):
    """Multi-head attention with persistent memory slots and an optional kNN memory of past keys and values.

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads.
        num_persistent: number N of learned persistent key/value slots per head (0 = none).
        top_k: how many memory entries each query retrieves from the kNN memory.
        dropout: dropout probability on the attention weights (both branches), only in training mode.
        bias: whether the four projections have a bias.
    """

    def __init__(self, d_model: int, num_heads: int, num_persistent: int = 0, top_k: int = 32,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        if not isinstance(num_persistent, int) or isinstance(num_persistent, bool) or num_persistent < 0:
            raise ValueError(f"num_persistent must be an integer >= 0, got {num_persistent!r}")
        _check_positive_int(top_k, "top_k")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.num_persistent = num_persistent
        self.top_k = top_k
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        if num_persistent > 0:
            # eq. (1): N learned (key, value) pairs per head, shared by every input. Drawn from N(0, 1), the
            # same scale as the projected keys and values of unit-variance inputs.
            self.persistent_key = nn.Parameter(torch.randn(num_heads, num_persistent, self.head_dim))
            self.persistent_value = nn.Parameter(torch.randn(num_heads, num_persistent, self.head_dim))
        # eq. (5): one gate per head, sigmoid(0) = 0.5 at the start (Memorizing Transformers' learned b_g).
        self.gate = nn.Parameter(torch.zeros(num_heads))

    def memory_entries(self, key: torch.Tensor, value: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) a segment adds to the kNN memory, each (B, H, T, Dh), detached.

        Memorizing Transformers stores each segment's keys and values after it is processed and never
        back-propagates into the memory. Concatenate the entries of past segments along dim 2 (and drop
        the oldest to bound the memory) to build `memory` for the next call.
        """
        value = key if value is None else value
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(key, "key", value, "value", 1, "length")
        with torch.no_grad():
            k = self.k_proj(key).view(key.size(0), key.size(1), self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(value).view(value.size(0), value.size(1), self.num_heads, self.head_dim).transpose(1, 2)
        return k, v  # (B, H, T, Dh) each

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False,
                memory: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` to the persistent slots and `key`/`value` (default: `query`), and to `memory`.

        mask: bool, True = may attend, (Tq, Tk) or 4-D broadcastable to (B, H, Tq, Tk); key_padding_mask:
        bool (B, Tk), True = a real token; is_causal: bottom-right aligned. None of them hides the
        persistent slots or the kNN memory (both hold no future token).
        memory: optional (memory_keys, memory_values), each (B, H, M, Dh), e.g. from memory_entries() of
        earlier segments.
        Returns (B, Tq, d_model), or (output, weights (B, H, Tq, N + Tk)) with need_weights: the weights of
        the local branch over the N persistent slots (first) and the Tk keys, taken before dropout.
        """
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        batch, tq, _ = query.shape
        tk = key.size(1)
        _check_mask(mask, (batch, self.num_heads, tq, tk))
        _check_key_padding_mask(key_padding_mask, batch, tk)
        _check_memory(memory, batch, self.num_heads, self.head_dim)

        q = self.q_proj(query).view(batch, tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, Dh)
        k = self.k_proj(key).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        v = self.v_proj(value).view(batch, tk, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tk, Dh)
        merged = _merge_masks(mask, key_padding_mask, is_causal, tq, tk, query.device)  # (Tq, Tk) or 4-D
        if self.num_persistent > 0:
            # eq. (1): the slots go in front of the keys, for every batch element.
            slots_k = self.persistent_key.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, N, Dh)
            slots_v = self.persistent_value.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, N, Dh)
            k = torch.cat([slots_k, k], dim=2)  # (B, H, N + Tk, Dh)
            v = torch.cat([slots_v, v], dim=2)  # (B, H, N + Tk, Dh)
            if merged is not None:
                # The slots are visible to every query, whatever the mask says about the tokens.
                visible = merged.new_ones(*merged.shape[:-1], self.num_persistent)  # (..., Tq, N)
                merged = torch.cat([visible, merged.expand(*merged.shape[:-1], tk)], dim=-1)  # (..., Tq, N + Tk)

        dropout_p = self.dropout if self.training else 0.0  # dropout is off in eval()
        local, weights = _attend(q, k, v, merged, dropout_p, need_weights)  # (B, H, Tq, Dh)  eq. (2)
        if memory is None:
            heads = local  # (B, H, Tq, Dh): no kNN memory, nothing to gate
        else:
            # eq. (3): each query retrieves its top-k memory entries; eq. (4): a softmax over those k only.
            top_scores, top_values, _ = knn_lookup(q, memory[0], memory[1], self.top_k)  # (B, H, Tq, k)
            memory_weights = torch.softmax(top_scores, dim=-1)  # (B, H, Tq, k)
            memory_weights = F.dropout(memory_weights, p=dropout_p) if dropout_p > 0.0 else memory_weights
            remembered = (memory_weights.unsqueeze(-1) * top_values).sum(dim=-2)  # (B, H, Tq, Dh)
            g = torch.sigmoid(self.gate).view(1, self.num_heads, 1, 1)  # (1, H, 1, 1)
            heads = g * remembered + (1.0 - g) * local  # (B, H, Tq, Dh)  eq. (5)
        out = heads.transpose(1, 2).reshape(batch, tq, self.d_model)  # (B, Tq, d_model): concatenate the heads
        out = self.out_proj(out)  # (B, Tq, d_model)  eq. (6)
        return (out, weights) if need_weights else out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], dropout_p: float,
            need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention with a boolean mask; rows with no visible key return zeros."""
    row_has_key = None
    if mask is not None:
        # A query row with no key to attend would be softmax over all -inf = NaN. Give such rows every key
        # (any finite answer will do), then overwrite their output with zeros.
        row_has_key = mask.any(dim=-1, keepdim=True)  # (..., Tq, 1)
        mask = mask | ~row_has_key  # same shape as mask
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, Tq, Dh)
        weights = None
    else:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk')
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk'); each row sums to 1
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = dropped @ v  # (B, H, Tq, Dh)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)  # a query that may see nothing returns zeros
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


def _check_memory(memory: Optional[Tuple[torch.Tensor, torch.Tensor]], batch: int, heads: int,
                  head_dim: int) -> None:
    """Raise unless `memory` is None or a pair of (B, H, M, Dh) tensors with the same M >= 1."""
    if memory is None:
        return
    expected = f"(B, H, M, Dh) = ({batch}, {heads}, M, {head_dim})"
    if not isinstance(memory, (tuple, list)) or len(memory) != 2:
        raise ValueError(f"memory must be a pair (memory_keys, memory_values), each {expected}, "
                         f"got {type(memory).__name__}")
    for tensor, name in zip(memory, ("memory keys", "memory values")):
        if (not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.size(0) != batch
                or tensor.size(1) != heads or tensor.size(3) != head_dim or tensor.size(2) == 0):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"memory: the {name} must have shape {expected} with M >= 1, got {got}")
    if memory[0].size(2) != memory[1].size(2):
        raise ValueError(f"memory: keys hold {memory[0].size(2)} entries but values {memory[1].size(2)}")


def _demo() -> None:
    torch.manual_seed(0)
    d_model, num_heads, seg = 16, 2, 6
    layer = MemoryAugmentedAttention(d_model, num_heads, num_persistent=4, top_k=3).eval()
    segments = torch.randn(3, 2, seg, d_model)  # three consecutive segments of a batch of 2 sequences
    keys, values = [], []
    for x in segments:
        memory = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else None
        out = layer(x, is_causal=True, memory=memory)
        k, v = layer.memory_entries(x)  # store this segment for the next ones
        keys.append(k)
        values.append(v)
    # The checked fact: kNN retrieval returns the brute-force best keys of the last query.
    q = layer.q_proj(segments[2]).view(2, seg, num_heads, -1).transpose(1, 2)
    mem_k = torch.cat(keys[:2], 2)
    _, _, idx = knn_lookup(q, mem_k, torch.cat(values[:2], 2), 3)
    brute = (q[0, 0, -1] @ mem_k[0, 0].T).argsort(descending=True)[:3]
    assert torch.equal(idx[0, 0, -1], brute), (idx[0, 0, -1], brute)
    print(f"output shape {tuple(out.shape)}; memory of {mem_k.size(2)} entries per head; "
          f"top-3 keys of the last query {idx[0, 0, -1].tolist()} = brute force {brute.tolist()}")


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_dropout(dropout: float, name: str = "dropout") -> None:
    """Raise unless `dropout` is a probability in [0, 1)."""
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {dropout!r}")


def _check_positive_int(value: int, name: str) -> None:
    """Raise unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_divisible(numerator: int, numerator_name: str, denominator: int, denominator_name: str) -> None:
    """Raise unless `denominator` divides `numerator` (both already checked positive)."""
    if numerator % denominator != 0:
        raise ValueError(f"{numerator_name}={numerator} is not divisible by {denominator_name}={denominator}; "
                         f"choose {numerator_name} as a multiple of {denominator_name}")


def _check_sequence(x: torch.Tensor, name: str, width: int, width_name: str) -> None:
    """Raise unless `x` is a batch-first (B, T, width) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(-1) != width:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, T, {width_name}) = (B, T, {width}), got {got}")


def _check_matching(reference: torch.Tensor, reference_name: str, other: torch.Tensor, other_name: str,
                    dim: int, dim_name: str) -> None:
    """Raise unless `other` has the same size as `reference` along `dim` (no silent broadcast)."""
    if other.size(dim) != reference.size(dim):
        raise ValueError(
            f"{other_name} has {dim_name} {other.size(dim)} but {reference_name} has {reference.size(dim)}; "
            f"they must match (got {other_name} of shape {tuple(other.shape)} and {reference_name} of shape "
            f"{tuple(reference.shape)})"
        )


def _check_mask(mask: Optional[torch.Tensor], expected: Tuple[int, int, int, int]) -> None:
    """Raise unless `mask` is None or a boolean tensor that broadcasts to `expected` = (B, H, Tq, Tk).

    Two forms are accepted, so that no shape is ever read two ways: 2-D (Tq, Tk), shared by every batch
    element and head, and 4-D (B, H, Tq, Tk) where any dimension may be 1. A 1-D or 3-D mask is refused:
    (B, Tk) or (B, Tq, Tk) would broadcast against the wrong dimensions without any error. Padding goes
    in `key_padding_mask` (B, Tk) instead.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a torch.bool tensor (True = may attend), got {got}; "
                        f"convert a 0/1 mask with mask.bool()")
    batch, heads, tq, tk = expected
    if mask.dim() == 2:
        fits = mask.size(0) in (1, tq) and mask.size(1) in (1, tk)
    elif mask.dim() == 4:
        fits = all(got in (1, want) for got, want in zip(mask.shape, expected))
    else:
        fits = False
    if not fits:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (Tq, Tk) = ({tq}, {tk}) or a 4-D shape broadcastable "
            f"to (B, H, Tq, Tk) = {tuple(expected)} (each dimension 1 or equal); for padding pass "
            f"key_padding_mask of shape (B, Tk) = ({batch}, {tk}) instead"
        )


def _check_key_padding_mask(key_padding_mask: Optional[torch.Tensor], batch: int, tk: int) -> None:
    """Raise unless `key_padding_mask` is None or a (B, Tk) boolean tensor, True = a real token."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"key_padding_mask must be a torch.bool tensor (True = a real token that may be "
                        f"attended), got {got}; convert a 0/1 mask with key_padding_mask.bool()")
    if tuple(key_padding_mask.shape) != (batch, tk):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected (B, Tk) = "
                         f"({batch}, {tk})")


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may see key j, aligned to the bottom-right.

    With Tq < Tk the queries are the LAST Tq positions of the sequence (a KV cache holds the earlier ones),
    so query i sits at position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq).
    """
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)  # (Tq, Tk)


def _merge_masks(mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], is_causal: bool,
                 tq: int, tk: int, device: torch.device) -> Optional[torch.Tensor]:
    """AND together `mask`, `key_padding_mask` and the causal mask; None when there is nothing to mask.

    The result is (Tq, Tk) when only a 2-D mask and/or `is_causal` are given, otherwise 4-D and
    broadcastable to (B, H, Tq, Tk). All inputs must already have passed their checks.
    """
    merged = mask
    if is_causal:
        causal = _causal_mask(tq, tk, device)  # (Tq, Tk)
        merged = causal if merged is None else merged & causal
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk): one row of real keys per batch element
        merged = padding if merged is None else merged & padding
    return merged


if __name__ == "__main__":
    _demo()
