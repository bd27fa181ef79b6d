"""mechanisms/graph_attention.py: GAT and GATv2 against an explicit loop over edges, and the static/dynamic claim.

Oracle: for every graph, node i and head, the neighbours of i are listed from the adjacency, each edge's
score is computed from the papers' formulas with the module's parameters (LeakyReLU written as a `where`,
softmax as exp / sum), and the messages are summed. The paper-specific facts: non-edges carry no weight
and no influence; GAT ranks a shared neighbourhood the same way for every node (static attention, Brody et
al. Theorem 1) while GATv2 can rank it differently per node (a hand-built example).
"""
import pytest
import torch

from mechanisms.graph_attention import GraphAttention

FP64_TOL = 1e-10
D, H, N, B = 8, 2, 6, 2


def _model(version="gat", dtype=torch.float64, seed=0, d_model=D, num_heads=H, **kwargs):
    torch.manual_seed(seed)
    model = GraphAttention(d_model, num_heads, version=version, **kwargs).to(dtype).eval()
    if model.bias is not None:
        with torch.no_grad():
            model.bias.copy_(torch.randn_like(model.bias))  # a non-zero bias, so a dropped one shows
    return model


def _graph(seed=1, dtype=torch.float64):
    """Node features, a random directed adjacency (B, N, N) with one isolated node, and node padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=dtype)
    adjacency = torch.rand(B, N, N, generator=g) > 0.5
    adjacency[0, 3] = False  # node 3 of graph 0 has no in-neighbour (only its self loop, if any)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, -1] = False  # graph 1 has N - 1 real nodes
    return x, adjacency, kpm


def _leaky(z, slope):
    return torch.where(z > 0, z, slope * z)


def _loop_oracle(model, x, adjacency, kpm):
    """The papers' formulas, one edge at a time. Returns (out (B, N, F), alpha (B, H, N, N))."""
    batch, nodes, _ = x.shape
    dh, slope = model.head_dim, model.negative_slope
    out = torch.zeros(batch, nodes, model.out_features, dtype=x.dtype)
    alpha = torch.zeros(batch, model.num_heads, nodes, nodes, dtype=x.dtype)
    for b in range(batch):
        for i in range(nodes):
            neighbours = [j for j in range(nodes)
                          if kpm[b, j] and (adjacency[b, i, j] or (model.add_self_loops and j == i))]
            heads = []
            for h in range(model.num_heads):
                rows = slice(h * dh, (h + 1) * dh)
                if model.version == "gat":
                    w = model.proj.weight[rows]  # (Dh, d)
                    scores = [_leaky(model.att_dst[h] @ (w @ x[b, i]) + model.att_src[h] @ (w @ x[b, j]), slope)
                              for j in neighbours]
                    messages = [w @ x[b, j] for j in neighbours]
                else:
                    w_dst, w_src = model.proj_dst.weight[rows], model.proj_src.weight[rows]
                    scores = [model.att[h] @ _leaky(w_dst @ x[b, i] + w_src @ x[b, j], slope) for j in neighbours]
                    messages = [w_src @ x[b, j] for j in neighbours]
                head = torch.zeros(dh, dtype=x.dtype)
                if neighbours:
                    e = torch.stack(scores)
                    a = torch.exp(e - e.max())
                    a = a / a.sum()
                    for weight, j, message in zip(a, neighbours, messages):
                        alpha[b, h, i, j] = weight
                        head = head + weight * message
                heads.append(head)
            row = torch.cat(heads) if model.concat else torch.stack(heads).mean(0)
            out[b, i] = row + (model.bias if model.bias is not None else 0.0)
    return out, alpha


@pytest.mark.parametrize("version", ["gat", "gatv2"])
@pytest.mark.parametrize("concat,add_self_loops", [(True, True), (False, False)])
def test_matches_an_explicit_loop_over_edges(version, concat, add_self_loops):
    model = _model(version, concat=concat, add_self_loops=add_self_loops, negative_slope=0.3)
    x, adjacency, kpm = _graph()
    with torch.no_grad():
        expected, expected_alpha = _loop_oracle(model, x, adjacency, kpm)
        out, alpha = model(x, adjacency, key_padding_mask=kpm, need_weights=True)
        shared = model(x, adjacency[0], need_weights=False)  # one (N, N) graph for the whole batch
        expected_shared, _ = _loop_oracle(model, x, adjacency[0].expand(B, N, N), torch.ones(B, N, dtype=torch.bool))
    assert (out - expected).abs().max() < FP64_TOL
    assert (alpha - expected_alpha).abs().max() < FP64_TOL
    assert (shared - expected_shared).abs().max() < FP64_TOL


@pytest.mark.parametrize("version", ["gat", "gatv2"])
def test_non_edges_get_zero_weight_and_have_no_influence(version):
    model = _model(version)
    x, adjacency, _ = _graph()
    out, alpha = model(x, adjacency, need_weights=True)
    allowed = adjacency | torch.eye(N, dtype=torch.bool)
    assert (alpha.transpose(0, 1)[:, ~allowed] == 0).all()
    # Move the features of every node that is NOT an in-neighbour of node 0 (in graph 0): node 0 is unchanged.
    strangers = ~allowed[0, 0]
    moved = x.clone()
    moved[0, strangers] += 5 * torch.randn(int(strangers.sum()), D, dtype=torch.float64)
    assert (model(moved, adjacency)[0, 0] - out[0, 0]).abs().max() < FP64_TOL
    assert (model(moved, adjacency)[0, strangers] - out[0, strangers]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", range(5))
def test_gat_attention_is_static_every_node_ranks_shared_neighbours_alike(seed):
    # Brody et al., Theorem 1: e_ij = LeakyReLU(c_i + t_j) is monotone in t_j, so on a shared neighbourhood
    # the ORDER of the neighbours (and in particular the favourite one) is the same for every query node.
    model = _model("gat", seed=seed, num_heads=2, add_self_loops=False)
    x = torch.randn(3, N, D, dtype=torch.float64)
    _, alpha = model(x, need_weights=True)  # complete graph: every node has the same neighbours
    order = alpha.argsort(dim=-1)  # (B, H, N, N)
    assert (order == order[:, :, :1]).all()


def test_gatv2_ranks_the_same_neighbours_differently_per_node():
    # A hand-built GATv2 with W_dst = W_src = I and a = (1, 1): e_ij = sum_d LeakyReLU(x_i + x_j)_d.
    # Queries q1 = (0, -5), q2 = (-5, 0) both see keys A = (2, 0) and B = (0, 2). With slope 0.2:
    # e(q1, A) = 2 - 1 = 1 > e(q1, B) = 0 - 0.6, but e(q2, A) = -0.6 < e(q2, B) = -1 + 2 = 1.
    model = GraphAttention(2, 1, version="gatv2", add_self_loops=False, bias=False).double().eval()
    with torch.no_grad():
        model.proj_dst.weight.copy_(torch.eye(2))
        model.proj_src.weight.copy_(torch.eye(2))
        model.att.fill_(1.0)
    x = torch.tensor([[[0.0, -5.0], [-5.0, 0.0], [2.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    adjacency = torch.zeros(4, 4, dtype=torch.bool)
    adjacency[:2, 2:] = True  # q1 and q2 attend to A and B
    _, alpha = model(x, adjacency, need_weights=True)
    e = torch.tensor([[1.0, -0.6], [-0.6, 1.0]], dtype=torch.float64)
    assert (alpha[0, 0, :2, 2:] - torch.softmax(e, dim=-1)).abs().max() < FP64_TOL
    assert alpha[0, 0, 0, 2] > alpha[0, 0, 0, 3] and alpha[0, 0, 1, 3] > alpha[0, 0, 1, 2]
    # GAT on the same graph, whatever its weights, gives q1 and q2 the same favourite.
    for seed in range(5):
        _, alpha_gat = _model("gat", seed=seed, d_model=2, num_heads=1, add_self_loops=False)(
            x, adjacency, need_weights=True)
        assert alpha_gat[0, 0, 0, 2:].argmax() == alpha_gat[0, 0, 1, 2:].argmax()


@pytest.mark.parametrize("version", ["gat", "gatv2"])
def test_with_negative_slope_one_every_node_gets_the_same_weights(version):
    # The limit case: with slope 1 the LeakyReLU is the identity, both scores are a sum of a node term and
    # a neighbour term, the node term cancels in the softmax, and every node pools its neighbours with the
    # same weights softmax_j(a_src . W x_j): attention pooling, for GAT and GATv2 alike.
    model = _model(version, negative_slope=1.0, add_self_loops=False)
    x = _graph()[0]
    _, alpha = model(x, need_weights=True)
    assert (alpha - alpha[:, :, :1]).abs().max() < FP64_TOL
    if version == "gat":
        t = (model.proj(x).view(B, N, H, -1) * model.att_src).sum(-1).transpose(1, 2)  # (B, H, N)
    else:
        t = (model.proj_src(x).view(B, N, H, -1) * model.att).sum(-1).transpose(1, 2)
    assert (alpha[:, :, 0] - torch.softmax(t, dim=-1)).abs().max() < FP64_TOL


def test_distinct_from_dot_product_multi_head_attention():
    # Scaled dot-product attention with the same projection (q = k = v = W x per head) is a different
    # function, and it is dynamic: its favourite key changes from query to query, where GAT's cannot.
    model = _model("gat", bias=False, add_self_loops=False)
    x = _graph()[0]
    out, alpha = model(x, need_weights=True)
    h = model.proj(x).view(B, N, H, -1).transpose(1, 2)  # (B, H, N, Dh)
    dot = torch.softmax(h @ h.transpose(-2, -1) / (D // H) ** 0.5, dim=-1)
    mha = (dot @ h).transpose(1, 2).reshape(B, N, D)
    assert (out - mha).abs().max() > 1e-3
    favourite = dot.argmax(-1)
    assert (favourite != favourite[..., :1]).any()
    assert (alpha.argmax(-1) == alpha.argmax(-1)[..., :1]).all()


def test_every_constructor_argument_changes_the_output():
    x, adjacency, _ = _graph()
    base = _model("gat")
    out = base(x, adjacency)
    assert out.shape == (B, N, H * (D // H))

    def variant(**kwargs):
        model = _model(**kwargs)
        model.load_state_dict(base.state_dict())
        return model(x, adjacency)

    assert (variant(negative_slope=0.7) - out).abs().max() > 1e-3, "negative_slope"
    assert (variant(add_self_loops=False) - out).abs().max() > 1e-3, "add_self_loops"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({k: v for k, v in base.state_dict().items() if k != "bias"})
    assert (no_bias(x, adjacency) + base.bias - out).abs().max() < FP64_TOL, "bias"
    assert base.bias.abs().max() > 1e-3, "bias"
    # concat=False averages the heads that concat=True lays side by side.
    mean = _model(concat=False, bias=False)
    mean.load_state_dict({k: v for k, v in base.state_dict().items() if k != "bias"})
    heads = (out - base.bias).view(B, N, H, D // H)
    assert (mean(x, adjacency) - heads.mean(2)).abs().max() < FP64_TOL, "concat"
    assert (heads[:, :, 0] - heads[:, :, 1]).abs().max() > 1e-3, "concat"
    # num_heads: one head of width 8 reads the same W and the same numbers of a, cut differently.
    one = _model(num_heads=1)
    state = base.state_dict()
    one.load_state_dict({k: (v.reshape(1, D) if k.startswith("att") else v) for k, v in state.items()})
    assert (one(x, adjacency) - out).abs().max() > 1e-3, "num_heads"
    assert _model(head_dim=3)(x, adjacency).shape == (B, N, H * 3), "head_dim"
    assert _model(d_model=4, num_heads=2)(x[..., :4], adjacency).shape == (B, N, 4), "d_model"
    assert (_model("gatv2")(x, adjacency) - out).abs().max() > 1e-3, "version"
    dropped = _model(dropout=0.5)
    dropped.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    assert (dropped.train()(x, adjacency) - out).abs().max() > 1e-3, "dropout"


def test_bad_constructor_arguments_name_the_argument():
    with pytest.raises(ValueError, match="version"):
        GraphAttention(D, H, version="gat3")
    with pytest.raises(ValueError, match="negative_slope"):
        GraphAttention(D, H, negative_slope=-0.1)
    with pytest.raises(ValueError, match="head_dim"):
        GraphAttention(D, H, head_dim=0)
    with pytest.raises(ValueError, match="concat"):
        GraphAttention(D, H, concat="yes")
    with pytest.raises(ValueError, match="adjacency"):
        _model()(_graph()[0], torch.ones(N, N + 1, dtype=torch.bool))
