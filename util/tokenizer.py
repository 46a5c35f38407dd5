"""CLIP's byte-level BPE tokenizer, giving OpenAI's token ids.

    tokenize(texts, context_length=77, truncate=False) -> LongTensor (N, context_length)

The merges ship with the repository (bpe_simple_vocab_16e6.txt.gz, SHA-256 checked).
"""
import gzip
import hashlib
import html
import os
from functools import lru_cache

import ftfy
import regex
import torch

_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "bpe_simple_vocab_16e6.txt.gz")
_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def tokenize(texts, context_length=77, truncate=False):
    """Token ids of each text between <|startoftext|> and <|endoftext|>, zero-padded:
    LongTensor (N, context_length). A longer text is an error, or with truncate=True cut
    short, <|endoftext|> kept last."""
    tok = _tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot, *tok.encode(text), tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"the text {text[:80]!r}... is {len(ids)} tokens; "
                                 f"CLIP reads {context_length} at most")
            ids = ids[:context_length - 1] + [tok.eot]
        result[i, :len(ids)] = torch.tensor(ids)
    return result


@lru_cache()
def _tokenizer():
    return _Tokenizer()


def _byte_alphabet():
    """Byte -> a printable character, in the order of the first 256 vocabulary ids:
    printable latin-1 bytes stand for themselves, the others move to code point 256 + n,
    so that the BPE never sees whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    moved = {b: chr(256 + n) for n, b in enumerate(others)}
    return {b: chr(b) for b in printable} | moved


_TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


class _Tokenizer:
    def __init__(self, bpe_path=_BPE_PATH):
        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"the BPE merges file {bpe_path} is missing; it "
                                    "ships with this repository (restore it with git "
                                    "checkout)")
        with open(bpe_path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != _BPE_SHA256:
                raise RuntimeError(f"{bpe_path} does not match its SHA-256 "
                                   f"{_BPE_SHA256}; restore it with git checkout")
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The 48,894 merges after the header line.
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = _byte_alphabet()
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {"<|startoftext|>": ("<|startoftext|>",),
                      "<|endoftext|>": ("<|endoftext|>",)}
        self.sot = self.encoder["<|startoftext|>"]
        self.eot = self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Merge the lowest-ranked adjacent pair until no known merge is left."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged = []
            for piece in word:  # a merged piece is longer than best[0]: merged once
                if merged and (merged[-1], piece) == best:
                    merged[-1] += piece
                else:
                    merged.append(piece)
            word = tuple(merged)
        self.cache[token] = word
        return word

    def encode(self, text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in _TOKEN_PATTERN.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token))
        return ids
