"""Graph attention: GAT and GATv2, on a dense adjacency mask, with multi-head concatenation or averaging.

Papers: Petar Velickovic, Guillem Cucurull, Arantxa Casanova, Adriana Romero, Pietro Lio, Yoshua Bengio,
"Graph Attention Networks", 2018, arXiv:1710.10903 (GAT); Shaked Brody, Uri Alon, Eran Yahav, "How
Attentive are Graph Attention Networks?", 2021, arXiv:2105.14491 (GATv2).

Idea: every node i attends only to its neighbours j (the edges j -> i of the graph, plus itself), with a
score computed by a tiny one-layer network on the pair instead of a dot product. GAT applies its
LeakyReLU AFTER the attention vector a, so the score is a monotone function of a_dst.Wx_i + a_src.Wx_j
and every node ranks its neighbours in the same order ("static attention"). GATv2 applies a after the
LeakyReLU, which makes the ranking depend on the query node ("dynamic attention").

Equation:  GAT:   e_ij = LeakyReLU(a_dst . W x_i + a_src . W x_j),            message W x_j
           GATv2: e_ij = a . LeakyReLU(W_dst x_i + W_src x_j),                message W_src x_j
           alpha_ij = softmax over the neighbours j of i of e_ij,  h_i = sum_j alpha_ij message_j,
           heads concatenated (or averaged), plus a bias.

Complexity for N nodes (dense adjacency): GAT time O(N d H Dh + H N^2), memory O(H N^2); GATv2 time and
memory O(H N^2 Dh), since the LeakyReLU acts on one Dh-vector per pair.

Reduces to / oracle: an explicit loop over the edges of the graph (tests/test_graph_attention.py::
test_matches_an_explicit_loop_over_edges); with negative_slope = 1 both forms are linear and every node
gets the same weights over a shared neighbourhood (attention pooling), the limit case of
tests/test_graph_attention.py::test_with_negative_slope_one_every_node_gets_the_same_weights.

Docs page: docs/mechanisms/graph_attention.md
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

VERSIONS = ("gat", "gatv2")


class GraphAttention(nn.Module):
    """One graph attention layer (GAT or GATv2) over a batch of graphs with N nodes each.

    Args:
        d_model: width of the node features x.
        num_heads: number of attention heads H.
        head_dim: width Dh of each head's message; default d_model // num_heads (then d_model must be
            divisible by num_heads, and concat=True returns width d_model).
        version: "gat" (Velickovic et al., static attention) or "gatv2" (Brody et al., dynamic attention).
        concat: True concatenates the heads (output width H * Dh, the paper's hidden layers); False averages
            them (output width Dh, the paper's output layer).
        negative_slope: slope of the LeakyReLU for negative inputs (0.2 in both papers).
        add_self_loops: every node also attends to itself, as in both papers.
        dropout: dropout probability on the attention coefficients alpha, active only in training mode.
        bias: whether a bias is added to the output.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: Optional[int] = None, version: str = "gat",
                 concat: bool = True, negative_slope: float = 0.2, add_self_loops: bool = True,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_heads, "num_heads")
        if head_dim is None:
            _check_divisible(d_model, "d_model", num_heads, "num_heads")
            head_dim = d_model // num_heads
        _check_positive_int(head_dim, "head_dim")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if not isinstance(concat, bool):
            raise ValueError(f"concat must be True (concatenate the heads) or False (average them), got {concat!r}")
        if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool) or negative_slope < 0:
            raise ValueError(f"negative_slope must be a number >= 0, got {negative_slope!r}")
        _check_dropout(dropout)
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.version = version
        self.concat = concat
        self.negative_slope = float(negative_slope)
        self.add_self_loops = add_self_loops
        self.dropout = dropout
        self.out_features = num_heads * head_dim if concat else head_dim
        if version == "gat":
            # One shared map W, eq. (1); the attention vector a = [a_dst || a_src] is split in its two halves,
            # so that a . [W x_i || W x_j] = a_dst . W x_i + a_src . W x_j, eq. (2).
            self.proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
            self.att_dst = nn.Parameter(torch.empty(num_heads, head_dim))
            self.att_src = nn.Parameter(torch.empty(num_heads, head_dim))
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.xavier_uniform_(self.att_dst)
            nn.init.xavier_uniform_(self.att_src)
        else:
            # GATv2 keeps the two halves of W apart, W = [W_dst || W_src], because the LeakyReLU now sits
            # between W and a, eq. (3); the message is W_src x_j, as in PyTorch Geometric's GATv2Conv.
            self.proj_dst = nn.Linear(d_model, num_heads * head_dim, bias=False)
            self.proj_src = nn.Linear(d_model, num_heads * head_dim, bias=False)
            self.att = nn.Parameter(torch.empty(num_heads, head_dim))
            nn.init.xavier_uniform_(self.proj_dst.weight)
            nn.init.xavier_uniform_(self.proj_src.weight)
            nn.init.xavier_uniform_(self.att)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor, adjacency: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Node i aggregates the messages of its neighbours j, weighted by alpha_ij.

        x: (B, N, d_model) node features.
        adjacency: bool, True where there is an edge j -> i ("node i may attend to node j"), (N, N) shared by
            the batch or (B, N, N) per graph; None = the complete graph. Row i lists i's in-neighbours, the
            layout of an attention mask (Tq, Tk).
        key_padding_mask: bool (B, N), True = a real node; padded nodes send nothing, not even to themselves.
        Returns (B, N, out_features), or (output, alpha (B, H, N, N) taken before dropout). A node with no
        neighbour (no self loop either) gets zero attention: its output is the bias.
        """
        _check_nodes(x, self.d_model)
        batch, nodes, _ = x.shape
        _check_adjacency(adjacency, batch, nodes)
        _check_key_padding_mask(key_padding_mask, batch, nodes)

        # Who may attend to whom: the edges, the self loops, and no padded node, eq. (4).
        allowed = None
        if adjacency is not None:
            allowed = adjacency if adjacency.dim() == 3 else adjacency.unsqueeze(0)  # (B or 1, N, N)
        if self.add_self_loops and allowed is not None:
            allowed = allowed | torch.eye(nodes, dtype=torch.bool, device=x.device)  # (B or 1, N, N)
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, :]  # (B, 1, N): node j exists
            allowed = padding if allowed is None else allowed & padding  # (B, N, N)
        if allowed is not None:
            allowed = allowed.unsqueeze(1)  # (B or 1, 1, N, N): the same graph for every head

        if self.version == "gat":
            h = self.proj(x).view(batch, nodes, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
            # eq. (2): the two halves of a give one number per node and head; the score of the pair is their
            # sum, passed through the LeakyReLU. Being monotone, the LeakyReLU cannot change which neighbour
            # scores highest: that is fixed by a_src . W x_j alone (static attention).
            s_dst = (h * self.att_dst[:, None, :]).sum(-1)  # (B, H, N)
            s_src = (h * self.att_src[:, None, :]).sum(-1)  # (B, H, N)
            scores = F.leaky_relu(s_dst[..., :, None] + s_src[..., None, :], self.negative_slope)  # (B, H, N, N)
            messages = h  # (B, H, N, Dh)
        else:
            h_dst = self.proj_dst(x).view(batch, nodes, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
            h_src = self.proj_src(x).view(batch, nodes, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
            # eq. (3): the LeakyReLU acts on the sum for each PAIR before a reads it, so the score is a
            # non-linear function of (x_i, x_j) jointly and the ranking can change with the query node i.
            hidden = F.leaky_relu(h_dst[:, :, :, None, :] + h_src[:, :, None, :, :],
                                  self.negative_slope)  # (B, H, N, N, Dh)
            scores = (hidden * self.att[:, None, None, :]).sum(-1)  # (B, H, N, N)
            messages = h_src  # (B, H, N, Dh)

        row_has_key = None
        if allowed is not None:
            # A node with no neighbour would be softmax over all -inf = NaN. Give such rows every node (any
            # finite answer will do), then overwrite their output with zeros.
            row_has_key = allowed.any(dim=-1, keepdim=True)  # (B or 1, 1, N, 1)
            scores = scores.masked_fill(~(allowed | ~row_has_key), float("-inf"))  # exp(-inf) = 0: no weight
        weights = torch.softmax(scores, dim=-1)  # (B, H, N, N)  eq. (5): over the neighbours j of each i
        if row_has_key is not None:
            weights = weights.masked_fill(~row_has_key, 0.0)  # (B, H, N, N)
        # Dropout on the coefficients, as the GAT paper does (p = 0.6 there); rescaled by 1 / (1 - p).
        dropped = F.dropout(weights, p=self.dropout) if self.training and self.dropout > 0.0 else weights
        out = dropped @ messages  # (B, H, N, Dh)  eq. (6)
        if self.concat:
            out = out.transpose(1, 2).reshape(batch, nodes, self.num_heads * self.head_dim)  # (B, N, H*Dh)  eq. (7)
        else:
            out = out.mean(dim=1)  # (B, N, Dh)  eq. (8)
        if self.bias is not None:
            out = out + self.bias  # (B, N, out_features)
        return (out, weights) if need_weights else out


def _check_nodes(x: torch.Tensor, d_model: int) -> None:
    """Raise unless `x` is a (B, N, d_model) tensor of node features."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(-1) != d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, N, d_model) = (B, N, {d_model}), got {got}")


def _check_adjacency(adjacency: Optional[torch.Tensor], batch: int, nodes: int) -> None:
    """Raise unless `adjacency` is None or a bool (N, N) or (B, N, N) tensor."""
    if adjacency is None:
        return
    if not isinstance(adjacency, torch.Tensor) or adjacency.dtype != torch.bool:
        got = adjacency.dtype if isinstance(adjacency, torch.Tensor) else type(adjacency).__name__
        raise TypeError(f"adjacency must be a torch.bool tensor (True = edge j -> i), got {got}; "
                        f"convert a 0/1 matrix with adjacency.bool()")
    if tuple(adjacency.shape) not in ((nodes, nodes), (batch, nodes, nodes)):
        raise ValueError(f"adjacency has shape {tuple(adjacency.shape)}, expected (N, N) = ({nodes}, {nodes}) "
                         f"or (B, N, N) = ({batch}, {nodes}, {nodes})")


def _demo() -> None:
    torch.manual_seed(0)
    batch, nodes, d_model = 2, 6, 8
    x = torch.randn(batch, nodes, d_model)
    adjacency = torch.rand(nodes, nodes) > 0.5  # a random directed graph; self loops are added
    for version in VERSIONS:
        layer = GraphAttention(d_model, num_heads=2, version=version).eval()
        out, alpha = layer(x, adjacency, need_weights=True)
        # The checked fact: non-edges get exactly zero weight, and each node's weights sum to one.
        non_edges = ~(adjacency | torch.eye(nodes, dtype=torch.bool))
        assert (alpha[..., non_edges] == 0).all()
        assert torch.allclose(alpha.sum(-1), torch.ones(batch, 2, nodes))
        print(f"{version}: output shape {tuple(out.shape)}; weight on non-edges = "
              f"{alpha[..., non_edges].abs().max().item():.1f}")
    # Static attention: on a complete graph GAT ranks the neighbours the same way for every node.
    gat = GraphAttention(d_model, num_heads=1, add_self_loops=False).eval()
    _, alpha = gat(x, need_weights=True)
    favourite = alpha.argmax(-1)  # (B, 1, N): the top neighbour of each node
    assert (favourite == favourite[..., :1]).all()
    print(f"GAT: every node's top neighbour is the same node: {favourite[0, 0].tolist()}")


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
