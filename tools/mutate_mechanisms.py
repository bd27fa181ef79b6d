"""Put back, one at a time, slips a careless implementer would make in the mechanism files, and check
that a test catches each one.

For every mutation the script copies the repository's mechanisms/ and tests/ (and pyproject.toml) into
a fresh temporary folder, changes one line of one mechanism file there (the working tree is never
touched), runs that mechanism's own test file and its conformance entries, and reports which tests
failed. A mutation whose text is not found exactly once is reported as stale, so the list cannot rot
silently.

    OMP_NUM_THREADS=1 python tools/mutate_mechanisms.py              # every mutation
    OMP_NUM_THREADS=1 python tools/mutate_mechanisms.py hard_st_sign  # one

Not part of CI (it reruns tests once per mutation). The core has its own list: tools/mutate_core.py.
"""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (file stem, what the slip is, text in the file, replacement). Each text must occur exactly once.
MUTATIONS = {
    # The four slips of issue 10 that once passed every test.
    "hard_st_sign": ("hard_attention", "straight-through gradient with its sign flipped",
                     "weights = hard + (soft - soft.detach())", "weights = hard - (soft - soft.detach())"),
    "hard_causal_shift": ("hard_attention", "causal mask shifted by one (a query can never pick itself)",
                          "tril(diagonal=tk - tq)", "tril(diagonal=tk - tq - 1)"),
    "hard_eval_noise": ("hard_attention", "eval mode uses the supplied noise",
                        "        if self.training:\n", "        if self.training or noise is not None:\n"),
    "shaw_av_undropped": ("relative_position", "Shaw's a^V term and content term use different weights "
                          "(one dropped, one not)", ".scatter_add(-1, idx, alpha)", ".scatter_add(-1, idx, weights)"),
    # One slip each in four files of the efficient family.
    "flash_causal_off_by_one": ("flash_attention", "causal tile mask lets a query see the next key",
                                "visible = (cols <= rows)[None, None]", "visible = (cols <= rows + 1)[None, None]"),
    "mla_wrong_scale": ("multi_head_latent_attention", "scores scaled by 1/sqrt(Dh) instead of 1/sqrt(Dh + d_R)",
                        "self.scale = 1.0 / math.sqrt(self.head_dim + rope_dim)",
                        "self.scale = 1.0 / math.sqrt(self.head_dim)"),
    "linear_elu_without_one": ("linear_attention", "feature map elu(x) instead of elu(x) + 1",
                               "return F.elu(x) + 1.0", "return F.elu(x)"),
    "sigmoid_bias_sign": ("sigmoid_attention", "bias +log n instead of -log n",
                          "b = -math.log(tk) if self.attn_bias is None else self.attn_bias",
                          "b = math.log(tk) if self.attn_bias is None else self.attn_bias"),
    # Slips the conformance suite itself must catch, in a plain multi-head attention file.
    "mha_dropout_in_eval": ("multi_head_attention", "dropout active in eval",
                            "dropout_p = self.dropout if self.training else 0.0", "dropout_p = self.dropout"),
    "mha_no_rescale": ("multi_head_attention", "dropout without the 1/(1-p) rescale",
                       "dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights",
                       "dropped = F.dropout(weights, p=dropout_p) * (1 - dropout_p) if dropout_p > 0.0 else weights"),
    "mha_empty_row": ("multi_head_attention", "a fully masked row not zeroed",
                      "out = out.masked_fill(~row_has_key, 0.0)", "out = out"),
    "mha_mask_polarity": ("multi_head_attention", "mask polarity on the explicit path",
                          'scores = scores.masked_fill(~mask, float("-inf"))',
                          'scores = scores.masked_fill(mask, float("-inf"))'),
    "mha_padding_polarity": ("multi_head_attention", "key_padding_mask read as True = padding",
                             "padding = key_padding_mask[:, None, None, :]",
                             "padding = ~key_padding_mask[:, None, None, :]"),
    "mha_causal_off_by_one": ("multi_head_attention", "each query also sees the next key",
                              "tril(diagonal=tk - tq)", "tril(diagonal=tk - tq + 1)"),
    "mha_weights_after_dropout": ("multi_head_attention", "returned weights taken after dropout",
                                  "    return out, weights\n", "    return out, (dropped if need_weights else weights)\n"),
    "mha_3d_mask_accepted": ("multi_head_attention", "a 3-D mask accepted (silent broadcast)",
                             "    else:\n        fits = False", "    else:\n        fits = True"),
}


def find_text(stem, text):
    source = (ROOT / "mechanisms" / f"{stem}.py").read_text(encoding="utf-8")
    return source.count(text)


def run(name, stem, old, new, keep):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for folder in ("mechanisms", "tests"):
            shutil.copytree(ROOT / folder, tmp / folder, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
        path = tmp / "mechanisms" / f"{stem}.py"
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x" if not keep else "-q",
               f"tests/test_{stem}.py", "tests/conformance", "-k", stem]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        return [line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines() if line.startswith("FAILED")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"mutations to run (default: all of {', '.join(MUTATIONS)})")
    parser.add_argument("--all-failures", action="store_true", help="run every test instead of stopping at the first failure")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}")
    missed = []
    for name in args.names or MUTATIONS:
        stem, what, old, new = MUTATIONS[name]
        if old is None:
            print(f"{name:28s} {what}: checked by hand (see tests/README.md)")
            continue
        count = find_text(stem, old)
        if count != 1:
            print(f"{name:28s} STALE: its text occurs {count} times in mechanisms/{stem}.py")
            missed.append(name)
            continue
        failed = run(name, stem, old, new, args.all_failures)
        print(f"{name:28s} {what}: " + (f"caught by {', '.join(failed)}" if failed else "NOT CAUGHT"))
        if not failed:
            missed.append(name)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
