"""Put back, one at a time, the slips a careless implementer would make in transformer_implementation.py,
and check that the core's tests catch each one.

For every mutation the script copies the core, with that one change, and the core's test files into a
fresh temporary folder, runs pytest there (the working tree is never modified) and reports which tests
failed. A mutation whose text is not found exactly once is reported as stale, so the list cannot rot
silently. The table it prints is the one in tests/README.md.

    OMP_NUM_THREADS=1 python tools/mutate_core.py            # all mutations (a few minutes on one core)
    OMP_NUM_THREADS=1 python tools/mutate_core.py mask_polarity rope_pairing

Not part of CI: it reruns the core's tests once per mutation.
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = "transformer_implementation.py"
TESTS = ["tests/test_transformer_attention.py", "tests/test_transformer_models.py", "tests/test_transformer_oracle.py",
         "tests/test_transformer_gpt2.py", "tests/test_sampling.py"]

# name -> (what the slip is, [(text in the core, replacement), ...]); each text must occur exactly once.
MUTATIONS = {
    "no_embedding_scale": ("the sqrt(E) embedding scale dropped", [
        ("x = table(ids) * self._emb_scale  # (B, T, E)", "x = table(ids)  # (B, T, E)")]),
    "encdec_untied": ("EncoderDecoderTransformer does not tie its output layer", [
        ("            self.lm_head.weight = self.tgt_embedding.weight  # eq. (17)", "            pass")]),
    "lm_untied": ("Transformer does not tie its output layer", [
        ("            self.lm_head.weight = self.token_embedding.weight\n", "            pass\n")]),
    "prenorm_ffn_unnormalised": ("pre-norm block feeds the un-normalised x to the feed-forward layer", [
        ("x = x + self.dropout2(self.ff(self.norm2(x)))", "x = x + self.dropout2(self.ff(x))")]),
    "temperature_multiplies": ("temperature multiplies the logits instead of dividing them", [
        ("logits = logits.float() / temperature", "logits = logits.float() * temperature")]),
    "mask_polarity": ("mask polarity inverted on the explicit path (True = masked)", [
        ('scores = scores.masked_fill(~mask, float("-inf"))', 'scores = scores.masked_fill(mask, float("-inf"))')]),
    "mask_polarity_fused": ("mask polarity inverted on the fused path", [
        ("query, key, value, attn_mask=mask,", "query, key, value, attn_mask=None if mask is None else ~mask,")]),
    "key_padding_polarity": ("key_padding_mask read as True = padding", [
        ("padding = key_padding_mask[:, None, None, :]", "padding = ~key_padding_mask[:, None, None, :]")]),
    "cache_position_offset": ("Transformer.forward ignores the cache length (positions restart at 0)", [
        ("        offset = cache[0].length if cache is not None else 0\n        _check_ids(input_ids, \"input_ids\"",
         "        offset = 0\n        _check_ids(input_ids, \"input_ids\"")]),
    "causal_off_by_one": ("causal mask lets each query see one future key", [
        ("tril(diagonal=Tk - Tq)", "tril(diagonal=Tk - Tq + 1)")]),
    "causal_top_left": ("causal mask aligned top-left (PyTorch's) instead of bottom-right", [
        ("tril(diagonal=Tk - Tq)", "tril(diagonal=0)")]),
    "dropout_in_eval": ("attention dropout applied in eval mode", [
        ("dropout_p = self.dropout if self.training else 0.0", "dropout_p = self.dropout")]),
    "sin_cos_swapped": ("sinusoidal table: sin and cos swapped", [
        ("table[:, 0::2] = torch.sin(position * inv_freq)", "table[:, 0::2] = torch.cos(position * inv_freq)"),
        ("table[:, 1::2] = torch.cos(position * inv_freq)", "table[:, 1::2] = torch.sin(position * inv_freq)")]),
    "rope_pairing": ("RoPE pairs channels 2i, 2i+1 while the tables pair i, i + Dh/2", [
        ("x1, x2 = x.chunk(2, dim=-1)", "x1, x2 = x[..., 0::2], x[..., 1::2]")]),
    "rope_sign": ("RoPE rotates the wrong way (sign of the 90-degree turn)", [
        ("rotated_half = torch.cat((-x2, x1), dim=-1)", "rotated_half = torch.cat((x2, -x1), dim=-1)")]),
    "wrong_scale": ("scores divided by Dh instead of sqrt(Dh)", [
        ("scale = 1.0 / math.sqrt(Dh)", "scale = 1.0 / Dh")]),
    "softmax_wrong_axis": ("softmax over the queries instead of the keys", [
        ("torch.softmax(scores, dim=-1, dtype=acc)", "torch.softmax(scores, dim=-2, dtype=acc)")]),
    "empty_row_nan": ("rows with no visible key are not protected (NaN)", [
        ("mask = mask | ~row_ok  # (.., Tq, Tk)", "pass")]),
    "top_p_drops_crossing_token": ("nucleus drops the token that crosses top_p", [
        ("drop = (probs.cumsum(dim=-1) - probs) >= top_p", "drop = probs.cumsum(dim=-1) > top_p")]),
    "top_k_keeps_ties_wrongly": ("top-k keeps k - 1 tokens", [
        ("logits = logits.masked_fill(logits < kth,", "logits = logits.masked_fill(logits <= kth,")]),
    "gelu_tanh_exact": ("gelu_tanh computed with the exact erf GELU", [
        ('h = F.gelu(h, approximate="tanh")', "h = F.gelu(h)")]),
    "gpt2_square_conv1d_not_transposed": ("from_gpt2 forgets to transpose the square attn.c_proj", [
        ('("attn.c_proj.weight", "self_attn.out_proj.weight", (E, E), True)',
         '("attn.c_proj.weight", "self_attn.out_proj.weight", (E, E), False)')]),
    "load_not_eval": ("load returns the model in training mode", [
        ("        model.eval()\n        return (model, payload.get(\"extra\"))", "        return (model, payload.get(\"extra\"))")]),
}


def run_tests(folder: pathlib.Path) -> tuple:
    """(exit code, failed test ids) of the core's tests in `folder`."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rf", *TESTS],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    failed = re.findall(r"^FAILED (\S+)", result.stdout, re.MULTILINE)
    return result.returncode, failed


def prepare(folder: pathlib.Path, source: str) -> None:
    (folder / "tests").mkdir(parents=True, exist_ok=True)
    (folder / CORE).write_text(source, encoding="utf-8")
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    for test in TESTS:
        shutil.copy(ROOT / test, folder / test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"mutations to run (default: all): {', '.join(MUTATIONS)}")
    parser.add_argument("--json", type=pathlib.Path, help="also write every failing test of every mutation here")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; choose from {list(MUTATIONS)}")
    original = (ROOT / CORE).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="mutate_core_") as tmp:
        tmp = pathlib.Path(tmp)
        prepare(tmp / "baseline", original)
        code, failed = run_tests(tmp / "baseline")
        if code != 0:
            print(f"the unmutated core fails its tests ({failed}); fix that first", file=sys.stderr)
            return 1
        rows, survivors, everything = [], [], {}
        for name in args.names or list(MUTATIONS):
            slip, edits = MUTATIONS[name]
            source = original
            for old, new in edits:
                if source.count(old) != 1:
                    rows.append(f"| `{name}` | {slip} | STALE: text found {source.count(old)} times |")
                    break
                source = source.replace(old, new)
            else:
                prepare(tmp / name, source)
                code, failed = run_tests(tmp / name)
                everything[name] = failed
                if not failed:
                    survivors.append(name)
                caught = ", ".join(f"`{f.split('::', 1)[1]}`" for f in failed[:3]) or "**NOT CAUGHT**"
                more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
                rows.append(f"| `{name}` | {slip} | {len(failed)}: {caught}{more} |")
            print(rows[-1], flush=True)
    print("\n| mutation | slip | failing tests (count: first three) |\n|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1), encoding="utf-8")
    if survivors:
        print(f"\nnot caught: {survivors}", file=sys.stderr)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
