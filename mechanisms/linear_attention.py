"""Linear attention: softmax's exp(q.k) replaced by a kernel phi(q).phi(k), so attention costs O(T), not O(T^2).

Paper: Angelos Katharopoulos, Apoorv Vyas, Nikolaos Pappas, Francois Fleuret, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", 2020, arXiv:2006.16236.

Idea: write attention as out_i = sum_j sim(q_i, k_j) v_j / sum_j sim(q_i, k_j). With sim(q, k) = phi(q).phi(k)
for a positive feature map phi (here elu(x) + 1), the sums factor: out_i = phi(q_i)^T S / phi(q_i)^T z with
S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j), computed once for all queries. Causally, S and z become
running sums: the layer is an RNN whose state (S, z) has a fixed size, so decoding one token costs O(1) in
the context length. Training uses the chunkwise form: exact quadratic attention inside chunks of C tokens,
the running state between chunks.

Equation:  phi(x) = elu(x) + 1;   out_i = phi(q_i)^T S_i / phi(q_i)^T z_i,
           S_i = sum_{j visible to i} phi(k_j) v_j^T,  z_i = sum_{j visible to i} phi(k_j).

Complexity in sequence length T (feature width F = Dh): non-causal time O(T F Dh), memory O(F Dh) state;
causal chunkwise time O(T C F + T F Dh), memory O(T C + (T / C) F Dh); recurrent decoding O(F Dh) per token.
need_weights=True uses the explicit O(T^2) form, which is also the reference.

Reduces to / oracle: not to softmax attention (a different kernel; tests/test_linear_attention.py::
test_distinct_from_softmax_attention_with_the_same_projections); the parallel masked form, the chunkwise
form for every chunk size (T divisible or not), the recurrent form and the naive cumulative-sum form all
equal an explicit double loop over the formula (tests/test_linear_attention.py::
test_every_form_equals_the_double_loop_for_every_chunk_size).

Docs page: docs/mechanisms/linear_attention.md
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, eq. (2): positive everywhere, so every similarity phi(q).phi(k) is positive."""
    return F.elu(x) + 1.0


def _with_ones(value: torch.Tensor) -> torch.Tensor:
    """Append a column of ones to the values, eq. (4): the same sums then give the normaliser z as last column."""
    return torch.cat([value, torch.ones_like(value[..., :1])], dim=-1)  # (B, H, T, Dv + 1)


def _normalise(numerator_and_denominator: torch.Tensor) -> torch.Tensor:
    """Split the last column (phi(q).z) off and divide, eq. (3); a query that sees no key gets 0, not 0/0."""
    numerator, denominator = numerator_and_denominator[..., :-1], numerator_and_denominator[..., -1:]  # (.., Dv), (.., 1)
    has_key = denominator > 0  # phi > 0, so the sum is 0 exactly when no key is visible
    return numerator / torch.where(has_key, denominator, 1.0) * has_key  # (B, H, T, Dv)


def linear_attention_noncausal(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Every query sees every key, eq. (3): one (F, Dv + 1) state for the whole sequence. Inputs (B, H, T, .)."""
    state = phi_k.transpose(-2, -1) @ _with_ones(value)  # (B, H, F, Dv + 1): S and z side by side  eq. (3)
    return _normalise(phi_q @ state)  # (B, H, Tq, Dv)


def causal_linear_attention_chunkwise(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor, chunk_size: int,
                                      state: Optional[torch.Tensor] = None, return_state: bool = False
                                      ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Causal linear attention in chunks of `chunk_size`, eq. (6); query i sees keys j <= i (same length T).

    phi_q, phi_k (B, H, T, F), value (B, H, T, Dv). `state` (B, H, F, Dv + 1) holds the sums of keys before the
    sequence (a prefix or a KV-cache-like context); returns (B, H, T, Dv) and, with return_state, the state
    after the last token. T need not be a multiple of chunk_size: the last chunk is padded with zero features.
    """
    batch, heads, length, features = phi_q.shape
    values = _with_ones(value)  # (B, H, T, Dv + 1)
    n_chunks = -(-length // chunk_size)  # ceil(T / C)
    pad = n_chunks * chunk_size - length
    if pad:  # zero features contribute nothing to any sum; the padded queries are dropped at the end
        phi_q, phi_k, values = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, values))  # (B, H, n*C, .)
    q_c = phi_q.unflatten(2, (n_chunks, chunk_size))  # (B, H, n, C, F)
    k_c = phi_k.unflatten(2, (n_chunks, chunk_size))  # (B, H, n, C, F)
    v_c = values.unflatten(2, (n_chunks, chunk_size))  # (B, H, n, C, Dv + 1)
    # Inside a chunk: the quadratic form with a causal (lower-triangular, diagonal included) mask, eq. (6).
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=phi_q.device).tril()  # (C, C)
    scores = (q_c @ k_c.transpose(-2, -1)).masked_fill(~causal, 0.0)  # (B, H, n, C, C)
    intra = scores @ v_c  # (B, H, n, C, Dv + 1)
    # Between chunks: the state S_{c-1} of all earlier chunks, an exclusive prefix sum of per-chunk states, eq. (6).
    chunk_states = k_c.transpose(-2, -1) @ v_c  # (B, H, n, F, Dv + 1): phi(K_c)^T [V_c, 1]
    inclusive = chunk_states.cumsum(dim=2)  # (B, H, n, F, Dv + 1)
    before = inclusive - chunk_states  # (B, H, n, F, Dv + 1): sums over chunks < c
    if state is not None:
        before = before + state[:, :, None]  # (B, H, n, F, Dv + 1)
    inter = q_c @ before  # (B, H, n, C, Dv + 1)
    out = _normalise((intra + inter).flatten(2, 3)[:, :, :length])  # (B, H, T, Dv)
    if not return_state:
        return out
    final = inclusive[:, :, -1] if state is None else inclusive[:, :, -1] + state  # (B, H, F, Dv + 1)
    return out, final


def linear_attention_recurrent(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor,
                               state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The RNN form, eq. (5): one token at a time, S_i = S_{i-1} + phi(k_i) [v_i, 1]^T, out_i from S_i.

    Inputs (B, H, T, .); `state` (B, H, F, Dv + 1) or None (zeros). Returns (output (B, H, T, Dv), final state).
    Used for decoding (T = 1 per call); O(T) sequential steps, so only a reference for longer inputs.
    """
    values = _with_ones(value)  # (B, H, T, Dv + 1)
    if state is None:
        state = phi_q.new_zeros(*phi_q.shape[:2], phi_q.size(-1), values.size(-1))  # (B, H, F, Dv + 1)
    outputs = []
    for i in range(phi_q.size(2)):
        state = state + phi_k[:, :, i, :, None] * values[:, :, i, None, :]  # (B, H, F, Dv + 1)  eq. (5)
        outputs.append(phi_q[:, :, i, None, :] @ state)  # (B, H, 1, Dv + 1)  eq. (5)
    return _normalise(torch.cat(outputs, dim=2)), state  # (B, H, T, Dv), (B, H, F, Dv + 1)


def causal_linear_attention_cumsum(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The naive causal form, eq. (7): a cumulative sum of outer products, one (F, Dv + 1) state per position.

    O(T F Dv) memory: kept as a readable oracle and a benchmark baseline, not for use.
    """
    outer = phi_k[..., :, None] * _with_ones(value)[..., None, :]  # (B, H, T, F, Dv + 1)
    states = outer.cumsum(dim=2)  # (B, H, T, F, Dv + 1)  eq. (7)
    return _normalise((phi_q[..., None, :] @ states).squeeze(-2))  # (B, H, T, Dv)


def linear_attention_parallel(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor,
                              visible: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The explicit form, eq. (1)-(2): the (Tq, Tk) similarity matrix, masked and normalised; O(T^2).

    visible: bool broadcastable to (B, H, Tq, Tk) or None. Returns (output (B, H, Tq, Dv), weights
    (B, H, Tq, Tk)), each weight row summing to 1 (0 for a query that sees no key).
    """
    similarity = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Tq, Tk)  eq. (2)
    if visible is not None:
        similarity = similarity.masked_fill(~visible, 0.0)  # masked keys: similarity 0, not -inf
    total = similarity.sum(dim=-1, keepdim=True)  # (B, H, Tq, 1)
    has_key = total > 0
    weights = similarity / torch.where(has_key, total, 1.0) * has_key  # (B, H, Tq, Tk)  eq. (1)
    return weights @ value, weights  # (B, H, Tq, Dv), (B, H, Tq, Tk)


class LinearAttention(nn.Module):
    """Multi-head linear attention with phi = elu + 1, batch-first (B, T, d_model).

    Args:
        d_model: width of the inputs and the output; must be divisible by num_heads.
        num_heads: number of heads H; head_dim = d_model // num_heads (also the feature width F).
        chunk_size: tokens per chunk of the causal chunkwise form (does not change the result, only the
            balance of work between the quadratic intra-chunk part and the state updates).
        bias: whether the four projections have a bias.
    There is no dropout: no attention matrix exists to drop entries from on the linear-time paths.
    """

    def __init__(self, d_model: int, num_heads: int, chunk_size: int = 64, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(chunk_size, "chunk_size")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.chunk_size = chunk_size
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        return proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Dh)

    def _features(self, query, key, value, key_padding_mask):
        """phi(Q), phi(K), V split into heads, in float32 for half inputs; padded keys get zero features and values."""
        compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        phi_q = elu_feature_map(self._heads(query, self.q_proj).to(compute))  # (B, H, Tq, F)
        phi_k = elu_feature_map(self._heads(key, self.k_proj).to(compute))  # (B, H, Tk, F)
        v = self._heads(value, self.v_proj).to(compute)  # (B, H, Tk, Dh)
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :, None]  # (B, 1, Tk, 1)
            phi_k, v = phi_k * real, v * real  # a padded key adds nothing to S or z
        return phi_q, phi_k, v

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attend from `query` (B, Tq, d_model) to `key`/`value` (B, Tk, d_model), both defaulting to `query`.

        key_padding_mask: bool (B, Tk), True = a real token. is_causal: bottom-right aligned, query i sees keys
        j <= i + (Tk - Tq). `mask` is refused: a general (Tq, Tk) mask cannot be applied to the factored
        sums without building the (Tq, Tk) matrix. need_weights=True takes the explicit O(T^2) path and returns
        (output, weights (B, H, Tq, Tk)), each row of visible keys summing to 1.
        """
        key = query if key is None else key
        value = key if value is None else value
        _check_sequence(query, "query", self.d_model, "d_model")
        _check_sequence(key, "key", self.d_model, "d_model")
        _check_sequence(value, "value", self.d_model, "d_model")
        _check_matching(query, "query", key, "key", 0, "batch size")
        _check_matching(key, "key", value, "value", 0, "batch size")
        _check_matching(key, "key", value, "value", 1, "length")
        if mask is not None:
            raise ValueError(f"mask: LinearAttention does not take a general (Tq, Tk) mask (got shape "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}); its "
                             f"linear-time form sums over keys without a (Tq, Tk) matrix. Use key_padding_mask "
                             f"(B, Tk) and/or is_causal=True")
        batch, tq, tk = query.size(0), query.size(1), key.size(1)
        _check_key_padding_mask(key_padding_mask, batch, tk)
        phi_q, phi_k, v = self._features(query, key, value, key_padding_mask)
        weights = None
        if need_weights:
            visible = _merge_masks(None, key_padding_mask, is_causal, tq, tk, query.device)
            out, weights = linear_attention_parallel(phi_q, phi_k, v, visible)  # (B, H, Tq, Dh)
        elif not is_causal:
            out = linear_attention_noncausal(phi_q, phi_k, v)  # (B, H, Tq, Dh)
        else:
            out = self._causal(phi_q, phi_k, v)  # (B, H, Tq, Dh)
        out = out.transpose(1, 2).reshape(batch, tq, self.d_model).to(query.dtype)  # (B, Tq, d_model)
        out = self.out_proj(out)  # (B, Tq, d_model)
        return (out, weights.to(query.dtype)) if need_weights else out

    def _causal(self, phi_q, phi_k, v):
        """Bottom-right causal: the first Tk - Tq keys are a prefix every query sees, folded into the state."""
        tq, tk = phi_q.size(2), phi_k.size(2)
        offset = tk - tq
        if offset >= 0:
            state = phi_k[:, :, :offset].transpose(-2, -1) @ _with_ones(v[:, :, :offset])  # (B, H, F, Dh + 1)
            return causal_linear_attention_chunkwise(phi_q, phi_k[:, :, offset:], v[:, :, offset:], self.chunk_size,
                                                     state=state)  # (B, H, Tq, Dh)
        # More queries than keys: the first -offset queries come before every key and see nothing.
        later = causal_linear_attention_chunkwise(phi_q[:, :, -offset:], phi_k, v, self.chunk_size)  # (B, H, Tk, Dh)
        return torch.cat([torch.zeros_like(phi_q[:, :, :-offset, :v.size(-1)]), later], dim=2)  # (B, H, Tq, Dh)

    def prefill(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Causal self-attention over a prompt x (B, T, d_model); returns (output, state) to continue with step()."""
        _check_sequence(x, "x", self.d_model, "d_model")
        phi_q, phi_k, v = self._features(x, x, x, None)
        out, state = causal_linear_attention_chunkwise(phi_q, phi_k, v, self.chunk_size, return_state=True)
        out = out.transpose(1, 2).reshape(x.size(0), x.size(1), self.d_model).to(x.dtype)  # (B, T, d_model)
        return self.out_proj(out), state

    def step(self, x: torch.Tensor, state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode one token: x (B, 1, d_model) and the state (B, H, F, Dh + 1) -> (output (B, 1, d_model), state).

        The work is the same whatever the length of the context behind the state, eq. (5).
        """
        _check_sequence(x, "x", self.d_model, "d_model")
        if x.size(1) != 1:
            raise ValueError(f"x must have shape (B, 1, d_model) = (B, 1, {self.d_model}): one token, got "
                             f"{tuple(x.shape)}; use prefill() for a prompt")
        phi_q, phi_k, v = self._features(x, x, x, None)
        out, state = linear_attention_recurrent(phi_q, phi_k, v, state)  # (B, H, 1, Dh)
        out = out.transpose(1, 2).reshape(x.size(0), 1, self.d_model).to(x.dtype)  # (B, 1, d_model)
        return self.out_proj(out), state


def _demo() -> None:
    """Check the chunkwise form against the explicit masked form and decode a few tokens (python linear_attention.py)."""
    torch.manual_seed(0)
    attn = LinearAttention(d_model=32, num_heads=4, chunk_size=5).double().eval()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    with torch.no_grad():
        chunkwise = attn(x, is_causal=True)  # O(T): chunks of 5 (23 is not a multiple)
        explicit, weights = attn(x, is_causal=True, need_weights=True)  # O(T^2): the masked matrix
        prompt_out, state = attn.prefill(x[:, :20])
        out, state = attn.step(x[:, 20:21], state)
        out2, state = attn.step(x[:, 21:22], state)
    diff = (chunkwise - explicit).abs().max().item()
    decode_diff = max((out - chunkwise[:, 20:21]).abs().max().item(), (out2 - chunkwise[:, 21:22]).abs().max().item(),
                      (prompt_out - chunkwise[:, :20]).abs().max().item())
    print(f"output shape {tuple(chunkwise.shape)}; weights {tuple(weights.shape)}, rows sum to "
          f"{weights.sum(-1).min().item():.6f}..{weights.sum(-1).max().item():.6f}")
    print(f"max |chunkwise - explicit masked form| = {diff:.2e}; max |prefill + step - chunkwise| = {decode_diff:.2e}")
    assert diff < 1e-10 and decode_diff < 1e-10, (diff, decode_diff)


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


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
