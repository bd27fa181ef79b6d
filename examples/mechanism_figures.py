"""Draws the figures of the mechanism pages: docs/mechanisms/figures/<stem>.png.

    python examples/mechanism_figures.py              # every figure
    python examples/mechanism_figures.py alibi local_attention   # just these

The PNGs are committed, so building the docs needs no training and no torch run; re-run this script
after changing a mechanism and commit what it writes. Each figure has a fixed seed and takes seconds
on a CPU.
"""
import argparse
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the mechanism files live in ROOT/mechanisms
# The imports below need that path, so they come after it.

from mechanisms.adaptive_span import AdaptiveSpanAttention, soft_span_mask
from mechanisms.additive_attention import AdditiveAttention
from mechanisms.adversarial_attention import AdversarialAttention
from mechanisms.alibi import alibi_bias, alibi_slopes
from mechanisms.bigbird_attention import BigBirdAttention
from mechanisms.axial_attention import AxialAttention, attention_score_counts
from mechanisms.attention_distillation import attention_distillation_loss
from mechanisms.attention_pooling import nadaraya_watson
from mechanisms.convolutional_attention import ConvolutionalAttention
from mechanisms.cross_attention import CrossAttention
from mechanisms.dual_attention import DualAttnEncoderBlock, PositionalSymbolRetriever
from mechanisms.gated_attention import GatedAttention
from mechanisms.graph_attention import GraphAttention
from mechanisms.differential_attention import DifferentialAttention, lambda_init_schedule
from mechanisms.flash_attention import flash_attention
from mechanisms.linear_attention import LinearAttention
from mechanisms.performer import PerformerAttention, positive_random_features
from mechanisms.retention import decay_matrix, retention_decays
from mechanisms.sigmoid_attention import SigmoidAttention
from mechanisms.grouped_query_attention import kv_cache_table
from mechanisms.hard_attention import gumbel_noise, straight_through_gumbel
from mechanisms.hierarchical_attention import HierarchicalAttention, effective_word_weights
from mechanisms.co_attention import CoAttention
from mechanisms.frequency_attention import FNetMixing, GlobalFilter
from mechanisms.bidirectional_attention import BidirectionalSelfAttention, TwoStreamAttention
from mechanisms.hybrid_attention import HybridAttention
from mechanisms.linformer import LinformerAttention
from mechanisms.local_attention import LocalAttention
from mechanisms.longformer_attention import LongformerAttention
from mechanisms.memory_augmented_attention import MemoryAugmentedAttention, knn_lookup
from mechanisms.multi_head_attention import MultiHeadAttention
from mechanisms.multi_head_latent_attention import MultiHeadLatentAttention
from mechanisms.multi_head_latent_attention import cache_table as mla_cache_table
from mechanisms.multiplicative_attention import LuongAttention
from mechanisms.nystromformer import NystromAttention, newton_schulz_pinv
from mechanisms.reformer_attention import ReformerAttention
from mechanisms.relative_position import t5_relative_position_bucket
from mechanisms.rotary_embedding import RotaryEmbedding
from mechanisms.scaled_dot_product_attention import scaled_dot_product_attention
from mechanisms.self_attention import SelfAttention
from mechanisms.sparse_attention import entmax15, sparsemax, topk_softmax
from mechanisms.sparse_transformer_attention import sparse_transformer_masks
from mechanisms.transformer_xl import TransformerXLAttention

OUT_DIR = ROOT / "docs" / "mechanisms" / "figures"


CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")  # masked pairs are drawn light grey


def _masked_in_grey(weights):
    """Weights as an array with exact zeros (masked pairs) set to NaN, which imshow draws in CMAP's bad colour."""
    return weights.masked_fill(weights == 0, float("nan")).numpy()


def figure_additive_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Train AdditiveAttention so that query i finds key i, then plot the weights of one padded example.

    The queries are a fixed random map of the keys into a wider space plus noise (query width 10,
    key width 6), so the module has to learn the match through W_q and W_k; the batch is padded to
    different lengths with a (B, 1, 1, Tk) mask.
    """
    torch.manual_seed(0)
    Dk, Dq, T, B = 6, 10, 9, 64
    mix = torch.randn(Dk, Dq)
    attn = AdditiveAttention(Dq, Dk, hidden_dim=16)
    opt = torch.optim.Adam(attn.parameters(), lr=0.02)

    def batch(n):
        keys = torch.randn(n, T, Dk)
        queries = keys @ mix + 0.3 * torch.randn(n, T, Dq)
        lengths = torch.randint(5, T + 1, (n,))
        mask = (torch.arange(T) < lengths[:, None]).view(n, 1, 1, T)
        return queries, keys, mask, lengths

    for _ in range(300):
        q, k, mask, _ = batch(B)
        _, w = attn(q, k, mask=mask, need_weights=True)
        target = torch.eye(T).expand(B, T, T)
        loss = -(target * torch.log(w[:, 0] + 1e-9)).sum(-1)  # (B, T): -log weight of the right key
        rows = mask[:, 0, 0, :]  # only rows of real queries count
        loss = (loss * rows).sum() / rows.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    q, k, mask, lengths = batch(1)
    mask[...] = True
    mask[..., 7:] = False  # show a padded example: keys 7 and 8 are padding
    with torch.no_grad():
        _, w = attn(q, k, mask=mask, need_weights=True)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    im = ax.imshow(w[0, 0].numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("key j (keys 7, 8 are padding: weight 0)")
    ax.set_ylabel("query i")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title("additive attention weights a_ij\nafter 300 steps: query i learns to find key i", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "additive_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_alibi(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Causal ALiBi bias for heads 1, 4 and 8 of 8 (T = 16), and the slopes for 8 and 6 heads."""
    T = 16
    bias = alibi_bias(8, T, T)                                       # (8, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    fig, axes = plt.subplots(1, 4, figsize=(13.0, 3.3))
    slopes8 = alibi_slopes(8)
    for ax, h in zip(axes[:3], (0, 3, 7)):
        shown = bias[h].masked_fill(~causal, float("nan")).numpy()   # masked future left blank
        # one colour scale for all heads, so that steep and flat heads can be compared
        im = ax.imshow(shown, cmap="magma", vmin=-4.0, vmax=0)
        ax.set_title(f"head {h + 1}: slope 2^-{h + 1} = {slopes8[h].item():.4g}", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks(range(0, T, 5))
        ax.set_yticks(range(0, T, 5))
    fig.colorbar(im, ax=axes[2], fraction=0.046, label="bias (clipped at -4)")
    axes[3].semilogy(range(1, 9), slopes8.numpy(), "o-", label="8 heads")
    axes[3].semilogy(range(1, 7), alibi_slopes(6).numpy(), "s", label="6 heads")
    axes[3].set_xlabel("head h")
    axes[3].set_ylabel("slope m_h")
    axes[3].set_title("slopes for 8 and 6 heads", fontsize=9)
    axes[3].set_ylim(8e-4, 1.0)
    axes[3].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "alibi.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_attention_pooling(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: fits of noisy samples of 2 sin(x) + x^0.8 at three bandwidths. Right: the attention
    weights softmax(-(x - x_i)^2 / 2h^2) of every query point over the (sorted) training points."""
    g = torch.Generator().manual_seed(0)
    n = 50
    x_train = torch.sort(torch.rand(n, generator=g) * 5).values
    truth = lambda x: 2 * torch.sin(x) + x ** 0.8
    y_train = truth(x_train) + 0.5 * torch.randn(n, generator=g)
    x_query = torch.linspace(0, 5, 200)

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.5))
    axes[0].plot(x_train, y_train, "o", ms=3, color="0.5", label="training points (x_i, y_i)")
    axes[0].plot(x_query, truth(x_query), "k--", lw=1, label="truth")
    for h in (0.05, 0.3, 2.0):
        axes[0].plot(x_query, nadaraya_watson(x_query, x_train, y_train, h), lw=1.5, label=f"h = {h}")
    axes[0].set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].set_title("Nadaraya-Watson fits: h trades noise for bias", fontsize=9)
    axes[0].legend(fontsize=7)

    h = 0.3
    weights = torch.softmax(-(x_query[:, None] - x_train[None, :]) ** 2 / (2 * h ** 2), dim=-1)
    im = axes[1].imshow(weights, aspect="auto", cmap="viridis",
                        extent=(0, n, x_query[-1].item(), x_query[0].item()))
    axes[1].set_xlabel("training point i (sorted by x_i): the keys")
    axes[1].set_ylabel("query x")
    axes[1].set_title(f"its attention weights, h = {h}: each query looks at its neighbours", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "attention_pooling.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_cross_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Head 0 of CrossAttention(32, 20, 4): 5 queries over 9 context tokens, the second context padded to 9."""
    torch.manual_seed(0)
    d_model, context_dim, num_heads, tq, tk = 32, 20, 4, 5, 9
    attention = CrossAttention(d_model, context_dim, num_heads).eval()
    x, context = torch.randn(2, tq, d_model) * 2.0, torch.randn(2, tk, context_dim) * 2.0
    padding = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])  # (B, Tk)
    with torch.no_grad():
        _, w = attention(x, context, mask=padding[:, None, None, :], need_weights=True)  # (B, H, Tq, Tk)
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 2.8))
    titles = ("batch element 0: context of 9 tokens", "batch element 1: 6 tokens + 3 padding")
    for b, ax in enumerate(axes):
        im = ax.imshow(_masked_in_grey(w[b, 0]), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(titles[b], fontsize=9)
        ax.set_xlabel("context token j")
        ax.set_ylabel("token i of x")
        ax.set_xticks(range(tk))
        ax.set_yticks(range(tq))
    fig.colorbar(im, ax=axes, fraction=0.025)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cross_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_grouped_query_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: kv head g(h) = h // G read by each of 8 query heads. Right: kv_cache_table() as bars."""
    num_heads = 8
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.4), gridspec_kw={"width_ratios": [1, 1.4]})
    for row, (label, kv_heads) in enumerate((("multi-head, H_kv = 8", 8), ("grouped, H_kv = 2", 2),
                                             ("multi-query, H_kv = 1", 1))):
        group = num_heads // kv_heads
        for h in range(num_heads):
            g = h // group  # eq. (2)
            left.add_patch(plt.Rectangle((h, -row - 0.4), 0.9, 0.8, color=plt.cm.tab10(g % 10)))
            left.text(h + 0.45, -row, str(g), ha="center", va="center", fontsize=8, color="white")
        left.text(-0.2, -row, label, ha="right", va="center", fontsize=8)
    left.set_xlim(-4.2, num_heads)
    left.set_ylim(-2.6, 0.6)
    left.set_xticks([h + 0.45 for h in range(num_heads)], [str(h) for h in range(num_heads)])
    left.set_yticks([])
    left.set_xlabel("query head h (number in the box: the key/value head it reads)")
    for side in ("top", "right", "left"):
        left.spines[side].set_visible(False)

    rows = kv_cache_table(seq_len=4096, batch_size=1, bytes_per_element=2)
    names = [r["name"] for r in rows]
    pos = list(range(len(rows)))
    right.bar([p - 0.2 for p in pos], [r["mha_cache_bytes"] / 2**30 for r in rows], 0.4, label="if multi-head (H_kv = H)",
              color="0.7")
    right.bar([p + 0.2 for p in pos], [r["cache_bytes"] / 2**30 for r in rows], 0.4, label="as built", color="tab:blue")
    for p, r in zip(pos, rows):
        right.text(p + 0.2, r["cache_bytes"] / 2**30 + 0.15, f"x{r['ratio']:.3g}", ha="center", fontsize=7)
    right.set_xticks(pos, names, fontsize=8)
    right.set_ylabel("KV cache, GiB (4096 tokens, 16-bit)")
    right.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "grouped_query_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_hard_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: frequencies of 5000 Gumbel-max samples against softmax(e). Right: one sample z and its
    relaxed versions y at three temperatures, all drawn with the same noise."""
    g = torch.Generator().manual_seed(0)
    Tk = 8
    scores = torch.randn(Tk, generator=g) * 1.2
    n = 5000
    hard, _ = straight_through_gumbel(scores.expand(1, 1, n, Tk), 1.0, generator=g)
    freq = hard[0, 0].mean(dim=0)
    probs = torch.softmax(scores, dim=-1)

    noise = gumbel_noise((1, 1, 1, Tk), generator=g)
    temps = (2.0, 0.5, 0.1)
    relaxed = [straight_through_gumbel(scores.view(1, 1, 1, Tk), t, noise=noise)[1][0, 0, 0] for t in temps]
    z = straight_through_gumbel(scores.view(1, 1, 1, Tk), 1.0, noise=noise)[0][0, 0, 0]

    keys = torch.arange(Tk)
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.3))
    width = 0.4
    axes[0].bar(keys - width / 2, probs, width, label="softmax(e)  (soft attention's weights)")
    axes[0].bar(keys + width / 2, freq, width, label=f"frequency of the hard choice, {n} samples")
    axes[0].set_xlabel("key j")
    axes[0].set_ylabel("probability")
    axes[0].set_title("training: argmax(e + g) samples from softmax(e)", fontsize=9)
    axes[0].legend(fontsize=7)
    width = 0.2
    axes[1].bar(keys - 1.5 * width, z, width, color="k", label="hard sample z (forward)")
    for i, (t, y) in enumerate(zip(temps, relaxed)):
        axes[1].bar(keys + (i - 0.5) * width, y, width, label=f"relaxed y, temperature {t}")
    axes[1].set_xlabel("key j")
    axes[1].set_title("same noise: y -> z as temperature -> 0 (backward uses y)", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "hard_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_local_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Dense weights (head 0) of a symmetric and a causal window, T = 20, w = 3, block grid overlaid."""
    torch.manual_seed(0)
    T, w, d_model = 20, 3, 16
    x = torch.randn(1, T, d_model)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.0))
    for ax, causal in zip(axes, (False, True)):
        attn = LocalAttention(d_model, num_heads=2, window=w, causal=causal).eval()
        with torch.no_grad():
            _, weights = attn(x, need_weights=True)
        im = ax.imshow(weights[0, 0].numpy(), cmap="viridis", vmin=0, vmax=weights[0, 0].max().item())
        for edge in range(w, T, w):  # block boundaries (block size b = w)
            ax.axhline(edge - 0.5, color="0.75", lw=0.6)
            ax.axvline(edge - 0.5, color="0.75", lw=0.6)
        kind = "causal: i-w <= j <= i" if causal else "symmetric: |i-j| <= w"
        ax.set_title(f"{kind}  (w = {w}, blocks of {w})", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks(range(0, T, 5))
        ax.set_yticks(range(0, T, 5))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "local_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_multi_head_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Per-head causal weights of one untrained MultiHeadAttention(32, 4) on one sequence of 10 tokens."""
    torch.manual_seed(0)
    T, d_model, num_heads = 10, 32, 4
    mha = MultiHeadAttention(d_model, num_heads).eval()
    x = torch.randn(1, T, d_model) * 2.0  # a wider input spread gives sharper, easier-to-see weights
    with torch.no_grad():
        _, w = mha(x, is_causal=True, need_weights=True)  # (1, H, T, T)
    fig, axes = plt.subplots(1, num_heads, figsize=(11.0, 3.0))
    for h, ax in enumerate(axes):
        im = ax.imshow(_masked_in_grey(w[0, h]), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key j")
        if h == 0:
            ax.set_ylabel("query i")
        ax.set_xticks(range(0, T, 3))
        ax.set_yticks(range(0, T, 3))
    fig.colorbar(im, ax=axes, fraction=0.015)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "multi_head_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_multiplicative_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """One query against 30 keys: global softmax weights, and local-p's window softmax times the Gaussian."""
    torch.manual_seed(3)
    D, Tk, window = 8, 30, 4
    glob = LuongAttention(D, score="general", alignment="global")
    local = LuongAttention(D, score="general", alignment="local-p", window=window)
    local.load_state_dict(glob.state_dict(), strict=False)
    query, keys = torch.randn(1, 1, D), torch.randn(1, Tk, D)
    with torch.no_grad():
        _, w_glob = glob(query, keys, need_weights=True)
        _, w_local = local(query, keys, need_weights=True)
        # p_t of eq. (6), recomputed from the module's parameters for the plot
        p = (Tk * torch.sigmoid(local.position_score(torch.tanh(local.position_proj(query))))).item()
    s = torch.arange(Tk, dtype=torch.float32)
    fine = torch.linspace(0, Tk - 1, 400)
    sigma = window / 2
    gauss = torch.exp(-(fine - p) ** 2 / (2 * sigma ** 2))

    fig, axes = plt.subplots(2, 1, figsize=(7.0, 4.6), sharex=True)
    axes[0].bar(s, w_glob[0, 0, 0], color="tab:blue")
    axes[0].set_ylabel("weight")
    axes[0].set_title("global: softmax over all 30 keys (sums to 1)", fontsize=9)
    axes[1].axvspan(p - window, p + window, color="tab:orange", alpha=0.12, label="window [p_t - D, p_t + D]")
    axes[1].plot(fine, gauss * w_local.max().item() / gauss.max(), "--", color="tab:orange",
                 label="Gaussian exp(-(s - p_t)^2 / 2 sigma^2), scaled")
    axes[1].bar(s, w_local[0, 0, 0], color="tab:green",
                label=f"local-p weights (sum {w_local.sum().item():.2f} < 1)")
    axes[1].axvline(p, color="k", lw=0.8)
    axes[1].set_ylim(0, axes[1].get_ylim()[1] * 1.45)  # room for the legend
    axes[1].set_title(f"local-p, D = {window}, sigma = D/2: only keys near the predicted p_t = {p:.1f} (black line)", fontsize=9)
    axes[1].set_xlabel("source position s")
    axes[1].set_ylabel("weight")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "multiplicative_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_relative_position(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: clip(j - i, -k, k) for T = 12, k = 3. Right: T5 bucket of j - i, defaults, both modes."""
    T, k = 12, 3
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    clipped = (j - i).clamp(-k, k)
    rel = torch.arange(-160, 161)
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.9))
    im = axes[0].imshow(clipped.numpy(), cmap="coolwarm", vmin=-k, vmax=k)
    for a in range(T):
        for b in range(T):
            axes[0].text(b, a, str(int(clipped[a, b])), ha="center", va="center", fontsize=6)
    axes[0].set_title(f"Shaw: r_ij = clip(j - i, -{k}, {k})", fontsize=9)
    axes[0].set_xlabel("key j")
    axes[0].set_ylabel("query i")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    for bidirectional, style in ((True, "-"), (False, "--")):
        buckets = t5_relative_position_bucket(rel, bidirectional=bidirectional)
        axes[1].step(rel.numpy(), buckets.numpy(), style, where="mid",
                     label=f"bidirectional={bidirectional}")
    for x in (-128, 128):
        axes[1].axvline(x, color="0.7", lw=0.6)
    axes[1].set_xlabel("relative position j - i")
    axes[1].set_ylabel("bucket")
    axes[1].set_title("T5 buckets (32 buckets, max_distance 128)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "relative_position.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_rotary_embedding(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: <R_m q, R_n k> for one (q, k) at every (m, n). Right: mean <R_m q, R_n q> against n - m."""
    torch.manual_seed(0)
    Dh, T = 64, 48
    rope = RotaryEmbedding(Dh, max_seq_len=4096)
    q = torch.randn(1, 1, 1, Dh).expand(1, 1, T, Dh)
    k = torch.randn(1, 1, 1, Dh).expand(1, 1, T, Dh)
    q_rot, k_rot = rope(q.contiguous(), k.contiguous())
    scores = (q_rot[0, 0] @ k_rot[0, 0].T).numpy()                  # (T, T): row m, column n

    n_vec, dist = 2000, 256
    v = torch.randn(n_vec, 1, 1, Dh).expand(n_vec, 1, dist, Dh).contiguous()
    v_rot, _ = rope(v, v)
    sims = (v_rot[:, 0, :1] * v_rot[:, 0]).sum(-1).mean(0) / Dh     # (dist,): mean <R_0 q, R_d q> / Dh

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8))
    im = axes[0].imshow(scores, cmap="coolwarm")
    axes[0].set_title("<R_m q, R_n k> for one q, k: constant along diagonals", fontsize=9)
    axes[0].set_xlabel("key position n")
    axes[0].set_ylabel("query position m")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].plot(range(dist), sims.numpy(), color="tab:blue")
    axes[1].axhline(0, color="0.6", lw=0.6)
    axes[1].set_xlabel("distance n - m")
    axes[1].set_ylabel("mean <R_m q, R_n q> / Dh")
    axes[1].set_title(f"a vector's match with itself fades with distance (Dh = {Dh})", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "rotary_embedding.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_scaled_dot_product_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Weights of 4 queries over 7 keys: PyTorch's top-left causal mask beside this file's bottom-right one."""
    torch.manual_seed(0)
    tq, tk = 4, 7
    q, k, v = torch.randn(1, 1, tq, 8), torch.randn(1, 1, tk, 8), torch.randn(1, 1, tk, 8)
    top_left = torch.ones(tq, tk, dtype=torch.bool).tril()  # what F.sdpa(is_causal=True) uses
    _, w_top_left = scaled_dot_product_attention(q, k, v, mask=top_left, need_weights=True)
    _, w_bottom_right = scaled_dot_product_attention(q, k, v, is_causal=True, need_weights=True)
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    titles = ("top-left (F.scaled_dot_product_attention's is_causal)\nquery i sees keys j <= i",
              "bottom-right (this project's is_causal)\nquery i sees keys j <= i + (Tk - Tq)")
    for ax, w, title in zip(axes, (w_top_left, w_bottom_right), titles):
        im = ax.imshow(_masked_in_grey(w[0, 0]), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks(range(tk))
        ax.set_yticks(range(tq))
    fig.colorbar(im, ax=axes, fraction=0.025)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scaled_dot_product_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_self_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """One untrained SelfAttention on one sequence of 8 tokens, under three masks."""
    torch.manual_seed(0)
    T, d_model = 8, 16
    attention = SelfAttention(d_model).eval()
    x = torch.randn(1, T, d_model) * 2.0  # a wider input spread gives sharper, easier-to-see weights
    padding = torch.ones(1, 1, 1, T, dtype=torch.bool)
    padding[..., 6:] = False
    cases = (("no mask", {}), ("padding: tokens 6, 7 masked\nmask shape (1, 1, 1, 8)", {"mask": padding}),
             ("is_causal=True", {"is_causal": True}))
    fig, axes = plt.subplots(1, 3, figsize=(10.0, 3.2))
    with torch.no_grad():
        for ax, (title, kwargs) in zip(axes, cases):
            _, w = attention(x, need_weights=True, **kwargs)
            im = ax.imshow(_masked_in_grey(w[0, 0]), cmap=CMAP, vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("key token j")
            if ax is axes[0]:
                ax.set_ylabel("query token i")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
    fig.colorbar(im, ax=axes, fraction=0.02)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "self_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_gated_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Train multi-head and gated attention on a task in which half the queries must return nothing.

    Each of T = 12 tokens carries an 8-d random payload and a flag. A flagged query must return the mean of
    the payloads up to itself (causal), an unflagged one the zero vector. Softmax weights sum to 1, so
    multi-head attention can return zero only by parking its weight on a token whose value is zero: an
    attention sink. The task is run without and with such a token (an extra first token, "BOS").
    Prints the measured losses, gates and sink weights that docs/mechanisms/gated_attention.md quotes.
    """
    D, H, T, P, steps = 16, 2, 12, 8, 1500

    def batch(n, g, sink):
        s = int(sink)
        x = torch.zeros(n, T + s, D)
        if sink:
            x[:, 0, P + 1] = 1.0  # the BOS token: only a marker, no payload
        x[:, s:, :P] = torch.randn(n, T, P, generator=g)
        flag = torch.rand(n, T, generator=g) < 0.5
        x[:, s:, P] = flag.float()
        mean = x[:, s:, :P].cumsum(1) / torch.arange(1, T + 1).view(1, T, 1)
        y = torch.zeros(n, T, D)
        y[..., :P] = mean * flag[..., None]
        return x, y, flag

    results, gates = {}, None
    for sink in (False, True):
        s = int(sink)
        for name, build in (("multi-head", lambda: MultiHeadAttention(D, H)), ("gated", lambda: GatedAttention(D, H))):
            torch.manual_seed(0)
            model = build()
            g = torch.Generator().manual_seed(0)
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            for _ in range(steps):
                x, y, _ = batch(64, g, sink)
                loss = (model(x, is_causal=True)[:, s:] - y).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            x, y, flag = batch(512, torch.Generator().manual_seed(123), sink)
            with torch.no_grad():
                out, weights = model(x, is_causal=True, need_weights=True)
                err = (out[:, s:] - y).pow(2).mean(-1)  # (n, T)
                row = {"mse_off": err[~flag].mean().item(), "mse_on": err[flag].mean().item()}
                if sink:
                    row["sink_off"] = weights[:, :, s:, 0].mean(1)[~flag].mean().item()
                if name == "gated":
                    gate = model.gate_scores(x)[:, :, s:].mean(dim=(1, 3))  # (n, T): mean gate of each query
                    row["gate_off"], row["gate_on"] = gate[~flag].mean().item(), gate[flag].mean().item()
                    if not sink:
                        gates = (gate[~flag].numpy(), gate[flag].numpy())
            results[(sink, name)] = row
            print(f"gated_attention: {'with' if sink else 'no'} BOS, {name}: "
                  + ", ".join(f"{k} {v:.2g}" for k, v in row.items()))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = ["no BOS\nmulti-head", "no BOS\ngated", "with BOS\nmulti-head", "with BOS\ngated"]
    keys = [(False, "multi-head"), (False, "gated"), (True, "multi-head"), (True, "gated")]
    xs = torch.arange(4).float()
    axes[0].bar(xs - 0.2, [results[k]["mse_off"] for k in keys], 0.4, label="unflagged queries (target 0)")
    axes[0].bar(xs + 0.2, [results[k]["mse_on"] for k in keys], 0.4, label="flagged queries (target mean)")
    axes[0].set_xticks(xs.tolist(), labels)
    axes[0].set_ylabel("test mean squared error")
    axes[0].set_title(f"after {steps} Adam steps")
    axes[0].legend(fontsize=8)
    axes[1].hist(gates[0], bins=30, range=(0, 1), alpha=0.7, label="unflagged queries")
    axes[1].hist(gates[1], bins=30, range=(0, 1), alpha=0.7, label="flagged queries")
    axes[1].set_xlabel("mean gate sigmoid(X W_g + b_g) of a query (no BOS)")
    axes[1].set_ylabel("queries")
    axes[1].set_title("the gate closes where the answer is 'nothing'")
    axes[1].legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gated_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_multi_head_latent_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: cache_table() (eq. (10)) for DeepSeek-V2's shape. Right: causal weights of head 0 (naive path) and the
    largest difference between the naive full recompute and absorbed token-by-token decoding."""
    rows = mla_cache_table(num_kv_heads=8, bytes_per_element=2)
    torch.manual_seed(0)
    T, d_model = 12, 32
    mla = MultiHeadLatentAttention(d_model, num_heads=4, kv_latent_dim=12, q_latent_dim=16, rope_dim=4).eval()
    x = torch.randn(1, T, d_model)
    with torch.no_grad():
        full, weights = mla(x, is_causal=True, need_weights=True)
        cache, outs = None, []
        for t in range(T):
            out, cache = mla.step(x[:, t:t + 1], cache, absorbed=True)
            outs.append(out)
    diff = (torch.cat(outs, dim=1) - full).abs().max().item()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    colors = ["0.6", "tab:blue", "tab:orange", "tab:green"]
    left.bar([r["kind"] for r in rows], [r["bytes_per_token"] / 1024 for r in rows], color=colors)
    for i, r in enumerate(rows):
        left.text(i, r["bytes_per_token"] / 1024 * 1.15, f"{r['bytes_per_token'] / 1024:.1f} KiB", ha="center",
                  fontsize=8)
    left.set_yscale("log")
    left.set_ylim(10, 12000)
    left.set_ylabel("KV cache per token, KiB (60 layers, 16-bit)")
    left.set_title("DeepSeek-V2 shape: H = 128, Dh = 128, d_c = 512, d_R = 64\n(GQA: 8 kv heads)", fontsize=9)
    im = right.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0)
    right.set_title(f"head 0, naive path (causal)\nmax |absorbed cached decoding - naive| = {diff:.1e}", fontsize=9)
    right.set_xlabel("key j")
    right.set_ylabel("query i")
    fig.colorbar(im, ax=right, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "multi_head_latent_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _dictionary_lookup(version: str, k: int = 6, width: int = 32, steps: int = 600, batch: int = 64):
    """Brody et al.'s DictionaryLookup: k key nodes (attribute, value) -> k query nodes (attribute).

    Every key node sends an edge to every query node; a query must output the value of the key with its
    attribute. Trains embeddings, one single-head GraphAttention layer and a linear read-out with Adam
    (learning rate decaying linearly to 0, so the end point is settled).
    Returns (training accuracy per step, accuracy on 1000 fresh graphs, alpha of one fresh graph (k, k)).
    """
    torch.manual_seed(0)
    attr, val = torch.nn.Embedding(k, width), torch.nn.Embedding(k + 1, width)  # value k = "no value" (queries)
    layer = GraphAttention(width, 1, version=version, add_self_loops=False)
    head = torch.nn.Linear(width, k)
    params = [*attr.parameters(), *val.parameters(), *layer.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # to 0: a settled end point
    adjacency = torch.zeros(2 * k, 2 * k, dtype=torch.bool)
    adjacency[k:, :k] = True  # query node k + i attends to the k key nodes

    def sample(n):
        values = torch.stack([torch.randperm(k) for _ in range(n)])  # key i has attribute i and value values[i]
        asked = torch.stack([torch.randperm(k) for _ in range(n)])  # query i asks for attribute asked[i]
        keys = attr(torch.arange(k).expand(n, k)) + val(values)  # (n, k, width)
        queries = attr(asked) + val(torch.full_like(asked, k))  # (n, k, width)
        x = torch.cat([keys, queries], 1)  # (n, 2k, width): nodes 0..k-1 keys, k..2k-1 queries
        return x, values.gather(1, asked), asked

    def predict(x):
        out, alpha = layer(x, adjacency, need_weights=True)
        return head(torch.relu(out[:, k:])), alpha[:, 0, k:, :k]

    accuracy = []
    for _ in range(steps):
        x, target, _ = sample(batch)
        logits, _ = predict(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, k), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        accuracy.append((logits.argmax(-1) == target).float().mean().item())
    with torch.no_grad():
        x, target, asked = sample(1000)
        logits, alpha = predict(x)
        test_accuracy = (logits.argmax(-1) == target).float().mean().item()
        order = asked[0].argsort()  # rows in attribute order: the right key of row a is key a
    return accuracy, test_accuracy, alpha[0, order]


def figure_graph_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """DictionaryLookup (k = 6) trained with GAT and with GATv2: accuracy curves and one graph's weights."""
    k = 6
    fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.9), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    for version, colour, ax in (("gat", "tab:red", axes[1]), ("gatv2", "tab:blue", axes[2])):
        accuracy, test_accuracy, alpha = _dictionary_lookup(version, k=k)
        smooth = torch.tensor(accuracy).unfold(0, 20, 1).mean(1)
        axes[0].plot(range(20, len(accuracy) + 1), smooth, color=colour,
                     label=f"{version.upper()}: {test_accuracy:.1%} on 1000 new graphs")
        print(f"graph_attention: DictionaryLookup k={k}, {version}: accuracy on 1000 new graphs {test_accuracy:.3f}")
        ax.imshow(alpha.numpy(), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(f"{version.upper()}: alpha of one graph", fontsize=9)
        ax.set_xlabel("key node (attribute)")
        ax.set_ylabel("query node, by the attribute it asks for")
    axes[0].axhline(1 / k, color="0.5", ls="--", lw=1, label=f"chance 1/k = {1 / k:.1%}")
    axes[0].set_xlabel("training step (batch of 64 graphs)")
    axes[0].set_ylabel("training accuracy (mean of 20 steps)")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "graph_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_hybrid_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: the Taylor kernel 1 + s + s^2/2 against exp(s). Right: causal weights (head 0) of one untrained
    HybridAttention: the window branch alone, and the mixture with the global linear branch."""
    torch.manual_seed(0)
    T, w, d_model = 16, 3, 16
    x = torch.randn(1, T, d_model)
    hybrid = HybridAttention(d_model, num_heads=2, window=w, feature_dim=4).eval()
    window_only = HybridAttention(d_model, num_heads=2, window=w, linear_branch=False).eval()
    window_only.load_state_dict(hybrid.state_dict(), strict=False)
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.8))
    s = torch.linspace(-3, 3, 200)
    axes[0].plot(s, s.exp(), label="exp(s)")
    axes[0].plot(s, 1 + s + s * s / 2, label="1 + s + s²/2 = φ(a)·φ(b)")
    axes[0].set_ylim(0, 10)
    axes[0].set_xlabel("s = a·b")
    axes[0].set_title("Taylor kernel of the linear branch", fontsize=9)
    axes[0].legend(fontsize=8)
    for ax, module, title in ((axes[1], window_only, f"window branch alone (w = {w})"),
                              (axes[2], hybrid, "hybrid: (window + linear) / 2")):
        with torch.no_grad():
            _, weights = module(x, is_causal=True, need_weights=True)
        im = ax.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0, vmax=weights[0, 0].max().item())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "hybrid_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_dual_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Train one dual-attention block to mark the tokens that occur twice; plot r_ij and both kinds of heads.

    Each sequence holds 8 tokens drawn from 6; the label of position i is whether x_i occurs at another
    position too, a question about a relation (equality), not about any token's identity. One
    DualAttnEncoderBlock (2 sensory + 2 relational heads, 2 symmetric relations, positional symbols) and a
    linear read-out are trained with Adam for 300 steps of 128 sequences (seconds on a CPU).
    """
    torch.manual_seed(0)
    vocab, T, d_model, batch = 6, 8, 32, 128
    embed = torch.nn.Embedding(vocab, d_model)
    symbols = PositionalSymbolRetriever(d_model, T)
    block = DualAttnEncoderBlock(d_model, n_heads_sa=2, n_heads_ra=2, dff=64, activation="gelu", dropout_rate=0.0,
                                 norm_first=True, ra_kwargs=dict(n_relations=2, symmetric_rels=True))
    head = torch.nn.Linear(d_model, 2)
    modules = torch.nn.ModuleList([embed, symbols, block, head])
    opt = torch.optim.Adam(modules.parameters(), lr=3e-3)

    def batch_of(n, generator=None):
        x = torch.randint(0, vocab, (n, T), generator=generator)
        repeated = (x[:, :, None] == x[:, None, :]).sum(-1) > 1  # (n, T): x_i occurs at another position
        return x, repeated.long()

    def logits_of(x):
        h = embed(x)
        return head(block(h, symbols(h)))

    for _ in range(300):
        x, y = batch_of(batch)
        loss = torch.nn.functional.cross_entropy(logits_of(x).reshape(-1, 2), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    modules.eval()
    with torch.no_grad():
        x, y = batch_of(2000, torch.Generator().manual_seed(1))
        accuracy = (logits_of(x).argmax(-1) == y).float().mean().item()
        x = torch.tensor([[3, 1, 4, 1, 5, 0, 2, 3]])
        h = embed(x)
        _, sa_weights, (ra_weights, relations) = block.dual_attn(block.norm1(h), symbols(h), need_weights=True)
    labels = [str(t) for t in x[0].tolist()]
    bound = relations[0, :, :, 0].abs().max().item()
    panels = ((relations[0, :, :, 0], "relation r_ij[0] (symmetric_rels=True)", "RdBu_r", -bound, bound),
              (sa_weights[0, 0], "sensory head 0: weights alpha_ij", CMAP, 0, 1),
              (ra_weights[0, 0], "relational head 0: weights alpha_ij", CMAP, 0, 1))
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.6), layout="constrained")
    for ax, (values, title, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(values.numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(T), labels)
        ax.set_yticks(range(T), labels)
        ax.set_xlabel("key token x_j")
        if ax is axes[0]:
            ax.set_ylabel("query token x_i")
    fig.suptitle(f"one DualAttnEncoderBlock trained to find repeated tokens (held-out accuracy {accuracy:.3f})",
                 fontsize=10)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "dual_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_flash_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: the tiles a causal, padded flash_attention computes, T = 40, tiles 8 x 8. Right: the running
    log-sum-exp of four queries after each key tile, against the exact value."""
    torch.manual_seed(0)
    T, block, Dh = 40, 8, 16
    n = T // block
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0))
    # Left: tile (i, j) is skipped above the diagonal, partly masked on it, full below; padding hides the last keys.
    length = 34  # real tokens; keys 34..39 are padding
    grid = torch.zeros(T, T)
    for i in range(T):
        for j in range(T):
            tile_skipped = j // block > i // block
            grid[i, j] = 0 if tile_skipped else (2 if (j <= i and j < length) else 1)
    cmap = matplotlib.colors.ListedColormap(["white", "0.8", "tab:blue"])
    axes[0].imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=2)
    for edge in range(block, T, block):
        axes[0].axhline(edge - 0.5, color="k", lw=0.8)
        axes[0].axvline(edge - 0.5, color="k", lw=0.8)
    axes[0].set_title(f"causal + padding (length {length}): {n * (n + 1) // 2} of {n * n} tiles computed\n"
                      "blue: attended, grey: masked inside a computed tile, white: tile skipped", fontsize=8)
    axes[0].set_xlabel("key j")
    axes[0].set_ylabel("query i")
    # Right: L after the first j key tiles (flash_attention on the prefix) converges to the exact log-sum-exp.
    q, k, v = (torch.randn(1, 1, T, Dh) for _ in range(3))
    rows = [3, 15, 27, 39]
    steps = list(range(1, n + 1))
    for row, color in zip(rows, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        running = []
        for j in steps:
            _, lse = flash_attention(q[:, :, row:row + 1], k[:, :, :j * block], v[:, :, :j * block],
                                     block_size_q=1, block_size_k=block, return_lse=True)
            running.append(lse[0, 0, 0].item())
        exact = torch.logsumexp(q[0, 0, row] @ k[0, 0].T / Dh ** 0.5, dim=-1).item()
        axes[1].plot(steps, running, "o-", color=color, label=f"query {row}")
        axes[1].axhline(exact, color=color, ls=":", lw=1)
    axes[1].set_xlabel("key tiles seen")
    axes[1].set_ylabel("running log-sum-exp  m + log l")
    axes[1].set_title("online softmax: after the last tile it is exact (dotted)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "flash_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_longformer_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Dense weights (head 0) of LongformerAttention, T = 24, window 2, global tokens 0 and 13; symmetric and
    causal, with the block grid of the banded computation (blocks of b = window)."""
    torch.manual_seed(0)
    T, w, d_model = 24, 2, 16
    x = torch.randn(1, T, d_model)
    glob = torch.zeros(1, T, dtype=torch.bool)
    glob[0, [0, 13]] = True
    attn = LongformerAttention(d_model, num_heads=2, window=w).eval()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.2))
    for ax, causal in zip(axes, (False, True)):
        with torch.no_grad():
            _, weights = attn(x, is_causal=causal, need_weights=True, global_mask=glob)
        im = ax.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0)
        for edge in range(w, T, w):
            ax.axhline(edge - 0.5, color="white", lw=0.3)
            ax.axvline(edge - 0.5, color="white", lw=0.3)
        kind = "causal" if causal else "symmetric"
        ax.set_title(f"{kind}: band |i-j| <= {w}, global tokens 0 and 13", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "longformer_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_sparse_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """The four maps from scores to weights: in two dimensions, on one row of 16 scores, and their support size.

    Prints the mean number of non-zero weights among 16 keys for scores drawn from N(0, sigma^2), the table
    on docs/mechanisms/sparse_attention.md.
    """
    maps = {"softmax": lambda s: torch.softmax(s, dim=-1), "top-k (k=4)": lambda s: topk_softmax(s, 4),
            "1.5-entmax": entmax15, "sparsemax": sparsemax}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    t = torch.linspace(-3, 3, 301, dtype=torch.float64)
    z2 = torch.stack([t, torch.zeros_like(t)], dim=-1)
    two_d = {name if name != "top-k (k=4)" else "top-k (k=1)": f for name, f in maps.items()}
    two_d["top-k (k=1)"] = lambda s: topk_softmax(s, 1)
    for i, (name, f) in enumerate(two_d.items()):  # colour i is the same map in every panel
        axes[0].plot(t.numpy(), f(z2)[:, 0].numpy(), label=name, color=f"C{i}")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("weight of the first of two keys")
    axes[0].set_title("scores (t, 0)")
    axes[0].legend(fontsize=8)

    g = torch.Generator().manual_seed(0)
    row = torch.randn(16, generator=g, dtype=torch.float64) * 1.5
    order = row.argsort(descending=True)
    width = 0.2
    for i, (name, f) in enumerate(maps.items()):
        axes[1].bar(torch.arange(16).numpy() + (i - 1.5) * width, f(row)[order].numpy(), width, label=name,
                    color=f"C{i}")
    axes[1].set_xlabel("key, sorted by score (scores ~ N(0, 1.5^2))")
    axes[1].set_ylabel("weight")
    axes[1].set_title("one query, 16 keys")
    axes[1].legend(fontsize=8)

    sigmas = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    scores = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    print("sparse_attention: mean number of non-zero weights among 16 keys, scores ~ N(0, sigma^2), 4000 rows")
    print("sparse_attention: sigma | " + " | ".join(maps))
    for i, (name, f) in enumerate(maps.items()):
        sizes = [(f(scores * s) > 0).sum(-1).double().mean().item() for s in sigmas]
        axes[2].plot(sigmas, sizes, marker="o", label=name, color=f"C{i}")
    for s in sigmas:
        cells = [f"{(f(scores * s) > 0).sum(-1).double().mean().item():.2f}" for f in maps.values()]
        print(f"sparse_attention: {s} | " + " | ".join(cells))
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("score scale sigma")
    axes[2].set_ylabel("mean non-zero weights (of 16)")
    axes[2].set_title("support size")
    axes[2].legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sparse_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_axial_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Which input pixels one output pixel of an untrained AxialAttention depends on (|gradient|, 8 x 8
    image): after the row pass, after both passes, and both passes in causal mode; then score counts."""
    torch.manual_seed(0)
    size, pixel = 8, (4, 3)
    layer = AxialAttention(16, 2).eval()
    x = torch.randn(1, size, size, 16)

    def reach(after_rows_only, is_causal):
        image = x.clone().requires_grad_(True)
        if after_rows_only:
            rows, _ = layer.row_attn(image.reshape(size, size, 16), None, is_causal, False)  # the row pass alone
            out = rows.view(1, size, size, 16)
        else:
            out = layer(image, is_causal=is_causal)
        out[0, pixel[0], pixel[1]].pow(2).sum().backward()
        grad = image.grad[0].norm(dim=-1)
        return grad.masked_fill(grad == 0, float("nan")).numpy()  # unreachable pixels in grey

    fig, axes = plt.subplots(1, 4, figsize=(13.0, 3.4))
    panels = (("row pass only", True, False), ("rows, then columns", False, False),
              ("rows, then columns, causal", False, True))
    for ax, (title, rows_only, causal) in zip(axes, panels):
        ax.imshow(reach(rows_only, causal), cmap=CMAP)
        ax.scatter([pixel[1]], [pixel[0]], marker="x", color="red", s=40)
        ax.set_title(f"{title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    sides = [4, 8, 16, 32, 64, 128, 256]
    counts = [attention_score_counts(n, n) for n in sides]
    axes[3].loglog(sides, [c["full"] for c in counts], "o-", color="0.5", label="full: (HW)^2")
    axes[3].loglog(sides, [c["axial"] for c in counts], "o-", color="tab:blue", label="axial: HW(H + W)")
    axes[3].set_xlabel("image side n (n x n pixels)")
    axes[3].set_ylabel("attention scores per head")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "axial_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_linear_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Causal weights of softmax and linear attention with the same projections, and the chunkwise split."""
    torch.manual_seed(0)
    T, d_model, chunk = 16, 16, 4
    attn = LinearAttention(d_model, num_heads=2, chunk_size=chunk).eval()
    x = torch.randn(1, T, d_model)
    with torch.no_grad():
        _, linear = attn(x, is_causal=True, need_weights=True)
        q = attn.q_proj(x).view(1, T, 2, -1).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, 2, -1).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1) / (d_model // 2) ** 0.5).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        softmax = torch.softmax(scores, dim=-1)
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 4.0))
    vmax = max(softmax[0, 0].max().item(), linear[0, 0].max().item())
    for ax, weights, title in ((axes[0], softmax, "softmax: exp(q.k / sqrt(Dh))"),
                               (axes[1], linear, "linear: phi(q).phi(k), phi = elu + 1")):
        im = ax.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0, vmax=vmax)
        ax.set_title(f"{title}\n(same projections, head 0, causal)", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    part = torch.full((T, T), float("nan"))
    for i in range(T):
        for j in range(i + 1):
            part[i, j] = 1.0 if i // chunk == j // chunk else 0.0
    axes[2].imshow(part.numpy(), cmap=matplotlib.colors.ListedColormap(["tab:orange", "tab:blue"]).with_extremes(
        bad="0.85"), vmin=0, vmax=1)
    for edge in range(chunk, T, chunk):
        axes[2].axhline(edge - 0.5, color="k", lw=0.6)
        axes[2].axvline(edge - 0.5, color="k", lw=0.6)
    axes[2].set_title(f"chunkwise form, chunks of {chunk}: blue = intra-chunk matrix,\n"
                      "orange = through the state S of earlier chunks", fontsize=9)
    axes[2].set_xlabel("key j")
    axes[2].set_ylabel("query i")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "linear_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_sparse_transformer_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """The strided and fixed patterns of sparse_transformer_masks, T = 24, l = 4 (fixed: c = 1): A1, A2, both."""
    from matplotlib.colors import ListedColormap

    T, stride = 24, 4
    colors = ListedColormap(["0.92", "tab:blue", "tab:orange", "tab:green"])
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.4))
    for ax, pattern in zip(axes, ("strided", "fixed")):
        a1, a2 = sparse_transformer_masks(T, pattern, stride, num_summary=1)
        code = a1.int() + 2 * a2.int()  # 0 none, 1 A1, 2 A2, 3 both
        ax.imshow(code.numpy(), cmap=colors, vmin=0, vmax=3)
        keys = (a1 | a2).sum(-1).float().mean().item()
        ax.set_title(f"{pattern}, l = {stride}" + (", c = 1" if pattern == "fixed" else "")
                     + f": {keys:.1f} keys per query\n(full causal: {(T + 1) / 2:.1f})", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(k)) for k in (1, 2, 3)]
    fig.legend(handles, ["A1 only", "A2 only", "A1 and A2"], loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sparse_transformer_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_retention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: the decay gamma_h^(n-m) of each of 8 heads against distance. Middle and right: the decay matrix D of
    the fastest and the slowest head over T = 128 tokens (grey: future, always 0)."""
    heads, T = 8, 128
    gammas = retention_decays(heads)
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.8))
    distance = torch.arange(0, 512)
    for h, gamma in enumerate(gammas.tolist()):
        axes[0].plot(distance.numpy(), (gamma ** distance.double()).numpy(), label=f"h={h}: gamma={gamma:.4f}")
    axes[0].set(xlabel="distance n - m", ylabel="gamma^(n - m)", title="one decay per head: 1 - 2^(-5-h)")
    axes[0].legend(fontsize=6)
    decay = decay_matrix(gammas, T)  # (H, T, T)
    for ax, h in zip(axes[1:], (0, heads - 1)):
        im = ax.imshow(_masked_in_grey(decay[h].float()), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(f"decay matrix D, head {h} (gamma = {gammas[h].item():.4f})", fontsize=9)
        ax.set_xlabel("key m")
        ax.set_ylabel("query n")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "retention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_adaptive_span(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Learn the spans of four heads on a task whose two halves need 3 and 10 tokens of context.

    Each of T = 24 tokens is a random vector; the target of position t is, in its first 8 channels, the mean
    of the first 8 channels of tokens t-2..t, and in its last 8 channels the mean over tokens t-9..t. One
    AdaptiveSpanAttention layer (max_span 32, ramp 2, every span starting at 0, penalty 1e-3 / H * sum z)
    is trained with Adam for 1000 steps. Prints the learned spans quoted on docs/mechanisms/adaptive_span.md.
    """
    D, H, T, P, short, long, steps, penalty = 16, 4, 24, 8, 3, 10, 1000, 1e-3

    def batch(n, g):
        x = torch.randn(n, T, D, generator=g)
        total = x[..., :P].cumsum(1)

        def window(w):  # mean of the last w tokens' first P channels, position t included
            before = torch.cat([torch.zeros(n, w, P), total[:, :-w]], dim=1)
            return (total - before) / w

        return x, torch.cat([window(short), window(long)], dim=-1)

    torch.manual_seed(0)
    attn = AdaptiveSpanAttention(D, H, max_span=32, ramp=2, init_span=0.0)
    opt = torch.optim.Adam(attn.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(steps):
        x, y = batch(32, g)
        loss = (attn(x) - y)[:, long:].pow(2).mean()  # positions with a full window of context
        opt.zero_grad()
        (loss + penalty / H * attn.span_penalty()).backward()
        opt.step()
        attn.clamp_span_()
        history.append(attn.spans().tolist())
    x, y = batch(512, torch.Generator().manual_seed(123))
    with torch.no_grad():
        test_loss = (attn(x) - y)[:, long:].pow(2).mean().item()
    spans = attn.spans().tolist()
    print(f"adaptive_span: learned spans {', '.join(f'{z:.2f}' for z in spans)} tokens (max_span 32, ramp 2); "
          f"cache_length {attn.cache_length()}; test MSE {test_loss:.4f}")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    history = torch.tensor(history)
    for h in range(H):
        axes[0].plot(history[:, h].numpy(), label=f"head {h}")
    for w in (short, long):
        axes[0].axhline(w - 1, color="0.5", linestyle=":", linewidth=1)
    axes[0].set_xlabel("Adam step")
    axes[0].set_ylabel("span z_h (tokens)")
    axes[0].set_title("spans, starting at 0 (dotted: the windows' far ends, 2 and 9 back)")
    axes[0].legend(fontsize=8)
    distance = torch.arange(0, 16, dtype=torch.float32)
    with torch.no_grad():
        masks = soft_span_mask(distance[None, :], attn.spans()[:, None], attn.ramp)  # (H, 16)
    width = 0.2
    for h in range(H):
        axes[1].bar(distance.numpy() + (h - 1.5) * width, masks[h].numpy(), width, label=f"head {h}")
    axes[1].set_xlabel("distance x = i - j (tokens back)")
    axes[1].set_ylabel("soft mask m_z(x)")
    axes[1].set_title("learned masks")
    axes[1].legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "adaptive_span.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_bidirectional_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Weights (head 0) of one untrained layer on 6 tokens: BERT's bidirectional attention, causal attention,
    and XLNet's content and query streams for the factorization order 2, 4, 0, 3, 1, 5."""
    torch.manual_seed(0)
    T, d_model = 6, 16
    x = torch.randn(1, T, d_model)
    bert = BidirectionalSelfAttention(d_model, num_heads=2).eval()
    xlnet = TwoStreamAttention(d_model, num_heads=2).eval()
    xlnet.load_state_dict({**bert.state_dict(), "mask_emb": xlnet.mask_emb.detach()})
    order = torch.tensor([2, 4, 0, 3, 1, 5])
    with torch.no_grad():
        panels = [(bert(x, need_weights=True)[1], "BERT: bidirectional"),
                  (bert(x, is_causal=True, need_weights=True)[1], "GPT: causal (is_causal=True)")]
        _, (content, query) = xlnet(x, order=order, need_weights=True)
    panels += [(content, "XLNet content stream, order 2,4,0,3,1,5"),
               (query, "XLNet query stream (own token hidden)")]
    fig, axes = plt.subplots(1, 4, figsize=(15.0, 3.8))
    for ax, (weights, title) in zip(axes, panels):
        im = ax.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
    fig.colorbar(im, ax=axes.tolist(), fraction=0.015)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bidirectional_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_memory_augmented_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Head 0 of an untrained MemoryAugmentedAttention(16, 2, num_persistent=4, top_k=3): the causal local
    weights over the 4 persistent slots and 10 tokens, and which of 24 stored memory entries (two earlier
    segments) each query retrieves, with the softmax weight over its top 3."""
    torch.manual_seed(0)
    layer = MemoryAugmentedAttention(16, 2, num_persistent=4, top_k=3).eval()
    segments = torch.randn(3, 1, 12, 16)
    keys, values = zip(*(layer.memory_entries(s) for s in segments[:2]))
    memory = (torch.cat(keys, 2), torch.cat(values, 2))  # (1, 2, 24, 8)
    x = segments[2][:, :10]
    with torch.no_grad():
        _, local = layer(x, is_causal=True, need_weights=True)  # (1, 2, 10, 4 + 10)
        q = layer.q_proj(x).view(1, 10, 2, 8).transpose(1, 2)
        scores, _, idx = knn_lookup(q, *memory, top_k=3)
        retrieved = torch.zeros(1, 2, 10, 24).scatter(-1, idx, torch.softmax(scores, dim=-1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.6), gridspec_kw={"width_ratios": [14, 24]})
    left.imshow(_masked_in_grey(local[0, 0]), cmap=CMAP, vmin=0)
    left.axvline(3.5, color="white", lw=2)
    left.set_xticks(range(14), [f"P{i}" for i in range(4)] + [str(j) for j in range(10)], fontsize=7)
    left.set_xlabel("persistent slots | tokens of this segment (causal)")
    left.set_ylabel("query")
    left.set_title("local branch: weights, head 0", fontsize=9)
    right.imshow(_masked_in_grey(retrieved[0, 0]), cmap=CMAP, vmin=0)
    right.axvline(11.5, color="white", lw=2)
    right.set_xlabel("memory entry (segment 1 | segment 2)")
    right.set_title("kNN branch: the top 3 entries each query retrieves, and their weights", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "memory_augmented_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_sigmoid_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: causal weights of one head under softmax and sigmoid (same weights). Right: the mean row sum of the
    sigmoid weights against the number of keys n, with the paper's b = -log n and with b = 0."""
    torch.manual_seed(0)
    T, d_model = 12, 16
    attn = SigmoidAttention(d_model, num_heads=2).eval()
    x = torch.randn(1, T, d_model)
    with torch.no_grad():
        _, sig = attn(x, is_causal=True, need_weights=True)
        q = attn.q_proj(x).view(1, T, 2, -1).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, 2, -1).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1) / (d_model // 2) ** 0.5).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        soft = torch.softmax(scores, dim=-1)
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.8))
    for ax, weights, title in ((axes[0], soft, "softmax (rows sum to 1)"),
                               (axes[1], sig, "sigmoid, b = -log T (rows do not)")):
        im = ax.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0)
        ax.set_title(f"{title}, head 0, causal", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ns = [4, 16, 64, 256, 1024]
    for attn_bias, label in ((None, "b = -log n (paper)"), (0.0, "b = 0")):
        layer = SigmoidAttention(d_model, num_heads=2, attn_bias=attn_bias).eval()
        layer.load_state_dict(attn.state_dict())
        sums = []
        with torch.no_grad():
            for n in ns:
                _, w = layer(torch.randn(1, 8, d_model), torch.randn(1, n, d_model), need_weights=True)
                sums.append(w.sum(-1).mean().item())
        axes[2].plot(ns, sums, "o-", label=label)
    axes[2].set(xscale="log", yscale="log", xlabel="number of keys n", ylabel="mean row sum of the weights",
                title="the bias keeps the total weight near 1")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sigmoid_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_bigbird_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: the block layout of BigBirdAttention for T = 48, blocks of 4, by kind (window, global, random).
    Right: the dense weights of head 0 of an untrained module with that layout."""
    from matplotlib.colors import ListedColormap

    T, block, d_model = 48, 4, 16
    attn = BigBirdAttention(d_model, num_heads=2, block_size=block, num_window_blocks=3, num_global_blocks=1,
                            num_random_blocks=2, seed=0).eval()
    layout, random = attn.layout(T)
    n = layout.size(0)
    blocks = torch.arange(n)
    kind = torch.zeros(n, n, dtype=torch.long)  # 0 none, 1 window, 2 global, 3 random
    kind[layout] = 3
    kind[(blocks[:, None] - blocks[None, :]).abs() <= 1] = 1
    kind[:1, :] = 2
    kind[:, :1] = 2
    tokens = torch.arange(T) // block
    kind_tokens = kind[tokens[:, None], tokens[None, :]]
    torch.manual_seed(0)
    x = torch.randn(1, T, d_model)
    with torch.no_grad():
        _, weights = attn(x, need_weights=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.4))
    colors = ListedColormap(["0.92", "tab:blue", "tab:orange", "tab:green"])
    left.imshow(kind_tokens.numpy(), cmap=colors, vmin=0, vmax=3)
    left.set_title(f"layout: blocks of {block}, window 3 blocks, 1 global, 2 random\n"
                   f"{layout.float().mean().item():.0%} of the (T, T) pairs", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(k)) for k in (1, 2, 3)]
    left.legend(handles, ["window", "global", "random"], fontsize=7, loc="upper right")
    im = right.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0)
    right.set_title("weights of head 0 (untrained)", fontsize=9)
    fig.colorbar(im, ax=right, fraction=0.046)
    for ax in (left, right):
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bigbird_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_frequency_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: FNet's fixed token-mixing matrix, the cosine part C_T of the DFT (T = 16). Middle: the token-mixing
    matrix of a GlobalFilter set to a low-pass filter (gain 1 for frequencies <= 2, else 0), found by feeding it
    unit vectors. Right: that filter applied to a noisy signal."""
    T = 16
    with torch.no_grad():
        eye = torch.eye(T).unsqueeze(-1)  # (T, T, 1): token s is a unit impulse
        # FNet on one channel (d = 1, where F_d = 1): column s of Re(F_T) is the response to token s
        fnet_matrix = FNetMixing(1)(eye).squeeze(-1).T  # (T, T): [t, s] = weight of token s in output t
        low_pass = GlobalFilter(1, T)
        low_pass.complex_weight.zero_()
        low_pass.complex_weight[:3, :, 0] = 1.0  # keep frequencies 0, 1, 2
        gf_matrix = low_pass(eye).squeeze(-1).T  # (T, T): circulant
        t = torch.arange(T, dtype=torch.float32)
        clean = torch.sin(2 * torch.pi * t / T) + 0.5 * torch.cos(4 * torch.pi * t / T)
        noisy = clean + 0.4 * torch.randn(T, generator=torch.Generator().manual_seed(0))
        smooth = low_pass(noisy.view(1, T, 1)).view(T)
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.8))
    for ax, matrix, title in ((axes[0], fnet_matrix, "FNet: Re(F_T), fixed for every input"),
                              (axes[1], gf_matrix, "GlobalFilter (low-pass): circulant")):
        lim = matrix.abs().max().item()
        im = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("input token s")
        ax.set_ylabel("output token t")
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[2].plot(t, noisy, "o", ms=3, color="0.6", label="noisy input")
    axes[2].plot(t, clean, "--", color="0.3", label="clean signal")
    axes[2].plot(t, smooth, color="C1", label="GlobalFilter output")
    axes[2].set_xlabel("token t")
    axes[2].set_title("the low-pass filter on one channel", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "frequency_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_adversarial_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: rise of a loss when the scores of an untrained AdversarialAttention(16, 2) move by epsilon along
    g / ||g|| or along 20 random unit directions, with the first-order line epsilon * ||g||. Right: head 0's
    weights for one sequence, clean and with the adversarial perturbation at epsilon = 2."""
    torch.manual_seed(0)
    batch, seq, heads = 1, 8, 2
    layer = AdversarialAttention(16, heads).double().train()
    x, target = torch.randn(batch, seq, 16, dtype=torch.float64), torch.randn(batch, seq, 16, dtype=torch.float64)

    def loss_at(r):
        return ((layer(x, is_causal=True, score_perturbation=r) - target) ** 2).mean()

    zero = torch.zeros(batch, heads, seq, seq, dtype=torch.float64, requires_grad=True)
    clean = loss_at(zero)
    (g,) = torch.autograd.grad(clean, zero)
    unit_adv = g / g.norm()
    directions = [torch.randn_like(g).tril() for _ in range(20)]  # random, on the visible (causal) scores
    directions = [d / d.norm() for d in directions]
    epsilons = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    with torch.no_grad():
        adv_rise = [(loss_at(e * unit_adv) - clean).item() for e in epsilons]
        random_rise = [[(loss_at(e * d) - clean).item() for d in directions] for e in epsilons]
        _, clean_w = layer(x, is_causal=True, need_weights=True, score_perturbation=zero)
        _, adv_w = layer(x, is_causal=True, need_weights=True, score_perturbation=2.0 * unit_adv)
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.0), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    axes[0].loglog(epsilons, adv_rise, "o-", color="tab:red", label="adversarial: along g / ||g||")
    axes[0].loglog(epsilons, [e * g.norm().item() for e in epsilons], "--", color="0.4", label="first order: eps ||g||")
    best_random = [max(r) for r in random_rise]
    axes[0].loglog(epsilons, [max(b, 1e-12) for b in best_random], "s-", color="tab:blue",
                   label="best of 20 random directions")
    axes[0].set_xlabel("epsilon (L2 size of the score perturbation)")
    axes[0].set_ylabel("loss rise")
    axes[0].legend(fontsize=8)
    print(f"adversarial_attention: clean loss {clean.item():.4f}, ||g|| = {g.norm().item():.4f}; rise at "
          + ", ".join(f"eps={e}: adversarial {a:.4g} / best random {b:.4g}" for e, a, b in
                      zip(epsilons, adv_rise, best_random)))
    for ax, w, title in ((axes[1], clean_w, "clean weights, head 0"),
                         (axes[2], adv_w, "adversarial, epsilon = 2, head 0")):
        ax.imshow(_masked_in_grey(w[0, 0]), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "adversarial_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_differential_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """The two softmax maps of one untrained head, their difference, and the lambda_init schedule over depth."""
    torch.manual_seed(0)
    T, d_model = 12, 16
    attn = DifferentialAttention(d_model, num_heads=2, layer_index=2).eval()
    x = torch.randn(1, T, d_model)
    with torch.no_grad():
        _, diff = attn(x, is_causal=True, need_weights=True)
        q = attn.q_proj(x).view(1, T, 4, -1).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, 4, -1).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1) / attn.head_dim ** 0.5).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        maps = torch.softmax(scores, dim=-1)  # (1, 4, T, T): head 0 uses maps 0 and 1
        lam = attn.lambda_value().item()
    fig, axes = plt.subplots(1, 4, figsize=(15.5, 3.6))
    for ax, weights, title, cmap, lim in (
            (axes[0], maps[0, 0], "softmax 1 (half 1 of head 0)", CMAP, (0, 1)),
            (axes[1], maps[0, 1], "softmax 2 (half 2 of head 0)", CMAP, (0, 1)),
            (axes[2], diff[0, 0], f"softmax 1 - lambda softmax 2 (lambda = {lam:.2f})", "RdBu_r", (-0.6, 0.6))):
        shown = weights.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("nan")).numpy()
        im = ax.imshow(shown, cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    depth = list(range(0, 24))
    axes[3].plot(depth, [lambda_init_schedule(l) for l in depth], "o-", ms=3)
    axes[3].set(xlabel="layer index l (0-based)", ylabel="lambda_init", title="0.8 - 0.6 exp(-0.3 l)")
    axes[3].grid(alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "differential_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_convolutional_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """One layer of multi-head vs convolutional attention on an induction task: predict what followed last time.

    Each sequence is 8 distinct random tokens (of 16) repeated once; at every position of the repeat the
    target is the token that followed the current token in the first half. A one-layer model (embedding,
    causal attention, linear read-out, no position information) must find the earlier key whose PREVIOUS
    token equals the query's token. Prints the test accuracies quoted on docs/mechanisms/convolutional_attention.md.
    """
    V, L, D, H, steps = 16, 8, 32, 2, 500

    def batch(n, g):
        first = torch.rand(n, V, generator=g).argsort(dim=-1)[:, :L]  # 8 distinct tokens per sequence
        return torch.cat([first, first], dim=1), torch.cat([first[:, 1:], first[:, :1]], dim=1)

    class OneLayer(torch.nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.embed, self.attn, self.read = torch.nn.Embedding(V, D), attn, torch.nn.Linear(D, V)

        def forward(self, tokens, need_weights=False):
            out = self.attn(self.embed(tokens), is_causal=True, need_weights=need_weights)
            return (self.read(out[0]), out[1]) if need_weights else self.read(out)

    curves, models, accuracy = {}, {}, {}
    for name, build in (("multi-head attention", lambda: MultiHeadAttention(D, H)),
                        ("convolutional attention", lambda: ConvolutionalAttention(D, H, kernel_size=3))):
        torch.manual_seed(0)
        model = OneLayer(build())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        curves[name] = []
        for _ in range(steps):
            tokens, target = batch(64, g)
            loss = torch.nn.functional.cross_entropy(model(tokens)[:, L:].reshape(-1, V), target.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curves[name].append(loss.item())
        tokens, target = batch(1000, torch.Generator().manual_seed(1))
        with torch.no_grad():
            accuracy[name] = (model(tokens)[:, L:].argmax(-1) == target).float().mean().item()
        models[name] = model.eval()
        print(f"convolutional_attention: {name}: test accuracy {accuracy[name]:.3f} on the repeated half "
              f"(1000 sequences), final training loss {curves[name][-1]:.3f}")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, curve in curves.items():
        axes[0].plot(curve, label=f"{name} (test accuracy {accuracy[name]:.0%})")
    axes[0].axhline(torch.log(torch.tensor(float(V))).item(), color="0.5", linestyle=":", linewidth=1)
    axes[0].set_xlabel("Adam step")
    axes[0].set_ylabel("cross-entropy on the repeated half")
    axes[0].set_title("one layer, no positions (dotted: uniform guess)")
    axes[0].legend(fontsize=8)
    tokens, _ = batch(1, torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, weights = models["convolutional attention"](tokens, need_weights=True)
    head = weights[0].amax(dim=0)  # (T, T): the larger of the two heads' weights
    im = axes[1].imshow(_masked_in_grey(head), cmap=CMAP, vmin=0, vmax=1)
    labels = [str(t) for t in tokens[0].tolist()]
    axes[1].set_xticks(range(2 * L), labels)
    axes[1].set_yticks(range(2 * L), labels)
    axes[1].set_xlabel("key (token)")
    axes[1].set_ylabel("query (token)")
    axes[1].set_title("convolutional attention: max over heads")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "convolutional_attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_linformer(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Weights of head 0 of an untrained LinformerAttention on 32 tokens: left k = n = T with E = F = I (ordinary
    (T, T) attention, the limit case), right k = 8 (weights over the 8 projected key rows)."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 16)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    limit = LinformerAttention(16, num_heads=2, max_seq_len=32, proj_dim=32).eval()
    with torch.no_grad():
        limit.e_proj.copy_(torch.eye(32))
        limit.f_proj.copy_(torch.eye(32))
        _, weights = limit(x, need_weights=True)
    im = left.imshow(weights[0, 0].numpy(), cmap="viridis", aspect="auto", vmin=0)
    left.set_xlabel("key j")
    left.set_ylabel("query i (T = 32)")
    left.set_title("k = n = T, E = F = I: ordinary attention, (T, T)", fontsize=9)
    fig.colorbar(im, ax=left, fraction=0.046)
    attn = LinformerAttention(16, num_heads=2, max_seq_len=32, proj_dim=8).eval()
    with torch.no_grad():
        _, weights = attn(x, need_weights=True)
    im = right.imshow(weights[0, 0].numpy(), cmap="viridis", aspect="auto", vmin=0)
    right.set_xlabel("projected key row r (k = 8)")
    right.set_ylabel("query i (T = 32)")
    right.set_title("Linformer weights, head 0: (T, k), not (T, T)", fontsize=9)
    fig.colorbar(im, ax=right, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "linformer.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _co_attention_task(n: int, generator: torch.Generator, words: int = 5, regions: int = 6):
    """Questions of 5 words: noise words 0-7 and one colour word 8 + c (4 colours). Images of 6 regions, each a
    (colour, value) pair; exactly one region has the asked colour c. The answer is that region's value (0-4).
    Returns (question ids, region colours, region values, answers, index of the answering region)."""
    every = torch.arange(n)
    question = torch.randint(0, 8, (n, words), generator=generator)
    asked = torch.randint(0, 4, (n,), generator=generator)
    question[every, torch.randint(0, words, (n,), generator=generator)] = 8 + asked
    other = torch.randint(0, 3, (n, regions), generator=generator)
    colours = other + (other >= asked[:, None]).long()  # any colour but the asked one ...
    target = torch.randint(0, regions, (n,), generator=generator)
    colours[every, target] = asked  # ... except in one region
    values = torch.randint(0, 5, (n, regions), generator=generator)
    return question, colours, values, values[every, target], target


def figure_co_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Train co-attention (both modes) and two independent attention poolings (parallel mode with W_b frozen at
    0) on _co_attention_task: embeddings (width 16), CoAttention(16, 16), a linear classifier on
    (question summary | image summary); Adam, learning rate 0.01, batch 64, 300 steps, seed 0. Left: test
    accuracy. Middle and right: the trained parallel model's affinity C and both modes' attention over the
    regions of one test example."""
    test = _co_attention_task(1000, torch.Generator().manual_seed(1))
    curves, readers = {}, {}
    for name, mode, frozen in (("parallel", "parallel", False), ("alternating", "alternating", False),
                               ("independent poolings (W_b = 0)", "parallel", True)):
        torch.manual_seed(0)
        words, colour_emb, value_emb = (torch.nn.Embedding(n, 16) for n in (12, 4, 5))
        co, head = CoAttention(16, 16, mode=mode), torch.nn.Linear(32, 5)
        if frozen:
            with torch.no_grad():
                co.W_b.zero_()
            co.W_b.requires_grad_(False)
        modules = (words, colour_emb, value_emb, co, head)
        opt = torch.optim.Adam([p for m in modules for p in m.parameters() if p.requires_grad], lr=1e-2)

        def read(question, colours, values, co=co, words=words, colour_emb=colour_emb, value_emb=value_emb):
            return co(words(question), colour_emb(colours) + value_emb(values), need_weights=True)

        generator, curve = torch.Generator().manual_seed(0), []
        for step in range(301):
            if step % 25 == 0:
                with torch.no_grad():
                    accuracy = (head(torch.cat(read(*test[:3])[0], -1)).argmax(-1) == test[3]).float().mean().item()
                curve.append((step, accuracy))
            if step == 300:
                break
            question, colours, values, answer, _ = _co_attention_task(64, generator)
            loss = torch.nn.functional.cross_entropy(head(torch.cat(read(question, colours, values)[0], -1)), answer)
            opt.zero_grad()
            loss.backward()
            opt.step()
        curves[name], readers[name] = curve, (read, co, words, colour_emb, value_emb)
        print(f"co_attention figure: {name}: test accuracy {curve[-1][1]:.3f} after 300 steps")
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 3.8), gridspec_kw={"width_ratios": [1.2, 1.3, 1]})
    for name, curve in curves.items():
        axes[0].plot(*zip(*curve), marker="o", ms=3, label=name)
    axes[0].axhline(0.2, color="0.6", ls=":", label="chance")
    axes[0].set_xlabel("training step (batch 64)")
    axes[0].set_ylabel("test accuracy (1000 examples)")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    axes[0].set_title("answer = value of the region of the asked colour", fontsize=9)
    example = [t[:1] for t in test]
    read, co, words, colour_emb, value_emb = readers["parallel"]
    with torch.no_grad():
        affinity = torch.tanh(words(example[0]) @ co.W_b @ (colour_emb(example[1]) + value_emb(example[2]))
                              .transpose(1, 2))[0]
        _, (_, a_parallel) = read(*example[:3])
        _, (_, a_alternating) = readers["alternating"][0](*example[:3])
    word_names = [f"colour {int(w) - 8}" if w >= 8 else f"noise {int(w)}" for w in example[0][0]]
    region_names = [f"c{int(c)}, v{int(v)}" for c, v in zip(example[1][0], example[2][0])]
    im = axes[1].imshow(affinity.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    axes[1].set_yticks(range(len(word_names)), word_names, fontsize=8)
    axes[1].set_xticks(range(len(region_names)), region_names, fontsize=8, rotation=30)
    axes[1].set_title("trained parallel: affinity C (word x region)", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.03)
    pos = torch.arange(len(region_names))
    axes[2].bar(pos - 0.19, a_parallel[0], 0.38, label="parallel")
    axes[2].bar(pos + 0.19, a_alternating[0], 0.38, label="alternating")
    axes[2].set_xticks(pos.tolist(), region_names, fontsize=8, rotation=30)
    axes[2].set_ylabel("attention over the regions, a_v")
    axes[2].set_title(f"region {int(example[4][0])} has the asked colour", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "co_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_performer(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """RMS error of PerformerAttention against exact softmax attention, and of the kernel estimate against
    exp(x . y), against the number of features m, orthogonal and i.i.d., with fitted log-log slopes."""
    torch.manual_seed(0)
    d_model, T, seeds = 16, 16, 60
    counts = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    x = torch.randn(1, T, d_model, dtype=torch.float64) * 0.5
    base = PerformerAttention(d_model, num_heads=1).double().eval()
    with torch.no_grad():
        for layer in (base.q_proj, base.k_proj):  # moderate scores, as in the test
            layer.weight.mul_(0.5)
            layer.bias.mul_(0.5)
        q, k, v = base.q_proj(x), base.k_proj(x), base.v_proj(x)
        exact = base.out_proj(torch.softmax(q @ k.transpose(-2, -1) / d_model ** 0.5, dim=-1) @ v)
    g = torch.Generator().manual_seed(1)
    kx = torch.randn(256, d_model, dtype=torch.float64, generator=g) * 0.25
    ky = torch.randn(256, d_model, dtype=torch.float64, generator=g) * 0.25
    kernel = (kx * ky).sum(-1).exp()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for orthogonal, color in ((True, "tab:blue"), (False, "tab:orange")):
        out_err, ker_err = [], []
        for m in counts:
            layer = PerformerAttention(d_model, 1, num_features=m, orthogonal=orthogonal).double().eval()
            layer.load_state_dict({**base.state_dict(), "projection": layer.projection})
            sq, ksq = [], []
            with torch.no_grad():
                for _ in range(seeds):
                    layer.redraw_features(g)
                    sq.append((layer(x) - exact).pow(2).mean())
                    w = layer.projection
                    ksq.append(((positive_random_features(kx, w) * positive_random_features(ky, w)).sum(-1)
                                - kernel).pow(2).mean())
            out_err.append(torch.stack(sq).mean().sqrt().item())
            ker_err.append(torch.stack(ksq).mean().sqrt().item())
        name = "orthogonal (FAVOR+)" if orthogonal else "i.i.d."
        for ax, errors in ((axes[0], out_err), (axes[1], ker_err)):
            logm, loge = torch.tensor(counts).double().log(), torch.tensor(errors).log()
            slope = (((logm - logm.mean()) * (loge - loge.mean())).sum() / ((logm - logm.mean()) ** 2).sum()).item()
            ax.plot(counts, errors, "o-", color=color, label=f"{name}: slope {slope:.2f}")
    for ax, title in ((axes[0], "output vs exact softmax attention"), (axes[1], "kernel estimate vs exp(x . y)")):
        ax.set(xscale="log", yscale="log", xlabel="number of random features m", ylabel="RMS error",
               title=f"{title}\n({seeds} draws per point; slope -1/2 = error ~ 1/sqrt(m))")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "performer.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_attention_distillation(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """MiniLM in miniature: a student with heads 4 wide, trained only on attention_distillation_loss, learns
    the attention of a fixed random teacher with heads 16 wide (2 heads, 10 tokens, 20-word vocabulary).
    Left: the attention KL (L_AT) on 256 held-out sequences. Right: head 0 of one held-out sequence."""
    torch.manual_seed(0)
    d_model, heads, vocab, length, steps = 16, 2, 20, 10, 300
    embed, pos = torch.randn(vocab, d_model), 0.5 * torch.randn(length, d_model)
    teacher = [0.6 * torch.randn(d_model, heads * 16) for _ in range(3)]  # W^Q, W^K, W^V of the teacher
    student = [torch.nn.Linear(d_model, heads * 4) for _ in range(3)]
    params = [p for m in student for p in m.parameters()]

    def split(x, width):
        return x.view(x.size(0), length, heads, width).transpose(1, 2)  # (B, H, T, width)

    def relations(x):
        return [split(x @ w, 16) for w in teacher], [split(m(x), 4) for m in student]

    def attention(q, k):
        return torch.softmax(q @ k.transpose(-2, -1) / q.size(-1) ** 0.5, dim=-1)

    held_out = embed[torch.randint(vocab, (256, length), generator=torch.Generator().manual_seed(1))] + pos

    def measure():
        with torch.no_grad():
            t, s = relations(held_out)
            kl = attention_distillation_loss(*s, *t, value_relation=False).item()
            agree = (attention(*t[:2]).argmax(-1) == attention(*s[:2]).argmax(-1)).float().mean().item()
            return kl, agree, attention(*s[:2])[0, 0]

    curve = [(0, *measure()[:2])]
    _, _, before_map = measure()
    for step in range(1, steps + 1):
        t, s = relations(embed[torch.randint(vocab, (32, length))] + pos)
        grads = torch.autograd.grad(attention_distillation_loss(*s, *t), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= g  # plain gradient descent, learning rate 1
        if step % 10 == 0:
            curve.append((step, *measure()[:2]))
    _, _, after_map = measure()
    with torch.no_grad():
        teacher_map = attention(*relations(held_out)[0][:2])[0, 0]
    print(f"attention_distillation: held-out attention KL {curve[0][1]:.3f} -> {curve[-1][1]:.3f} after {steps} "
          f"steps; rows whose favourite key matches the teacher's {curve[0][2]:.1%} -> {curve[-1][2]:.1%}")
    fig, axes = plt.subplots(1, 4, figsize=(13.0, 3.5), gridspec_kw={"width_ratios": [1.5, 1, 1, 1]})
    axes[0].plot([c[0] for c in curve], [c[1] for c in curve], color="tab:blue", label="L_AT (KL), held out")
    twin = axes[0].twinx()
    twin.plot([c[0] for c in curve], [c[2] for c in curve], color="tab:orange", label="same favourite key")
    twin.set_ylim(0, 1)
    twin.set_ylabel("rows with the teacher's favourite key", color="tab:orange")
    axes[0].set_xlabel("training step (batch of 32)")
    axes[0].set_ylabel("attention KL(teacher || student)", color="tab:blue")
    for ax, w, title in ((axes[1], teacher_map, "teacher (heads 16 wide)"),
                         (axes[2], before_map, "student before"), (axes[3], after_map, "student after")):
        ax.imshow(w.numpy(), cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "attention_distillation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_transformer_xl(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Train one Transformer-XL layer, with and without a memory, to output the token 8 positions back.

    A stream of random tokens (16 symbols) is cut into segments of 8, so every target lies in the PREVIOUS
    segment: only the memory can reach it. One layer (embedding, TransformerXLAttention with d = 32, H = 2,
    linear read-out) is trained with Adam on pairs of segments, the loss on the second. Tested on streams of
    four segments, each segment reading the memory left by the one before. Prints the accuracies quoted on
    docs/mechanisms/transformer_xl.md.
    """
    V, S, D, H, steps = 16, 8, 32, 2, 400

    class OneLayer(torch.nn.Module):
        def __init__(self, mem_len):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.attn = TransformerXLAttention(D, H, mem_len=mem_len)
            self.read = torch.nn.Linear(D, V)

        def forward(self, tokens, memory=None, need_weights=False):
            result = self.attn(self.embed(tokens), memory=memory, need_weights=need_weights)
            return (self.read(result[0]),) + tuple(result[1:])

    results, weights = {}, None
    for mem_len in (0, S):
        torch.manual_seed(0)
        model = OneLayer(mem_len)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            stream = torch.randint(0, V, (64, 2 * S), generator=g)
            _, memory = model(stream[:, :S])
            logits, _ = model(stream[:, S:], memory)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), stream[:, :S].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        stream = torch.randint(0, V, (500, 4 * S), generator=torch.Generator().manual_seed(1))
        correct, memory = [], None
        with torch.no_grad():
            for s in range(4):
                segment = stream[:, s * S:(s + 1) * S]
                logits, memory, w = model(segment, memory, need_weights=True)
                if s > 0:
                    correct.append((logits.argmax(-1) == stream[:, (s - 1) * S:s * S]).float().mean().item())
                if s == 2 and mem_len:
                    weights = w[0].amax(dim=0)  # (S, mem + S), the larger of the two heads
        results[mem_len] = correct
        print(f"transformer_xl: mem_len {mem_len}: accuracy on segments 2, 3, 4 of 500 test streams "
              + ", ".join(f"{c:.3f}" for c in correct))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = torch.arange(3).float()
    for offset, mem_len in ((-0.2, 0), (0.2, S)):
        axes[0].bar((xs + offset).numpy(), results[mem_len], 0.4, label=f"mem_len = {mem_len}")
    axes[0].axhline(1 / V, color="0.5", linestyle=":", linewidth=1)
    axes[0].set_xticks(xs.tolist(), ["segment 2", "segment 3", "segment 4"])
    axes[0].set_ylabel("accuracy (target: token 8 back)")
    axes[0].set_title("every target is in the previous segment (dotted: chance)")
    axes[0].legend(fontsize=8)
    im = axes[1].imshow(_masked_in_grey(weights), cmap=CMAP, vmin=0, vmax=1)
    axes[1].axvline(S - 0.5, color="white", linewidth=1)
    axes[1].set_xlabel("key: memory (0-7) | current segment (8-15)")
    axes[1].set_ylabel("query in segment 3")
    axes[1].set_title("mem_len = 8: weights, max over heads")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "transformer_xl.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]


def figure_nystromformer(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: mean |Nystrom - softmax attention| against the number of landmarks m (T = 64, untrained weights,
    exact pseudo-inverse and Newton-Schulz). Right: the iteration's error against torch.linalg.pinv per step."""
    torch.manual_seed(0)
    T, d_model, heads = 64, 32, 2
    x = torch.randn(2, T, d_model, dtype=torch.float64)
    exact = NystromAttention(d_model, heads, num_landmarks=T, pinv_iterations=None).double().eval()
    with torch.no_grad():
        reference = exact(x)  # m = T with the exact pseudo-inverse: softmax attention itself
        ms = [2, 4, 8, 16, 32, 64]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
        for iterations, style in ((None, "o-"), (6, "s--"), (12, "^:")):
            errors = []
            for m in ms:
                model = NystromAttention(d_model, heads, num_landmarks=m, pinv_iterations=iterations).double().eval()
                model.load_state_dict(exact.state_dict())
                errors.append((model(x) - reference).abs().mean().item() + 1e-17)
            label = "exact pinv" if iterations is None else f"{iterations} Newton-Schulz steps"
            left.plot(ms, errors, style, label=label)
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.set_xlabel("landmarks m (T = 64)")
        left.set_ylabel("mean |output - softmax attention|")
        left.set_title("untrained weights, random inputs: exact only at m = T", fontsize=9)
        left.legend(fontsize=8)
        g = torch.Generator().manual_seed(0)
        for spread in (0.5, 1.0, 2.0):
            a = torch.softmax(torch.randn(16, 16, generator=g, dtype=torch.float64) * spread, dim=-1)
            target = torch.linalg.pinv(a)
            steps = list(range(0, 21))
            err = [(newton_schulz_pinv(a, s) - target).abs().max().item() / target.abs().max().item() + 1e-17
                   for s in steps]
            right.plot(steps, err, label=f"A = softmax(16 x 16 scores, std {spread})")
        right.set_yscale("log")
        right.set_xlabel("Newton-Schulz steps")
        right.set_ylabel("max |Z - pinv(A)| / max |pinv(A)|")
        right.set_title("the iteration against torch.linalg.pinv", fontsize=9)
        right.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "nystromformer.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _han_task(n: int, generator: torch.Generator, sentences: int = 4, words: int = 6):
    """Documents of noise words (ids 0-9); every sentence holds one class word (10, 11 or 12) and one sentence
    also the marker word 13. The label is the class word of the marked sentence: finding it needs the
    sentence structure. Returns (documents (n, S, W) ids, labels (n,), index of the marked sentence (n,))."""
    docs = torch.randint(0, 10, (n, sentences, words), generator=generator)
    rows, sent, every = torch.arange(n)[:, None], torch.arange(sentences)[None, :], torch.arange(n)
    slot = torch.rand(n, sentences, words, generator=generator).argsort(-1)  # two distinct random slots
    classes = torch.randint(0, 3, (n, sentences), generator=generator)
    docs[rows, sent, slot[..., 0]] = 10 + classes
    marked = torch.randint(0, sentences, (n,), generator=generator)
    docs[every, marked, slot[every, marked, 1]] = 13
    return docs, classes[every, marked], marked


def figure_hierarchical_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Train HAN (embedding, HierarchicalAttention, linear classifier) for 400 Adam steps on _han_task, and the
    same model reading each document as ONE sentence of all its words (flat attention pooling, the module's
    one-sentence case). Left: test accuracy. Right: HAN's effective word weights on one test document."""
    test_docs, test_labels, test_marked = _han_task(1000, torch.Generator().manual_seed(1))
    curves, models = {}, {}
    for name, flat in (("hierarchical (HAN)", False), ("flat: one sentence of all words", True)):
        torch.manual_seed(0)
        emb, han, head = torch.nn.Embedding(14, 16), HierarchicalAttention(16, 16), torch.nn.Linear(16, 3)
        opt = torch.optim.Adam([*emb.parameters(), *han.parameters(), *head.parameters()], lr=1e-2)
        generator, curve = torch.Generator().manual_seed(0), []

        def read(ids, flat=flat, emb=emb, han=han):
            x = emb(ids)  # (B, S, W, d)
            return han(x.flatten(1, 2).unsqueeze(1) if flat else x, need_weights=True)

        for step in range(401):
            if step % 25 == 0:
                with torch.no_grad():
                    accuracy = (head(read(test_docs)[0]).argmax(-1) == test_labels).float().mean().item()
                curve.append((step, accuracy))
            if step == 400:
                break
            docs, labels, _ = _han_task(64, generator)
            loss = torch.nn.functional.cross_entropy(head(read(docs)[0]), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        curves[name], models[name] = curve, read
        print(f"hierarchical_attention figure: {name}: test accuracy {curve[-1][1]:.3f} after 400 steps")
    with torch.no_grad():
        _, (alpha, beta) = models["hierarchical (HAN)"](test_docs)
    on_marked = beta[torch.arange(1000), test_marked].mean().item()
    print(f"hierarchical_attention figure: mean sentence weight on the marked sentence {on_marked:.3f}")
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.8))
    for name, curve in curves.items():
        axes[0].plot(*zip(*curve), marker="o", ms=3, label=name)
    axes[0].axhline(1 / 3, color="0.6", ls=":", label="chance")
    axes[0].set_xlabel("training step (batch 64)")
    axes[0].set_ylabel("test accuracy (1000 documents)")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    axes[0].set_title("label = class word of the sentence with the marker", fontsize=9)
    effective = effective_word_weights(alpha, beta)[0]  # (S, W)
    im = axes[1].imshow(effective.numpy(), cmap="viridis", vmin=0)
    for i in range(test_docs.size(1)):
        for j in range(test_docs.size(2)):
            token = test_docs[0, i, j]
            word = {10: "A", 11: "B", 12: "C", 13: "*"}.get(int(token), str(int(token)))
            axes[1].text(j, i, word, ha="center", va="center", color="w" if effective[i, j] < 0.3 else "k",
                         fontsize=9)
    axes[1].set_yticks(range(effective.size(0)), [f"s{i}: beta={beta[0, i]:.2f}" for i in range(effective.size(0))])
    axes[1].set_xlabel("word position (digits: noise; A, B, C: class words; *: marker)")
    axes[1].set_title(f"HAN's weight of each word (beta_i alpha_it), label {'ABC'[test_labels[0]]}", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.03)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "hierarchical_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def figure_reformer_attention(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Left: mean |Reformer - full shared-QK attention| against hash rounds (T = 64, 8 buckets, chunks of 8, three
    hash seeds). Right: the dense weights of head 0 with 8 buckets, 2 rounds, chunks of 4 (T = 32)."""
    torch.manual_seed(0)
    T, d_model, heads = 64, 32, 2
    x = torch.randn(1, T, d_model)
    full = ReformerAttention(d_model, heads, num_buckets=1, num_hashes=1, chunk_size=T).eval()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    rounds = [1, 2, 4, 8, 16]
    with torch.no_grad():
        reference = full(x)
        for seed in range(3):
            errors = []
            for r in rounds:
                lsh = ReformerAttention(d_model, heads, num_buckets=8, num_hashes=r, chunk_size=8, seed=seed).eval()
                lsh.load_state_dict(full.state_dict())
                errors.append((lsh(x) - reference).abs().mean().item())
            left.plot(rounds, errors, "o-", label=f"hash seed {seed}")
        small = ReformerAttention(d_model, heads, num_buckets=8, num_hashes=2, chunk_size=4).eval()
        small.load_state_dict(full.state_dict())
        _, weights = small(x[:, :32], need_weights=True)
    left.set_xscale("log", base=2)
    left.set_xlabel("hash rounds n_h")
    left.set_ylabel("mean |Reformer - full shared-QK attention|")
    left.set_title("T = 64, 8 buckets, chunks of 8", fontsize=9)
    left.legend(fontsize=8)
    im = right.imshow(_masked_in_grey(weights[0, 0]), cmap=CMAP, vmin=0)
    right.set_title("head 0: pairs found by 2 rounds (8 buckets, chunks of 4)", fontsize=9)
    right.set_xlabel("key j")
    right.set_ylabel("query i")
    fig.colorbar(im, ax=right, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reformer_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


FIGURES = {
    "reformer_attention": figure_reformer_attention,
    "hierarchical_attention": figure_hierarchical_attention,
    "nystromformer": figure_nystromformer,
    "performer": figure_performer,
    "co_attention": figure_co_attention,
    "linformer": figure_linformer,
    "differential_attention": figure_differential_attention,
    "frequency_attention": figure_frequency_attention,
    "bigbird_attention": figure_bigbird_attention,
    "sigmoid_attention": figure_sigmoid_attention,
    "bidirectional_attention": figure_bidirectional_attention,
    "retention": figure_retention,
    "sparse_transformer_attention": figure_sparse_transformer_attention,
    "linear_attention": figure_linear_attention,
    "longformer_attention": figure_longformer_attention,
    "flash_attention": figure_flash_attention,
    "hybrid_attention": figure_hybrid_attention,
    "multi_head_latent_attention": figure_multi_head_latent_attention,
    "adaptive_span": figure_adaptive_span,
    "additive_attention": figure_additive_attention,
    "adversarial_attention": figure_adversarial_attention,
    "alibi": figure_alibi,
    "axial_attention": figure_axial_attention,
    "attention_distillation": figure_attention_distillation,
    "attention_pooling": figure_attention_pooling,
    "convolutional_attention": figure_convolutional_attention,
    "cross_attention": figure_cross_attention,
    "dual_attention": figure_dual_attention,
    "gated_attention": figure_gated_attention,
    "graph_attention": figure_graph_attention,
    "grouped_query_attention": figure_grouped_query_attention,
    "hard_attention": figure_hard_attention,
    "local_attention": figure_local_attention,
    "memory_augmented_attention": figure_memory_augmented_attention,
    "multi_head_attention": figure_multi_head_attention,
    "multiplicative_attention": figure_multiplicative_attention,
    "relative_position": figure_relative_position,
    "rotary_embedding": figure_rotary_embedding,
    "scaled_dot_product_attention": figure_scaled_dot_product_attention,
    "self_attention": figure_self_attention,
    "sparse_attention": figure_sparse_attention,
    "transformer_xl": figure_transformer_xl,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stems", nargs="*", metavar="STEM",
                        help=f"which figures to draw (default: all of {', '.join(sorted(FIGURES))})")
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.stems) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; expected some of {', '.join(sorted(FIGURES))}")
    for stem in args.stems or sorted(FIGURES):
        for path in FIGURES[stem](args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
