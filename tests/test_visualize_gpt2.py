"""visualize_attention.py --gpt2-dir: a GPT-2 folder read from disk, its attention exported for the explorer.

The folder is made here: a tiny random GPT2LMHeadModel saved with transformers' save_pretrained (no
download), and a small byte-level BPE vocabulary learned by tests/test_gpt2_tokenizer.py's helper.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tests.test_gpt2_tokenizer import CORPUS, learn_bpe  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="needs transformers from requirements-test.txt")
    folder = tmp_path_factory.mktemp("gpt2")
    vocab, merges = learn_bpe(CORPUS, merges=120)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_gpt2_attention_is_exported_over_bpe_tokens(gpt2_dir, tmp_path):
    import visualize_attention
    from gpt2_tokenizer import GPT2Tokenizer
    prompt = "def forward(self, x): return self.proj(x)"
    result = visualize_attention.main(["--gpt2-dir", str(gpt2_dir), "--prompt", prompt, "--out", str(tmp_path),
                                       "--export-json", str(tmp_path / "gpt2.json")])
    tokens = GPT2Tokenizer.from_folder(gpt2_dir).readable(GPT2Tokenizer.from_folder(gpt2_dir).encode(prompt))
    data = json.loads((tmp_path / "gpt2.json").read_text())
    view = data["examples"][0]["attention"][0]
    assert view["queries"] == tokens and len(tokens) < len(prompt)  # BPE tokens, not characters
    assert len(view["layers"]) == 2 and len(view["layers"][0]) == 2  # layers x heads
    weights = torch.tensor(view["layers"][1][0])
    # rows of a softmax, each entry rounded to 3 decimals: a row sum is off by at most T * 0.0005
    assert torch.allclose(weights.sum(-1), torch.ones(len(tokens)), atol=len(tokens) * 5e-4)
    assert weights.triu(1).abs().max() == 0  # causal
    assert (tmp_path / "gpt2.js").read_text().startswith("window.attentionExplorerData")
    assert "".join(tokens) == result["prompt"] == prompt


def test_a_missing_gpt2_folder_is_a_one_line_error(tmp_path, capsys):
    import visualize_attention
    with pytest.raises(SystemExit) as info:
        visualize_attention.main(["--gpt2-dir", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert "--gpt2-dir" in str(info.value)
