"""examples/explorer_data.py exports the attention the docs' explorer shows, from checkpoints in the formats
the examples write today (the core's save format: class, config, state dict, extra).

Tiny models with random weights are saved the way train_char_lm.py and translate_dates.py save theirs; the
export must give, per example, attention of the declared shapes whose rows are distributions, and a .js
file that is the same JSON wrapped for file:// pages.
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import explorer_data  # noqa: E402
import translate_dates as td  # noqa: E402
from transformer_implementation import Transformer  # noqa: E402


def _read_js(path):
    text = path.read_text()
    assert text.startswith("window.attentionExplorerData = window.attentionExplorerData || [];\n")
    return json.loads(text.split("push(", 1)[1].rsplit(");", 1)[0])


def test_export_from_checkpoints_in_the_examples_formats(tmp_path):
    torch.manual_seed(0)
    vocab = sorted(set("".join(explorer_data.CHAR_LM_PROMPTS)))
    lm = Transformer(len(vocab), embed_dim=16, num_heads=2, num_layers=2, ff_dim=32, max_seq_length=64)
    lm.save(tmp_path / "lm.pt", extra={"vocab": vocab})
    translator = td.build_model("transformer")
    translator.model.save(tmp_path / "td.pt")
    written = explorer_data.main(["--char-lm", str(tmp_path / "lm.pt"), "--translate-dates", str(tmp_path / "td.pt"),
                                  "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in written) == ["char_lm.js", "char_lm.json", "translate_dates.js", "translate_dates.json"]
    lm_data = json.loads((tmp_path / "out" / "char_lm.json").read_text())
    assert _read_js(tmp_path / "out" / "char_lm.js") == lm_data
    for example, prompt in zip(lm_data["examples"], explorer_data.CHAR_LM_PROMPTS):
        view = example["attention"][0]
        weights = torch.tensor(view["layers"])  # (L, H, T, T)
        assert weights.shape == (2, 2, len(prompt), len(prompt)) and view["queries"] == list(prompt)
        # rows of a softmax; each of the T entries is rounded to 3 decimals, so a row sum is off by <= T * 0.0005
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=len(prompt) * 5e-4)
        assert weights.triu(1).abs().max() == 0  # causal
        assert torch.allclose(torch.tensor(view["rollout"]).sum(-1), torch.ones(()), atol=len(prompt) * 5e-4)
    td_data = _read_js(tmp_path / "out" / "translate_dates.js")
    for example, source in zip(td_data["examples"], explorer_data.DATE_SOURCES):
        cross, encoder, decoder = example["attention"]
        assert cross["keys"] == list(source) and encoder["queries"] == list(source)
        assert cross["queries"][0] == "<bos>" and decoder["queries"] == cross["queries"]
        weights = torch.tensor(cross["layers"])
        assert weights.shape[-2:] == (len(cross["queries"]), len(source))
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=len(source) * 5e-4)


def test_previous_token_share_reads_the_subdiagonal():
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0] = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])  # head 0: always the previous token
    w[0, 1] = torch.eye(3)  # head 1: always itself
    record = {"examples": [{"attention": [{"layers": w.tolist()}]}]}
    assert explorer_data.previous_token_share(record) == [[1.0, 0.0]]
