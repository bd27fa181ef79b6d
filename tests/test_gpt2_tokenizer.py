"""examples/gpt2_tokenizer.py against transformers' GPT2Tokenizer built from the same vocab.json and merges.txt.

No GPT-2 files are downloaded: the test learns a small byte-level BPE vocabulary (a few hundred merges) from
a text with the standard library, writes it in GPT-2's file format, and gives both tokenizers the same two
files. Texts cover contractions, numbers, punctuation runs, runs of spaces and newlines, accents and emoji
(multi-byte UTF-8, split into byte tokens).
"""
import collections
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from gpt2_tokenizer import PRETOKENIZE, GPT2Tokenizer, bytes_to_unicode  # noqa: E402

CORPUS = (ROOT / "transformer_implementation.py").read_text(encoding="utf-8")[:60000]
TEXTS = [
    "Hello world! It's a test, isn't it? We'll see: they'd've 3 cats & 42 dogs.",
    "def forward(self, x):\n    return self.proj(x)  # (B, T, E)\n\n\n",
    "  leading and   inner   spaces\tand tabs\n",
    "Café naïve façade — “quotes” and emoji 🤖🚀 end",
    "numbers 2024-11-30 3.14159 1e-5 and snake_case_names __init__",
]


def learn_bpe(text, merges=300):
    """A byte-level BPE vocabulary learned from `text`: (vocab dict, merges list), GPT-2's format."""
    encode = bytes_to_unicode()
    words = collections.Counter("".join(encode[b] for b in piece.encode("utf-8")) for piece in PRETOKENIZE.findall(text))
    splits = {word: list(word) for word in words}
    vocab = {encode[b]: i for i, b in enumerate(sorted(encode))}
    learned = []
    for _ in range(merges):
        pairs = collections.Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        learned.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word in words:
            symbols, merged, i = splits[word], [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, learned


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_tok")
    vocab, merges = learn_bpe(CORPUS)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                     encoding="utf-8")
    return path


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


@pytest.mark.parametrize("text", TEXTS)
def test_same_tokens_and_ids_as_transformers(folder, text):
    transformers = pytest.importorskip("transformers", reason="needs transformers from requirements-test.txt")
    theirs = transformers.GPT2Tokenizer.from_pretrained(str(folder))  # a local folder: nothing is downloaded
    ours = GPT2Tokenizer.from_folder(folder)
    assert ours.tokens(text) == theirs.tokenize(text)
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == text


def test_merges_are_used(folder):
    ours = GPT2Tokenizer.from_folder(folder)
    ids = ours.encode("return self")
    assert len(ids) < len("return self"), "no merge was applied"
    assert ours.tokens(" self") == ["\u0120self"]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        GPT2Tokenizer.from_folder(tmp_path)
