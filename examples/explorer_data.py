#!/usr/bin/env python
"""Export attention weights for the docs' attention explorer (docs/explorer.md).

    python examples/explorer_data.py --char-lm runs/char_lm/ckpt.pt \\
        --translate-dates runs/translate_dates/checkpoints/transformer.pt \\
        --vit runs/vision_transformer/checkpoints/vit.pt --js-only

For each model it runs a few fixed inputs with attention returned, and writes ``<name>.json`` plus
``<name>.js``: the same object wrapped in ``attentionExplorerData.push(...)``, because a page opened from
``file://`` may load a script next to it but may not ``fetch()`` a JSON file. The explorer page loads the
``.js`` files; its file picker opens any ``.json`` written here or by ``visualize_attention.py
--export-json``. The format, one object per model::

    {"model": name, "command": how it was made,
     "examples": [{"title": ..., "attention": [
         {"name": "self-attention", "queries": [tokens], "keys": [tokens],
          "layers": [L][H][Tq][Tk] weights, "rollout": [Tq][Tk] or null}]}]}
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

DEFAULT_OUT = ROOT / "docs" / "_static" / "explorer" / "data"
CHAR_LM_PROMPTS = (
    "def __init__(self, name):\n        self.name = name",
    "for i in range(len(items)):\n    if items[i] is None:",
    "    return self._cache[key]\n\n    def get(self, key):",
)
DATE_SOURCES = ("3rd of March 2021", "Tuesday, 14 July 98", "12/25/2003", "aug 9, 61")


def rounded(weights, digits: int = 3):
    """A tensor as nested lists of floats rounded to `digits` (keeps the data files small)."""
    return torch.round(weights.double() * 10 ** digits).div(10 ** digits).tolist()


def attention_view(name: str, queries, keys, layers, rollout=None) -> dict:
    """One attention map set: `layers` is a list of L tensors (H, Tq, Tk); `rollout` (Tq, Tk) or None."""
    layers = [torch.as_tensor(w) for w in layers]
    for l, w in enumerate(layers):
        if w.dim() != 3 or w.shape[1:] != (len(queries), len(keys)):
            raise ValueError(f"layers[{l}] must have shape (H, {len(queries)}, {len(keys)}), got {tuple(w.shape)}")
    return {"name": name, "queries": list(queries), "keys": list(keys), "layers": [rounded(w) for w in layers],
            "rollout": None if rollout is None else rounded(torch.as_tensor(rollout))}


def write_explorer_data(record: dict, path: Path, formats=(".json", ".js")) -> tuple:
    """Write `record` as <path>.json and/or <path>.js (the same object, wrapped for file:// pages)."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, separators=(",", ":"))
    bodies = {".json": text + "\n",
              ".js": "window.attentionExplorerData = window.attentionExplorerData || [];\n"
                     f"window.attentionExplorerData.push({text});\n"}
    written = []
    for suffix, body in ((suffix, bodies[suffix]) for suffix in formats):
        target = path.with_suffix(suffix)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(target)  # write, then rename: never a torn file
        written.append(target)
    return tuple(written)


def previous_token_share(record: dict) -> list:
    """Per layer and head, the mean weight a query puts on the token just before it, over every example.

    A *previous-token head* puts most of its weight there; the page quotes these numbers."""
    shares = None
    for example in record["examples"]:
        view = example["attention"][0]
        w = torch.tensor(view["layers"])  # (L, H, T, T)
        t = w.size(-1)
        share = w[..., torch.arange(1, t), torch.arange(t - 1)].mean(-1)  # (L, H)
        shares = share if shares is None else shares + share
    return (shares / len(record["examples"])).tolist()


def char_lm_record(checkpoint: Path, prompts=CHAR_LM_PROMPTS, command: str = "") -> dict:
    """Self-attention of every layer and head of the char LM, with rollout, for each prompt."""
    from visualize_attention import attention_rollout, load_checkpoint
    model, vocab = load_checkpoint(Path(checkpoint))
    stoi = {c: i for i, c in enumerate(vocab)}
    examples = []
    for prompt in prompts:
        prompt = "".join(c for c in prompt if c in stoi)[-model.max_seq_length:]
        ids = torch.tensor([[stoi[c] for c in prompt]])  # (1, T)
        with torch.no_grad():
            _, attention = model(ids, return_attention=True)  # L x (1, H, T, T)
        layers = [w[0] for w in attention]  # L x (H, T, T)
        examples.append({"title": prompt.splitlines()[0][:40],
                         "attention": [attention_view("self-attention (causal)", list(prompt), list(prompt), layers,
                                                      attention_rollout(layers)[-1])]})
    return {"model": f"char LM ({len(layers)} layers x {layers[0].shape[0]} heads)", "command": command,
            "examples": examples}


def translate_dates_record(checkpoint: Path, sources=DATE_SOURCES, command: str = "") -> dict:
    """Encoder self-attention, decoder self-attention and cross-attention of the date translator."""
    import translate_dates as td
    model = td.build_model("transformer")
    # translate_dates saves its Transformer through the core's EncoderDecoderTransformer.save format.
    model.model = td.ti.EncoderDecoderTransformer.load(checkpoint)  # eval mode
    model.eval()
    examples = []
    for source in sources:
        batch = td.encode_batch([(source, "")], "cpu")
        with torch.no_grad():
            ids, _ = model.greedy_decode(batch["src"], batch["src_len"], td.TGT_VOCAB.bos_id, td.TGT_VOCAB.eos_id,
                                         td.TGT_VOCAB.pad_id, td.TARGET_LEN + 2)
            _, attention = model.model(batch["src"], ids[:, :-1], return_attention=True)
        output = td.TGT_VOCAB.decode(ids[0, 1:].tolist())
        src_tokens = list(source)
        tgt_tokens = ["<bos>"] + list(output)
        n = len(tgt_tokens)
        views = [
            attention_view("cross-attention (output -> source)", tgt_tokens, src_tokens,
                           [w[0, :, :n, :len(src_tokens)] for w in attention["cross"]]),
            attention_view("encoder self-attention", src_tokens, src_tokens,
                           [w[0, :, :len(src_tokens), :len(src_tokens)] for w in attention["encoder"]]),
            attention_view("decoder self-attention (causal)", tgt_tokens, tgt_tokens,
                           [w[0, :, :n, :n] for w in attention["decoder_self"]]),
        ]
        examples.append({"title": f"{source} -> {output}", "attention": views})
    return {"model": "date translator (EncoderDecoderTransformer)", "command": command, "examples": examples}


def vit_record(checkpoint: Path, count: int = 4, command: str = "") -> dict:
    """The ViT of vision_transformer.py on fixed test images: every layer's and head's attention over the
    class token and the patches, and rollout. A patch token reads "#r,c" when it holds a pixel of the shape
    and ".r,c" when it does not, so the explorer shows at a glance whether the class token looks at the object."""
    import vision_transformer as vt
    model, _ = vt.load_checkpoint(checkpoint)
    if not isinstance(model, vt.VisionTransformer):
        raise SystemExit(f"error: --vit {checkpoint}: holds a {type(model).__name__}, expected the ViT (vit.pt)")
    size, patch = model.config["image_size"], model.config["patch_size"]
    images, labels, masks = vt.make_test_set(count, size)
    on_object = vt.patch_object_mask(masks, patch)  # (n, N) bool
    grid = size // patch
    with torch.no_grad():
        _, weights = vt.forward_with_attention(model, images)  # L x (n, H, N + 1, N + 1)
    from visualize_attention import attention_rollout
    examples = []
    for i in range(count):
        tokens = ["[CLS]"] + [f"{'#' if on_object[i, p] else '.'}{p // grid},{p % grid}" for p in range(grid * grid)]
        layers = [w[i] for w in weights]  # L x (H, N + 1, N + 1)
        examples.append({"title": f"test image {i}: {vt.SHAPES[int(labels[i])]}",
                         "attention": [attention_view("self-attention (class token + patches)", tokens, tokens,
                                                      layers, attention_rollout(layers)[-1])]})
    return {"model": f"ViT ({len(weights)} layers x {weights[0].shape[1]} heads, {grid}x{grid} patches)",
            "command": command, "examples": examples}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--char-lm", type=Path, metavar="CKPT", help="checkpoint written by train_char_lm.py")
    p.add_argument("--translate-dates", type=Path, metavar="CKPT",
                   help="transformer checkpoint written by translate_dates.py (<out>/checkpoints/transformer.pt)")
    p.add_argument("--vit", type=Path, metavar="CKPT",
                   help="ViT checkpoint written by vision_transformer.py (<out>/checkpoints/vit.pt)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <model>.json and <model>.js")
    p.add_argument("--js-only", action="store_true",
                   help="write only <model>.js, the form the docs page loads (the docs ship only these)")
    args = p.parse_args(argv)
    if not args.char_lm and not args.translate_dates and not args.vit:
        p.error("give at least one of --char-lm, --translate-dates, --vit")
    for flag, path in (("--char-lm", args.char_lm), ("--translate-dates", args.translate_dates), ("--vit", args.vit)):
        if path is not None and not path.is_file():
            p.error(f"{flag} {path}: no such file")
    command = "python examples/explorer_data.py " + " ".join(sys.argv[1:] if argv is None else argv)
    written = []
    formats = (".js",) if args.js_only else (".json", ".js")
    if args.char_lm:
        record = char_lm_record(args.char_lm, command=command)
        written += write_explorer_data(record, args.out / "char_lm", formats)
        print("mean weight on the previous character, per layer (rows) and head (columns):")
        for layer, shares in enumerate(previous_token_share(record)):
            print(f"  layer {layer}: " + "  ".join(f"{s:.2f}" for s in shares))
    if args.translate_dates:
        written += write_explorer_data(translate_dates_record(args.translate_dates, command=command),
                                       args.out / "translate_dates", formats)
    if args.vit:
        written += write_explorer_data(vit_record(args.vit, command=command), args.out / "vision_transformer", formats)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return written


if __name__ == "__main__":
    main()
