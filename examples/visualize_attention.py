#!/usr/bin/env python
"""Look inside a trained character model: every head's attention, and attention rollout.

    python examples/visualize_attention.py --checkpoint runs/char_lm/ckpt.pt --prompt "def __init__(self):"

Writes under ``--out`` (default: the checkpoint's folder):

* ``attention_heads.png``: one heatmap per layer (rows) and head (columns), queries down, keys across,
  over the characters of the prompt (causal, so each upper triangle is empty).
* ``attention_rollout.png``: attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
  Transformers", arXiv:2005.00928) for the last position: how much each input character contributes to
  the representation from which the next character is predicted, as bars over the prompt, plus the
  rollout after each layer as a heat strip.
* ``attention_layers.png``: the head-averaged attention of the last position at each layer.
* ``attention.json``: the predicted next character, the rollout and the per-layer rows as numbers.

Rollout: a residual block computes x + Attention(x), so half of each position's output is "itself". For
every layer average the heads, A_l = mean_h W_{l,h} (T x T); add the identity for the residual and
renormalise the rows, Â_l = (A_l + I) / rowsum; then compose the layers, R = Â_L ... Â_2 Â_1 (the first
layer acts first, so it multiplies on the right). Row t of R spreads position t's final representation
over the input tokens. It ignores the MLPs, the norms and the values, so it is an explanation by flow,
not an exact attribution.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformer_implementation import Transformer  # noqa: E402


def attention_rollout(weights, add_residual: bool = True) -> torch.Tensor:
    """Rollout of per-layer attention. ``weights[l]`` is (H, T, T) or already head-averaged (T, T).

    Returns the (L, T, T) stack of partial rollouts: entry l is Â_l ... Â_1, so entry -1 is R."""
    if not weights:
        raise ValueError("weights must hold at least one layer, got an empty list")
    rollout, out = None, []
    for l, w in enumerate(weights):
        w = torch.as_tensor(w, dtype=torch.float64)
        if w.dim() == 3:
            w = w.mean(dim=0)  # (T, T): average the heads
        if w.dim() != 2 or w.shape[0] != w.shape[1]:
            raise ValueError(f"weights[{l}] must be (H, T, T) or (T, T), got {tuple(w.shape)}")
        if add_residual:
            w = w + torch.eye(w.shape[0], dtype=w.dtype)  # (T, T): the residual path
        w = w / w.sum(dim=-1, keepdim=True)  # (T, T): rows sum to 1 again
        rollout = w if rollout is None else w @ rollout  # (T, T): later layers multiply on the left
        out.append(rollout)
    return torch.stack(out)  # (L, T, T)


def load_checkpoint(path: Path):
    """Model and vocabulary from a ``train_char_lm.py`` checkpoint, opened with the core's ``Transformer.load``
    (the vocabulary is the checkpoint's ``extra["vocab"]``). Anything else, a checkpoint an older
    train_char_lm.py wrote included, ends the program with a one-line error saying what the file holds."""
    if not path.is_file():
        sys.exit(f"error: --checkpoint {path}: no such file")
    try:
        model, extra = Transformer.load(path, map_location="cpu", return_extra=True)  # in eval mode
    except ValueError as exc:  # another layout: the core's message says which and what to do
        sys.exit(f"error: --checkpoint {path}: {exc}")
    except Exception as exc:  # a torn or foreign file: say so in one line
        sys.exit(f"error: --checkpoint {path}: cannot be read as a checkpoint ({type(exc).__name__})")
    if not isinstance(extra, dict) or "vocab" not in extra:
        sys.exit(f"error: --checkpoint {path}: a Transformer checkpoint without a vocabulary (extra['vocab']); "
                 "not one written by examples/train_char_lm.py")
    return model, extra["vocab"]


def _gpt2_inputs(folder: Path, prompt: str):
    """GPT-2 from a local folder: (model, token strings, ids (1, T), id -> text list-like)."""
    from gpt2_tokenizer import GPT2Tokenizer
    if not folder.is_dir():
        sys.exit(f"error: --gpt2-dir {folder}: no such folder")
    try:
        tokenizer = GPT2Tokenizer.from_folder(folder)
        model = Transformer.from_gpt2(folder)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: --gpt2-dir {folder}: {exc}")
    token_ids = tokenizer.encode(prompt)
    if len(token_ids) > model.max_seq_length:
        print(f"note: prompt cropped to its last {model.max_seq_length} tokens (the model's context)")
        token_ids = token_ids[-model.max_seq_length:]

    class _Names:  # vocab[i] -> the text of token i, as the char-LM path's vocabulary list gives it
        def __getitem__(self, i):
            return tokenizer.decode([i])

        def __len__(self):
            return len(tokenizer.encoder)

    return model, tokenizer.readable(token_ids), torch.tensor([token_ids], dtype=torch.long), _Names()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Attention heads and attention rollout of a trained char LM.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=Path("runs/char_lm/ckpt.pt"),
                        help="a checkpoint written by examples/train_char_lm.py")
    source.add_argument("--gpt2-dir", type=Path, default=None, metavar="DIR",
                        help="instead, a GPT-2 folder in the Hugging Face layout (config.json, model.safetensors or "
                             "pytorch_model.bin, vocab.json, merges.txt), read from disk with Transformer.from_gpt2")
    p.add_argument("--prompt", default="def __init__(self):\n        self.", help="the text whose attention is shown")
    p.add_argument("--out", type=Path, default=None, help="output folder; by default the checkpoint's folder (or the --gpt2-dir folder)")
    p.add_argument("--prefix", default="attention", help="file name prefix of the outputs")
    p.add_argument("--export-json", type=Path, default=None, metavar="FILE",
                   help="also write every layer's and head's attention and the rollout for the docs' attention "
                        "explorer: FILE with suffix .json, and the same wrapped as .js (see docs/explorer.md)")
    args = p.parse_args(argv)

    if not args.prompt:
        sys.exit("error: --prompt is empty")
    if args.gpt2_dir is not None:
        model, tokens, ids, vocab = _gpt2_inputs(args.gpt2_dir, args.prompt)
        prompt = "".join(tokens)
        source_name = str(args.gpt2_dir)
    else:
        model, vocab = load_checkpoint(args.checkpoint)
        stoi = {c: i for i, c in enumerate(vocab)}
        unknown = sorted({c for c in args.prompt if c not in stoi})
        if unknown:
            sys.exit(f"error: --prompt has characters the model never saw: {''.join(unknown)!r}")
        prompt = args.prompt
        if len(prompt) > model.max_seq_length:
            print(f"note: prompt cropped to its last {model.max_seq_length} characters (the model's context)")
            prompt = prompt[-model.max_seq_length:]
        tokens = list(prompt)
        ids = torch.tensor([[stoi[c] for c in prompt]], dtype=torch.long)  # (1, T)
        source_name = str(args.checkpoint)
    with torch.no_grad():
        logits, attention = model(ids, return_attention=True)  # (1, T, V), L x (1, H, T, T)
    per_layer = [w[0] for w in attention]  # L x (H, T, T)
    probs = logits[0, -1].softmax(-1)  # (V,)
    top = probs.topk(min(5, len(vocab)))
    predictions = [(vocab[i], float(pr)) for pr, i in zip(top.values.tolist(), top.indices.tolist())]

    rollout = attention_rollout(per_layer)  # (L, T, T)
    last = rollout[-1, -1]  # (T,): share of each input character in the last position's representation

    from plotting import plot_attention_across_layers, plot_head_grid, printable_token, _save, plt
    out = args.out or (args.gpt2_dir if args.gpt2_dir is not None else args.checkpoint.parent)
    out.mkdir(parents=True, exist_ok=True)
    heads_png = plot_head_grid(per_layer, tokens, out / f"{args.prefix}_heads.png",
                               title=f"attention of every head over {prompt!r}")
    layers_png = plot_attention_across_layers([w.mean(0) for w in per_layer], tokens,
                                              out / f"{args.prefix}_layers.png", query_index=-1)

    # Rollout figure: bars for R's last row, and beneath it the partial rollout after each layer.
    T = len(tokens)
    fig, (ax_bar, ax_heat) = plt.subplots(2, 1, figsize=(max(5.0, 0.24 * T + 1.5), 4.6),
                                          gridspec_kw={"height_ratios": [2, 1]}, sharex=True)
    ax_bar.bar(range(T), last.numpy(), color="tab:blue")
    ax_bar.set_ylabel("rollout share")
    nxt = ", ".join(f"{printable_token(c)!r} {pr:.2f}" for c, pr in predictions[:3])
    ax_bar.set_title(f"attention rollout for the last position; next: {nxt}", fontsize=9)
    ax_heat.imshow(rollout[:, -1].numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax_heat.set_yticks(range(rollout.shape[0]))
    ax_heat.set_yticklabels([f"after layer {l}" for l in range(rollout.shape[0])], fontsize=7)
    ax_heat.set_xticks(range(T))
    ax_heat.set_xticklabels([printable_token(t) for t in tokens], fontsize=7)
    fig.tight_layout()
    rollout_png = _save(fig, out / f"{args.prefix}_rollout.png")

    if args.export_json is not None:
        from explorer_data import attention_view, write_explorer_data
        record = {"model": source_name, "command": "python examples/visualize_attention.py "
                  + " ".join(sys.argv[1:] if argv is None else argv),
                  "examples": [{"title": prompt.splitlines()[0][:40] if prompt.strip() else repr(prompt),
                                "attention": [attention_view("self-attention (causal)", tokens, tokens, per_layer,
                                                             rollout[-1])]}]}
        for path in write_explorer_data(record, args.export_json):
            print(f"wrote {path}")

    result = {"checkpoint": source_name, "prompt": prompt, "next_char_top5": predictions,
              "rollout_last_position": [round(float(v), 6) for v in last],
              "head_mean_last_row_per_layer": [[round(float(v), 6) for v in w.mean(0)[-1]] for w in per_layer],
              "figures": [str(heads_png), str(rollout_png), str(layers_png)]}
    (out / f"{args.prefix}.json").write_text(json.dumps(result, indent=1) + "\n")
    order = last.argsort(descending=True)[:8].tolist()
    print("next character: " + ", ".join(f"{c!r} {pr:.3f}" for c, pr in predictions))
    print("rollout, most influential input characters: "
          + ", ".join(f"{tokens[i]!r}@{i} {float(last[i]):.3f}" for i in order))
    print(f"wrote {heads_png}, {rollout_png}, {layers_png}")
    return result


if __name__ == "__main__":
    main()
