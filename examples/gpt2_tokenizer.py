#!/usr/bin/env python
"""GPT-2's byte-level BPE tokenizer, read from a checkpoint folder's ``vocab.json`` and ``merges.txt``.

    python examples/gpt2_tokenizer.py PATH "Hello world"     # prints the tokens and their ids

Used by ``visualize_attention.py --gpt2-dir PATH`` to show GPT-2's attention over real tokens. Standard
library only; checked against ``transformers``' ``GPT2Tokenizer`` built from the same two files
(``tests/test_gpt2_tokenizer.py``). Nothing is downloaded: the files must already be in the folder.

How GPT-2 tokenizes (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", sec. 2.2):

1. **Bytes, shown as characters.** The text is UTF-8 encoded, and every byte is written as one printable
   character, so that the vocabulary is a list of strings and no byte is ever unknown. Printable bytes
   stand for themselves; the other 68 bytes (control characters, space, ...) are mapped to the code points
   256, 257, ... in order. That is why a leading space shows as ``Ġ`` (space is the 33rd such byte: 256 + 32 = U+0120) in GPT-2's
   vocabulary.
2. **Pre-tokenization.** A regular expression cuts the text into words, numbers, runs of punctuation and
   runs of white space, with an optional single leading space attached to a word; merges never cross these
   boundaries, so " dog." becomes " dog" and ".".
3. **Merges.** Each piece starts as its characters; the adjacent pair with the best (lowest) rank in
   ``merges.txt`` is merged everywhere in the piece, again and again, until no pair of the piece is in the
   list. The resulting strings are looked up in ``vocab.json``.

GPT-2's pattern uses the Unicode classes ``\\p{L}`` (letters) and ``\\p{N}`` (numbers), which Python's ``re``
does not have; ``[^\\W\\d_]`` (a word character that is neither a digit nor ``_``) is exactly "letter" for
``re``, and ``\\d`` stands for ``\\p{N}``. They differ on a few rare characters (superscripts, Roman numeral
signs), which the test names.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

# Step 2: contractions, letters, numbers, other symbols (each with an optional leading space), then white
# space: a run that is not followed by a non-space, or any remaining run.
PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """Step 1: byte value -> the printable character that stands for it."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class GPT2Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, tokens(text) -> the visible token strings."""

    def __init__(self, vocab: dict, merges: list) -> None:
        self.encoder = dict(vocab)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict = {}

    @classmethod
    def from_folder(cls, folder) -> "GPT2Tokenizer":
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: a GPT-2 folder needs vocab.json and merges.txt "
                                        f"beside config.json (save_pretrained of GPT2Tokenizer writes them)")
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = []
        for number, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
            if number == 1 and line.startswith("#version"):
                continue  # the header line save_pretrained writes
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{number}: expected two symbols separated by a space, got {line!r}")
            merges.append(tuple(parts))
        return cls(vocab, merges)

    def _bpe(self, piece: str) -> list:
        """Step 3 on one pre-token (already written as byte characters): its final symbols."""
        if piece in self._cache:
            return self._cache[piece]
        symbols = list(piece)
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break  # no pair of this piece can be merged any more
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[piece] = symbols
        return symbols

    def tokens(self, text: str) -> list:
        """The BPE tokens of `text`, as vocabulary strings (a leading space shows as 'Ġ')."""
        out = []
        for piece in PRETOKENIZE.findall(text):
            out.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return out

    def encode(self, text: str) -> list:
        ids = []
        for token in self.tokens(text):
            if token not in self.encoder:
                raise ValueError(f"token {token!r} is not in vocab.json: the vocabulary and merges do not match")
            ids.append(self.encoder[token])
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def readable(self, ids) -> list:
        """Each id as the text it stands for (for labelling plots); partial UTF-8 bytes show as '\\ufffd'."""
        return [self.decode([i]) for i in ids]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tokenize text with a GPT-2 folder's vocab.json and merges.txt.")
    p.add_argument("folder", type=Path, help="a folder holding vocab.json and merges.txt")
    p.add_argument("text", help="the text to tokenize")
    args = p.parse_args(argv)
    try:
        tokenizer = GPT2Tokenizer.from_folder(args.folder)
    except (FileNotFoundError, ValueError) as error:
        p.error(str(error))
    ids = tokenizer.encode(args.text)
    for token, i in zip(tokenizer.tokens(args.text), ids):
        print(f"{i:>6}  {token!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
