"""Bidirectional self-attention (BERT) with its masked-LM corruption, and XLNet's two-stream attention.

Papers: Jacob Devlin, Ming-Wei Chang, Kenton Lee, Kristina Toutanova, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding", 2019, arXiv:1810.04805; Zhilin Yang, Zihang Dai,
Yiming Yang, Jaime Carbonell, Ruslan Salakhutdinov, Quoc V. Le, "XLNet: Generalized Autoregressive
Pretraining for Language Understanding", 2019, arXiv:1906.08237.

Idea: an encoder's self-attention has no causal mask, so every token reads the tokens on both sides
(BidirectionalSelfAttention). It cannot then be trained to predict its own input, so BERT corrupts it
first: 15% of the tokens are selected for prediction and replaced by [MASK] 80% of the time, by a random
token 10% of the time, and left unchanged 10% of the time (bert_mlm_corruption). XLNet keeps the
autoregressive objective but over a random factorization order z, with two streams: the content stream
h sees its own token and every token earlier in z; the query stream g, which must predict token z_t,
sees only the tokens strictly earlier in z, never its own content (TwoStreamAttention).

Equations (page): bidirectional  o_i = sum_j softmax_j(q_i.k_j / sqrt(Dh)) v_j, all j            eq. (1)
                  causal (for contrast)  the same with j <= i only                                   eq. (2)
                  BERT corruption  select w.p. p; then [MASK] 0.8, random 0.1, unchanged 0.1         eq. (3)
                  content stream  h_{z_t} <- Attn(Q = h_{z_t}, KV = h_{z_<=t})                       eq. (4)
                  query stream    g_{z_t} <- Attn(Q = g_{z_t}, KV = h_{z_<t})                        eq. (5)
                  order as a mask  M_ij = [rank(j) <= rank(i)] (content), [rank(j) < rank(i)] (query) eq. (6)

Complexity in sequence length T: time O(T^2 d), memory O(H T^2) on the explicit path (as multi-head
attention); two-stream attention does it twice (one pass per stream). The corruption is O(T).

Reduces to / oracle: BidirectionalSelfAttention is multi-head self-attention without a causal mask: it equals
transformers' BertSelfAttention and torch.nn.MultiheadAttention with copied weights, and with is_causal=True
causal multi-head attention. TwoStreamAttention's content stream with the identity order equals causal
multi-head attention; both streams against an explicit loop over a random order; the query stream never
depends on its own token (tests/test_bidirectional_attention.py).

Docs page: docs/mechanisms/bidirectional_attention.md
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor], dropout_p: float,
            need_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q k^T / sqrt(Dh)) v over the `allowed` keys (True = may attend); rows with no key give 0."""
    row_has_key = None
    if allowed is not None:
        row_has_key = allowed.any(dim=-1, keepdim=True)  # (B, H, Tq, 1) or (Tq, 1)
        allowed = allowed | ~row_has_key  # an empty row gets every key (finite), then its output is zeroed
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)  # (B, H, Tq, Dh)
        weights = None
    else:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
        out = (F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights) @ v  # (B, H, Tq, Dh)
    if row_has_key is not None:
        out = out.masked_fill(~row_has_key, 0.0)
        if weights is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)
    return out, weights


class BidirectionalSelfAttention(nn.Module):
    """BERT's encoder self-attention: multi-head self-attention in which every token sees both sides, eq. (1).

    Args:
        d_model: width of the input and output; must be divisible by num_heads.
        num_heads: number of heads H.
        dropout: dropout on the attention weights (training only); BERT uses 0.1.
        bias: whether the four projections have a bias (BERT: yes).

    forward(x, mask=None, key_padding_mask=None, is_causal=False, need_weights=False):
        x (B, T, d_model). key_padding_mask (B, T), True = a real token: BERT's `attention_mask`.
        is_causal=True gives the decoder's causal attention, eq. (2): the contrast the page draws.
        Returns (B, T, d_model), or (output, weights (B, H, T, T) taken before dropout).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        self.d_model, self.num_heads, self.head_dim, self.dropout = d_model, num_heads, d_model // num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                need_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        _check_sequence(x, "x", self.d_model, "d_model")
        batch, t, _ = x.shape
        _check_mask(mask, (batch, self.num_heads, t, t))
        _check_key_padding_mask(key_padding_mask, batch, t)
        split = (batch, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(split).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(split).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v_proj(x).view(split).transpose(1, 2)  # (B, H, T, Dh)
        # No causal mask unless asked: query i reads keys on both sides, eq. (1); is_causal gives eq. (2).
        allowed = _merge_masks(mask, key_padding_mask, is_causal, t, t, x.device)  # None, (T, T) or 4-D
        dropout_p = self.dropout if self.training else 0.0
        out, weights = _attend(q, k, v, allowed, dropout_p, need_weights)  # (B, H, T, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)
        return (out, weights) if need_weights else out


def bert_mlm_corruption(input_ids: torch.Tensor, vocab_size: int, mask_token_id: int, mask_prob: float = 0.15,
                        special_tokens_mask: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption, eq. (3): returns (corrupted_ids, labels), both shaped like input_ids.

    Each token not marked in special_tokens_mask (bool, True = never select: [CLS], [SEP], padding) is
    selected with probability mask_prob. A selected token becomes mask_token_id with probability 0.8, a
    token drawn uniformly from range(vocab_size) with probability 0.1, and stays unchanged with probability
    0.1; its label is the original id. Unselected tokens keep their id and get the label -100 (ignored by
    F.cross_entropy). The random 10% and the unchanged 10% keep the model from learning that only [MASK]
    positions matter, since [MASK] never occurs at fine-tuning time.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {got}")
    _check_positive_int(vocab_size, "vocab_size")
    if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be an int in [0, vocab_size) = [0, {vocab_size}), got {mask_token_id!r}")
    if not isinstance(mask_prob, (int, float)) or isinstance(mask_prob, bool) or not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be a probability in [0, 1], got {mask_prob!r}")
    if special_tokens_mask is not None and (special_tokens_mask.dtype != torch.bool
                                            or special_tokens_mask.shape != input_ids.shape):
        raise ValueError(f"special_tokens_mask must be a bool tensor of the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {special_tokens_mask.dtype} {tuple(special_tokens_mask.shape)}")
    device = input_ids.device

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)  # one U(0, 1) per token

    selected = uniform() < mask_prob  # eq. (3): the tokens to predict
    if special_tokens_mask is not None:
        selected &= ~special_tokens_mask
    labels = input_ids.masked_fill(~selected, -100)
    to_mask = selected & (uniform() < 0.8)  # 80% of the selected
    # Half of the remaining 20%: 10% of the selected get a random token, the last 10% stay unchanged.
    to_random = selected & ~to_mask & (uniform() < 0.5)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device,
                               dtype=input_ids.dtype)
    corrupted = input_ids.masked_fill(to_mask, mask_token_id)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels


class TwoStreamAttention(nn.Module):
    """XLNet's two-stream self-attention over a factorization order, eq. (4)-(6).

    Both streams use the same projections: queries come from each stream's own vectors, keys and values
    always from the content stream h (the query stream never serves as a key).

    Args:
        d_model, num_heads, dropout, bias: as in multi-head attention.

    Parameter mask_emb (d_model): the trainable vector w with which XLNet initialises the query stream of
    the first layer; used when forward gets no query_stream.

    forward(content, query_stream=None, order=None, mask=None, key_padding_mask=None, need_weights=False):
        content h (B, T, d_model); query_stream g (B, T, d_model) or None (= mask_emb at every position).
        order (B, T) or (T,) long: a permutation of 0..T-1 per batch element, order[t] = the position
            predicted t-th (z_t). None = left to right, where the content stream is causal attention.
        mask (T, T) or 4-D, key_padding_mask (B, T): ANDed with the order's masks, as everywhere.
        Returns (content_out, query_out), each (B, T, d_model); with need_weights=True,
        ((content_out, query_out), (content_weights, query_weights)), weights (B, H, T, T) before dropout.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        _check_divisible(d_model, "d_model", num_heads, "num_heads")
        _check_dropout(dropout)
        self.d_model, self.num_heads, self.head_dim, self.dropout = d_model, num_heads, d_model // num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.mask_emb = nn.Parameter(torch.randn(d_model) * 0.02)

    @staticmethod
    def order_masks(order: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eq. (6): (content, query) bool masks (B, 1, T, T) from an order (B, T); True = may attend."""
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.size(-1), device=order.device).expand_as(order))  # (B, T)
        before_or_self = rank[:, None, :] <= rank[:, :, None]  # (B, T, T): [i, j] = rank(j) <= rank(i)
        before = rank[:, None, :] < rank[:, :, None]  # (B, T, T): strictly earlier, never i itself
        return before_or_self[:, None], before[:, None]  # (B, 1, T, T) each

    def forward(self, content: torch.Tensor, query_stream: Optional[torch.Tensor] = None,
                order: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False):
        _check_sequence(content, "content", self.d_model, "d_model")
        batch, t, _ = content.shape
        if query_stream is None:
            query_stream = self.mask_emb.expand(batch, t, self.d_model)  # (B, T, d_model): XLNet's w
        _check_sequence(query_stream, "query_stream", self.d_model, "d_model")
        if query_stream.shape != content.shape:
            raise ValueError(f"query_stream has shape {tuple(query_stream.shape)} but content has "
                             f"{tuple(content.shape)}; the two streams must match")
        if order is None:
            order = torch.arange(t, device=content.device)
        if order.dim() == 1:
            order = order.expand(batch, t)  # (B, T)
        if (order.dtype not in (torch.int32, torch.int64) or order.shape != (batch, t)
                or not torch.equal(order.sort(-1).values, torch.arange(t, device=order.device).expand(batch, t))):
            raise ValueError(f"order must be a permutation of 0..{t - 1} per batch element, shape (T,) or "
                             f"(B, T) = ({batch}, {t}), got {order.dtype} {tuple(order.shape)}")
        _check_mask(mask, (batch, self.num_heads, t, t))
        _check_key_padding_mask(key_padding_mask, batch, t)
        extra = _merge_masks(mask, key_padding_mask, False, t, t, content.device)  # None, (T, T) or 4-D
        content_mask, query_mask = self.order_masks(order.long())  # (B, 1, T, T) each  eq. (6)
        if extra is not None:
            content_mask, query_mask = content_mask & extra, query_mask & extra

        split = (batch, t, self.num_heads, self.head_dim)
        k = self.k_proj(content).view(split).transpose(1, 2)  # (B, H, T, Dh): keys from content only
        v = self.v_proj(content).view(split).transpose(1, 2)  # (B, H, T, Dh)
        q_h = self.q_proj(content).view(split).transpose(1, 2)  # (B, H, T, Dh)
        q_g = self.q_proj(query_stream).view(split).transpose(1, 2)  # (B, H, T, Dh): a position, no content
        dropout_p = self.dropout if self.training else 0.0
        h, h_weights = _attend(q_h, k, v, content_mask, dropout_p, need_weights)  # (B, H, T, Dh)  eq. (4)
        g, g_weights = _attend(q_g, k, v, query_mask, dropout_p, need_weights)  # (B, H, T, Dh)  eq. (5)
        h = self.out_proj(h.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)
        g = self.out_proj(g.transpose(1, 2).reshape(batch, t, self.d_model))  # (B, T, d_model)
        return ((h, g), (h_weights, g_weights)) if need_weights else (h, g)


def _demo() -> None:
    """Demo of `python mechanisms/bidirectional_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    d_model, num_heads, t = 16, 4, 8
    x = torch.randn(2, t, d_model, requires_grad=True)
    bert = BidirectionalSelfAttention(d_model, num_heads).eval()
    out = bert(x)
    out[:, 0].sum().backward()  # how much does token 0's output depend on each token?
    print(f"output shape {tuple(out.shape)}; |d out_0 / d x_j| for j = 0..{t - 1}:",
          [round(g, 3) for g in x.grad[0].abs().sum(-1).tolist()])
    assert (x.grad[0, 1:].abs().sum(-1) > 0).all(), "token 0 must read the tokens after it"

    ids = torch.randint(5, 1000, (64, 512), generator=torch.Generator().manual_seed(0))
    corrupted, labels = bert_mlm_corruption(ids, 1000, mask_token_id=4, generator=torch.Generator().manual_seed(1))
    selected = labels != -100
    masked = (corrupted[selected] == 4).float().mean().item()
    unchanged = (corrupted[selected] == ids[selected]).float().mean().item()
    print(f"BERT corruption of {ids.numel()} tokens: {selected.float().mean():.4f} selected; of those {masked:.4f} "
          f"[MASK], {1 - masked - unchanged:.4f} random, {unchanged:.4f} unchanged")

    xlnet = TwoStreamAttention(d_model, num_heads).eval()
    order = torch.randperm(t)
    content = torch.randn(1, t, d_model, requires_grad=True)
    _, g = xlnet(content, order=order)
    target = order[3]  # the position predicted 4th
    g[0, target].sum().backward()
    own = content.grad[0, target].abs().sum().item()
    print(f"two-stream: order {order.tolist()}; |d g_{target.item()} / d h_{target.item()}| = {own:.1e} (own content unseen)")
    assert own == 0.0


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
