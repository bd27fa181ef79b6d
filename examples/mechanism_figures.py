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

from mechanisms.additive_attention import AdditiveAttention
from mechanisms.alibi import alibi_bias, alibi_slopes
from mechanisms.attention_pooling import nadaraya_watson
from mechanisms.cross_attention import CrossAttention
from mechanisms.grouped_query_attention import kv_cache_table
from mechanisms.hard_attention import gumbel_noise, straight_through_gumbel
from mechanisms.local_attention import LocalAttention
from mechanisms.multi_head_attention import MultiHeadAttention
from mechanisms.multiplicative_attention import LuongAttention
from mechanisms.relative_position import t5_relative_position_bucket
from mechanisms.rotary_embedding import RotaryEmbedding
from mechanisms.scaled_dot_product_attention import scaled_dot_product_attention
from mechanisms.self_attention import SelfAttention

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


FIGURES = {
    "additive_attention": figure_additive_attention,
    "alibi": figure_alibi,
    "attention_pooling": figure_attention_pooling,
    "cross_attention": figure_cross_attention,
    "grouped_query_attention": figure_grouped_query_attention,
    "hard_attention": figure_hard_attention,
    "local_attention": figure_local_attention,
    "multi_head_attention": figure_multi_head_attention,
    "multiplicative_attention": figure_multiplicative_attention,
    "relative_position": figure_relative_position,
    "rotary_embedding": figure_rotary_embedding,
    "scaled_dot_product_attention": figure_scaled_dot_product_attention,
    "self_attention": figure_self_attention,
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
