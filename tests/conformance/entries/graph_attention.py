"""Conformance entries for mechanisms/graph_attention.py: GraphAttention as GAT and as GATv2.

GraphAttention takes node features x (B, N, d_model) and an adjacency (N, N) or (B, N, N), not the
standard (query, key, value, mask) call. The adapter treats the sequence as the nodes of one graph per
batch element (self-attention only) and turns the suite's masks into an adjacency: a 2-D mask (Tq, Tk)
is an (N, N) adjacency, a 4-D mask (B or 1, 1, N, N) a per-graph one (a graph has no per-head edges, so a
mask with H > 1 is refused), `is_causal` keeps the edges j -> i with j <= i. `key_padding_mask` is the
module's own argument. Self loops are off in these entries, so that a masked row is really empty.
"""
import torch

from mechanisms.graph_attention import GraphAttention
from tests.conformance.registry import Entry


def graph_call(module, query, key=None, value=None, mask=None, key_padding_mask=None, is_causal=False,
               need_weights=False):
    """The suite's (query, mask, is_causal) as GraphAttention's (x, adjacency)."""
    adjacency = mask
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        if mask.dim() == 4 and mask.size(1) == 1:
            adjacency = mask[:, 0].expand(query.size(0), -1, -1)  # (B, N, N)
        elif mask.dim() != 2:
            raise ValueError(f"mask (the adjacency) must be (N, N) or (B, 1, N, N), got {tuple(mask.shape)}: "
                             f"a graph has no per-head edges")
    if is_causal and query.dim() == 3:
        causal = torch.ones(query.size(1), query.size(1), dtype=torch.bool, device=query.device).tril()
        adjacency = causal if adjacency is None else adjacency & causal
    return module(query, adjacency, key_padding_mask=key_padding_mask, need_weights=need_weights)


def _bias_or_zero(module, d_out, dtype, device):
    """A node with no neighbour gets zero attention: its output is the bias."""
    if module.bias is None:
        return torch.zeros(d_out, dtype=dtype, device=device)
    return module.bias.detach().to(dtype)


def _entry(version):
    return Entry(name=f"graph_attention.GraphAttention[{version}]",
                 build=lambda **kw: GraphAttention(d_model=8, num_heads=2, version=version, add_self_loops=False,
                                                   **kw),
                 d_model=8, num_heads=2, call=graph_call, self_only=True, empty_row=_bias_or_zero,
                 arg_names={"query": "x", "mask": "adjacency"},
                 exempt={"fused_explicit": "one path only: the graph-attention score (a small network on the "
                                           "pair of nodes) is not a dot product, so PyTorch's fused kernel does "
                                           "not apply"})


ENTRIES = [_entry("gat"), _entry("gatv2")]
NOT_ENTRIES = {}
