"""Hierarchical attention (HAN): word-level attention pooling into sentences, then sentence-level into a document.

Paper: Zichao Yang, Diyi Yang, Chris Dyer, Xiaodong He, Alex Smola, Eduard Hovy, "Hierarchical Attention
Networks for Document Classification", NAACL 2016 (https://aclanthology.org/N16-1174/; no arXiv version).

Idea: a document is sentences and a sentence is words, and which words matter depends on the sentence
while which sentences matter depends on the document. HAN therefore pools twice: within each sentence,
a learned word context vector u_w scores every word and the sentence vector is the weighted sum of its
words; across sentences, a learned sentence context vector u_s scores every sentence vector and the
document vector is their weighted sum. Each word's effective weight in the document is the product of its
weight in its sentence and its sentence's weight in the document.

Equations (page):  u_it = tanh(W_w h_it + b_w),  alpha_it = softmax_t(u_it . u_w),  s_i = sum_t alpha_it h_it  eq. (1)-(2)
                   u_i = tanh(W_s s_i + b_s),   beta_i = softmax_i(u_i . u_s),     v = sum_i beta_i s_i        eq. (3)-(4)
                   effective weight of word t of sentence i in v: beta_i * alpha_it (sums to 1)             eq. (5)
In HAN, h_it comes from a bidirectional GRU over the words and a second GRU runs over the s_i before eq. (3);
those encoders are ordinary recurrent layers, so this file holds the two attention levels and takes the
encoded words as input (the page shows where the GRUs go).

Complexity for S sentences of at most W words, width d, attention width k: time O(S W d k), memory O(S W k);
linear in the document length, no pairwise matrix.

Reduces to / oracle: a document of one sentence is attention pooling of its words (sentence weight 1);
an explicit loop over documents, sentences and words with padded words and padded sentences; padding has
no influence (tests/test_hierarchical_attention.py).

Docs page: docs/mechanisms/hierarchical_attention.md
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn


def _pool(items: torch.Tensor, proj: nn.Linear, context: torch.Tensor,
          real: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling over axis -2 of `items` (..., N, d): softmax_n(tanh(W x_n + b) . u), padded n excluded.

    Returns (pooled (..., d), weights (..., N)); a group with no real item pools to zero with zero weights.
    """
    scores = torch.tanh(proj(items)) @ context  # (..., N): u_n . u
    if real is None:
        weights = torch.softmax(scores, dim=-1)  # (..., N)
    else:
        has_item = real.any(dim=-1, keepdim=True)  # (..., 1)
        # An empty group gets every item for the softmax (finite, no NaN), then zero weights.
        weights = torch.softmax(scores.masked_fill(~(real | ~has_item), float("-inf")), dim=-1)  # (..., N)
        weights = weights.masked_fill(~has_item, 0.0)
    return (weights.unsqueeze(-1) * items).sum(-2), weights  # (..., d), (..., N)


class HierarchicalAttention(nn.Module):
    """HAN's two attention levels: words -> sentence vectors -> one document vector.

    Args:
        d_model: width d of the (encoded) word vectors, and of the sentence and document vectors.
        hidden_dim: k, width of the attention's hidden layer and of the context vectors u_w and u_s.
        bias: whether the two k x d projections W_w and W_s have a bias (HAN: yes).

    forward(documents, key_padding_mask=None, need_weights=False):
        documents (B, S, W, d_model): S sentences of W words (shorter sentences and documents padded).
        key_padding_mask (B, S, W), True = a real word. A sentence without a real word is a padded sentence:
        it gets sentence weight 0. A document without any real word gives the zero vector.
        Returns the document vectors (B, d_model); with need_weights=True, (documents_out,
        (word_weights (B, S, W), sentence_weights (B, S))), word weights summing to 1 within each sentence.
    """

    def __init__(self, d_model: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(hidden_dim, "hidden_dim")
        self.d_model, self.hidden_dim = d_model, hidden_dim
        self.word_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # W_w, b_w
        self.word_context = nn.Parameter(torch.randn(hidden_dim) / hidden_dim ** 0.5)  # u_w
        self.sentence_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # W_s, b_s
        self.sentence_context = nn.Parameter(torch.randn(hidden_dim) / hidden_dim ** 0.5)  # u_s

    def forward(self, documents: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]:
        if not isinstance(documents, torch.Tensor) or documents.dim() != 4 or documents.size(-1) != self.d_model:
            got = tuple(documents.shape) if isinstance(documents, torch.Tensor) else type(documents).__name__
            raise ValueError(f"documents must have shape (B, S, W, d_model) = (B, sentences, words, "
                             f"{self.d_model}), got {got}")
        batch, sentences, words, _ = documents.shape
        real_sentence = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
                raise TypeError(f"key_padding_mask must be a torch.bool tensor (True = a real word), got {got}")
            if tuple(key_padding_mask.shape) != (batch, sentences, words):
                raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                                 f"(B, S, W) = ({batch}, {sentences}, {words})")
            real_sentence = key_padding_mask.any(dim=-1)  # (B, S): a sentence is real if it has a real word
        # Word level, eq. (1)-(2): every sentence pooled on its own, with the one word context vector u_w.
        sentence_vectors, word_weights = _pool(documents, self.word_proj, self.word_context,
                                               key_padding_mask)  # (B, S, d), (B, S, W)
        # Sentence level, eq. (3)-(4): the sentence vectors pooled with the sentence context vector u_s.
        document, sentence_weights = _pool(sentence_vectors, self.sentence_proj, self.sentence_context,
                                           real_sentence)  # (B, d), (B, S)
        return (document, (word_weights, sentence_weights)) if need_weights else document


def effective_word_weights(word_weights: torch.Tensor, sentence_weights: torch.Tensor) -> torch.Tensor:
    """Eq. (5): the weight of each word in the document vector, beta_i * alpha_it, shape (B, S, W).

    The document vector is exactly sum_{i,t} (beta_i alpha_it) h_it, so these weights sum to 1 over the
    whole document (0 for an all-padded one). This is what HAN's visualisations colour.
    """
    return sentence_weights.unsqueeze(-1) * word_weights  # (B, S, W)


def _demo() -> None:
    """Demo of `python mechanisms/hierarchical_attention.py`; the guard at the end of the file calls it."""
    torch.manual_seed(0)
    d_model, hidden_dim = 16, 8
    han = HierarchicalAttention(d_model, hidden_dim)
    documents = torch.randn(2, 3, 5, d_model)  # 2 documents, 3 sentences of 5 words
    real = torch.ones(2, 3, 5, dtype=torch.bool)
    real[0, 2] = False  # document 0 has only two sentences
    real[1, :, 3:] = False  # document 1's sentences have three words
    doc, (alpha, beta) = han(documents, key_padding_mask=real, need_weights=True)
    effective = effective_word_weights(alpha, beta)
    # Checked fact: the document vector is the effective-weight average of its words, eq. (5).
    flat = (effective.unsqueeze(-1) * documents).sum((1, 2))
    diff = (doc - flat).abs().max().item()
    print(f"document vectors {tuple(doc.shape)}; sentence weights of document 0: "
          f"{[round(b, 3) for b in beta[0].tolist()]}")
    print(f"max |document vector - sum of beta_i alpha_it h_it| = {diff:.1e}; effective weights sum to "
          f"{[round(s, 6) for s in effective.sum((1, 2)).tolist()]}")
    assert diff < 1e-6


# =====================================================================================================
# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them
# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.
# =====================================================================================================


def _check_positive_int(value: int, name: str) -> None:
    """Raise unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


if __name__ == "__main__":
    _demo()
