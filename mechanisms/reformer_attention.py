"""Reformer attention: shared-QK attention restricted by locality-sensitive hashing, in sorted chunks.

Paper: Nikita Kitaev, Lukasz Kaiser, Anselm Levskaya (2020), "Reformer: The Efficient Transformer",
arXiv:2001.04451.

Idea: softmax is dominated by the largest scores, so each query only needs the keys most similar to it. With
keys equal to the (normalised) queries, angular locality-sensitive hashing puts similar vectors in the same
bucket: hash by a random rotation R, bucket = argmax([xR; -xR]). Sort the tokens by bucket, cut the sorted
sequence into chunks, and let each chunk attend to itself and the chunk before, within the same bucket only.
A token does not attend to itself unless nothing else is available (with shared QK, q.k_self is the largest
score and would say nothing). Several hash rounds are combined, each pair counted once, which recovers more
of the full attention.

Equations (page eq. (1)-(6)):
    k_j = q_j / ||q_j||                                  (shared QK)
    h_r(x) = argmax([x R_r ; -x R_r])                    (R_r: Dh x b/2 random, one per round r)
    round r: i attends j iff h_r(i) = h_r(j) and chunk_r(j) in {chunk_r(i) - 1, chunk_r(i)}   (sorted order)
    s_ij = q_i . k_j / sqrt(Dh) - log N_ij,   s_ii := -1e4,   N_ij = number of rounds in which i attends j
    o_i = sum_r softmax_r(L_r(i)) o_r(i),   L_r(i) = logsumexp of round r's scores of i
  which is softmax attention over the union of the rounds' pairs, each pair once.

Complexity in sequence length T with chunk size c and n_h rounds: time and memory O(n_h T c) plus
O(n_h T log T) for sorting: linear in T up to the sort. need_weights=True assembles dense (B, H, T, T) weights.

Reduces to / oracle: with one bucket and a chunk covering the sequence it is full shared-QK attention with the
self-token rule; for any buckets and rounds it equals dense attention under the union-of-rounds mask, built
from the hash in tests/test_reformer_attention.py.

Docs page: docs/mechanisms/reformer_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

SELF_SCORE = -1e4  # the score of a token for itself, eq. (4): tiny weight unless nothing else is visible


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH of eq. (2): x (..., T, Dh), rotations (Dh, R, b/2) -> buckets (..., R, T) in [0, b).

    b = 1 (rotations with a last axis of size 0) puts every token in bucket 0.
    """
    if rotations.size(-1) == 0:
        return torch.zeros(*x.shape[:-2], rotations.size(1), x.size(-2), dtype=torch.long, device=x.device)
    rotated = torch.einsum("...td,drk->...rtk", x, rotations.to(x.dtype))  # (..., R, T, b/2)
    return torch.cat((rotated, -rotated), dim=-1).argmax(dim=-1)  # (..., R, T)


class ReformerAttention(nn.Module):
    """LSH self-attention with shared queries and keys, batch-first (B, T, d_model) in and out.

    Args:
        d_model: width of the input and the output; must be divisible by num_heads.
        num_heads: number of heads H, each hashed separately.
        num_buckets: b, 1 or even. 1 = no hashing (one bucket).
        num_hashes: n_h, the number of hash rounds combined.
        chunk_size: c, tokens per chunk of the sorted sequence; each chunk attends to itself and the one before.
        seed: seeds the random rotations R, so the hash is a fixed function of (seed, head_dim, num_buckets,
            num_hashes): the same in every call (Trax and Hugging Face draw new rotations per call unless told).
        dropout: dropout probability on the attention weights, active only in training mode.
        bias: whether the projections have a bias.

    forward(x, mask=None, key_padding_mask=None, is_causal=False, need_weights=False): self-attention over x
    (keys are the queries). key_padding_mask (B, T), True = a real token: padded tokens are sorted after every
    real one, so they never change which real tokens share a chunk, and are never attended. is_causal: token i
    attends only j <= i. A general dense `mask` is refused (its pairs are not the ones the hash selects).
    """

    def __init__(self, d_model: int, num_heads: int, num_buckets: int = 4, num_hashes: int = 2,
                 chunk_size: int = 4, seed: int = 0, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_positive_int(num_buckets, "num_buckets")
        if num_buckets != 1 and num_buckets % 2:
            raise ValueError(f"num_buckets must be 1 or even (buckets come from [xR; -xR]), got {num_buckets}")
        _check_positive_int(num_hashes, "num_hashes")
        _check_positive_int(chunk_size, "chunk_size")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.num_buckets = num_buckets
        self.num_hashes = num_hashes
        self.chunk_size = chunk_size
        self.seed = seed
        self.dropout = dropout
        self.qk_proj = nn.Linear(d_model, d_model, bias=bias)  # shared queries and keys, eq. (1)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"num_buckets={self.num_buckets}, num_hashes={self.num_hashes}, chunk_size={self.chunk_size}, "
                f"seed={self.seed}, dropout={self.dropout}")

    def rotations(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The random rotations R of eq. (2), (Dh, num_hashes, num_buckets // 2), drawn from `seed`."""
        generator = torch.Generator().manual_seed(self.seed)
        half = self.num_buckets // 2 if self.num_buckets > 1 else 0
        return torch.randn(self.head_dim, self.num_hashes, half, generator=generator).to(device)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        _check_sequence(x, "x", self.d_model, "d_model")
        if mask is not None:
            raise ValueError("mask is not supported by ReformerAttention: the pairs it scores are chosen by the hash, "
                             "not by a (T, T) mask; use key_padding_mask (B, T) and is_causal (got mask of shape "
                             f"{tuple(getattr(mask, 'shape', ()))})")
        batch, t, _ = x.shape
        _check_key_padding_mask(key_padding_mask, batch, t)
        device, heads, dh, rounds, c = x.device, self.num_heads, self.head_dim, self.num_hashes, self.chunk_size
        split = lambda y: y.view(batch, t, heads, dh).transpose(1, 2)  # noqa: E731  (B, H, T, Dh)
        q, v = split(self.qk_proj(x)), split(self.v_proj(x))
        k = F.normalize(q, dim=-1)  # (B, H, T, Dh)  eq. (1): keys are the unit-length queries
        real = torch.ones(batch, t, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask

        # eq. (2)-(3): hash, then sort by (bucket, position); padding gets bucket b, after every real token.
        buckets = lsh_buckets(k.detach(), self.rotations(device))  # (B, H, R, T)
        buckets = buckets.masked_fill(~real[:, None, None, :], self.num_buckets)
        pos = torch.arange(t, device=device)
        order = (buckets * t + pos).argsort(dim=-1)  # (B, H, R, T): sorted slot -> position
        rank = order.argsort(dim=-1)  # (B, H, R, T): position -> sorted slot
        n = math.ceil(t / c)
        pad = n * c - t
        chunk = rank // c  # (B, H, R, T): chunk of each position in each round

        def sort(y):  # (B, H, T, D) -> (B, H, R, n, c, D) in sorted order, padded to whole chunks
            g = y[:, :, None].expand(-1, -1, rounds, -1, -1).gather(3, order[..., None].expand(-1, -1, -1, -1, y.size(-1)))
            return F.pad(g, (0, 0, 0, pad)).view(batch, heads, rounds, n, c, y.size(-1))

        def look_back(y):  # (B, H, R, n, c, D) -> (B, H, R, n, 2c, D): the chunk before, then the chunk itself
            return torch.cat((F.pad(y, (0, 0, 0, 0, 1, 0))[:, :, :, :-1], y), dim=-2)

        q_s, k_s, v_s = sort(q), sort(k), sort(v)  # (B, H, R, n, c, Dh)
        info = torch.stack((pos.expand(batch, heads, t), (real[:, None].expand(-1, heads, -1)).long()), dim=-1)
        info_s = sort(info)  # (B, H, R, n, c, 2): position and realness of each sorted slot
        slot_ok = F.pad(torch.ones(batch, heads, rounds, t, dtype=torch.bool, device=device), (0, pad)
                        ).view(batch, heads, rounds, n, c)  # chunk padding is not a token
        b_s = F.pad(buckets.gather(3, order), (0, pad), value=-1).view(batch, heads, rounds, n, c)  # (B, H, R, n, c)
        qpos, kpos = info_s[..., 0], look_back(info_s)[..., 0]  # (B, H, R, n, c), (B, H, R, n, 2c)
        k_bucket = look_back(b_s[..., None])[..., 0]  # (B, H, R, n, 2c)
        k_ok = look_back(slot_ok[..., None])[..., 0] & look_back(info_s)[..., 1].bool()  # a real token, not padding
        allowed = (b_s[..., :, None] == k_bucket[..., None, :]) & k_ok[..., None, :]  # same bucket, eq. (3)
        allowed = allowed & slot_ok[..., :, None]  # (B, H, R, n, c, 2c)
        if is_causal:
            allowed = allowed & (kpos[..., None, :] <= qpos[..., :, None])
        # (B, H, R, n, c, 2c) from here on.
        scores = (q_s @ look_back(k_s).transpose(-2, -1)) / math.sqrt(dh)  # eq. (4)
        is_self = kpos[..., None, :] == qpos[..., :, None]
        scores = scores.masked_fill(is_self, SELF_SCORE)  # eq. (4): the self-token rule
        # eq. (4): N_ij, the rounds in which i attends j (same bucket, j in i's chunk or the one before), so that a
        # pair found by several rounds is counted once when the rounds are combined.
        qp, kp = qpos.clamp(max=t - 1), kpos.clamp(max=t - 1)  # chunk padding: any index, masked anyway
        count = _round_counts(buckets, chunk, qp, kp, rounds, t)  # (B, H, R, n, c, 2c)
        scores = scores - torch.log(count.clamp(min=1).to(scores.dtype))
        row_any = allowed.any(dim=-1, keepdim=True)  # (B, H, R, n, c, 1)
        scores = scores.masked_fill(~(allowed | ~row_any), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, R, n, c, 1): L_r(i), eq. (5)
        weights = torch.exp(scores - lse) * allowed  # (B, H, R, n, c, 2c): this round's softmax
        p = self.dropout if self.training else 0.0
        dropped = F.dropout(weights, p=p) if p > 0.0 else weights
        o = dropped @ look_back(v_s)  # (B, H, R, n, c, Dh)
        lse = lse.masked_fill(~row_any, float("-inf"))

        # Back to positions, then combine the rounds, eq. (5): weight of round r = softmax_r(L_r(i)).
        unsort = lambda y: y.reshape(batch, heads, rounds, n * c, -1)[:, :, :, :t].gather(  # noqa: E731
            3, rank[..., None].expand(-1, -1, -1, -1, y.size(-1)))  # (B, H, R, T, D)
        o, lse = unsort(o), unsort(lse)  # (B, H, R, T, Dh), (B, H, R, T, 1)
        any_round = torch.isfinite(lse).any(dim=2, keepdim=True)  # (B, H, 1, T, 1): a row with no key anywhere
        round_w = torch.softmax(lse.masked_fill(~any_round, 0.0), dim=2) * any_round  # (B, H, R, T, 1)
        out = (round_w * o).sum(dim=2)  # (B, H, T, Dh)  eq. (5)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)  eq. (6)
        if not need_weights:
            return out
        # Dense (B, H, T, T) weights for inspection only: scatter each round's weights, times its round weight.
        w = unsort(weights) * round_w  # (B, H, R, T, 2c): slot weights of every position, times its round weight
        keys = unsort(kpos[..., None, :].expand(*qpos.shape, 2 * c))  # (B, H, R, T, 2c): position of each slot
        dense = w.new_zeros(batch, heads, t, t + 1)  # one spare column for chunk padding
        dense = dense.scatter_add(-1, keys.clamp(max=t).permute(0, 1, 3, 2, 4).reshape(batch, heads, t, -1),
                                  w.permute(0, 1, 3, 2, 4).reshape(batch, heads, t, -1))
        return out, dense[..., :t]


def _round_counts(buckets: torch.Tensor, chunk: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, rounds: int,
                  t: int) -> torch.Tensor:
    """N_ij of eq. (4) for every scored pair: in how many rounds i and j share a bucket and j is in i's window.

    buckets, chunk: (B, H, R, T); qpos (B, H, R, n, c), kpos (B, H, R, n, 2c) positions of the scored pairs.
    """
    batch, heads = buckets.shape[:2]
    q_idx = qpos.flatten(2)  # (B, H, R n c)
    k_idx = kpos.flatten(2)  # (B, H, R n 2c)
    count = 0
    for r in range(rounds):  # n_h is small: one gather per round
        b_r, c_r = buckets[:, :, r], chunk[:, :, r]  # (B, H, T)
        qb = b_r.gather(-1, q_idx).view(qpos.shape)[..., :, None]  # (B, H, R, n, c, 1)
        kb = b_r.gather(-1, k_idx).view(kpos.shape)[..., None, :]  # (B, H, R, n, 1, 2c)
        qc = c_r.gather(-1, q_idx).view(qpos.shape)[..., :, None]
        kc = c_r.gather(-1, k_idx).view(kpos.shape)[..., None, :]
        count = count + ((qb == kb) & (qc - kc >= 0) & (qc - kc <= 1)).long()  # (B, H, R, n, c, 2c)
    return count

def _demo() -> None:
    """Demo of `python mechanisms/reformer_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    batch, t, d_model, num_heads = 2, 32, 32, 2
    x = torch.randn(batch, t, d_model)
    one_bucket = ReformerAttention(d_model, num_heads, num_buckets=1, num_hashes=1, chunk_size=t).eval()
    with torch.no_grad():
        # Oracle inline: full shared-QK attention with the self-token rule (eq. (1), (4)).
        q = one_bucket.qk_proj(x).view(batch, t, num_heads, -1).transpose(1, 2)
        v = one_bucket.v_proj(x).view(batch, t, num_heads, -1).transpose(1, 2)
        scores = q @ F.normalize(q, dim=-1).transpose(-2, -1) / math.sqrt(d_model // num_heads)
        scores = scores.masked_fill(torch.eye(t, dtype=torch.bool), SELF_SCORE)
        full = one_bucket.out_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, t, d_model))
        diff = (one_bucket(x) - full).abs().max().item()
        print(f"output shape {tuple(full.shape)}; one bucket, one chunk: max |Reformer - full shared-QK| = {diff:.2e}")
        assert diff < 1e-5, diff
        for rounds in (1, 2, 4, 8):
            lsh = ReformerAttention(d_model, num_heads, num_buckets=8, num_hashes=rounds, chunk_size=4).eval()
            lsh.load_state_dict(one_bucket.state_dict())
            error = (lsh(x) - full).abs().mean().item()
            print(f"  8 buckets, chunks of 4, {rounds} hash round(s): mean |Reformer - full| = {error:.3e}")


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


if __name__ == "__main__":
    _demo()
