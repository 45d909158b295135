"""A bag-of-n-grams text encoder (fastText: Joulin et al., "Bag of Tricks for Efficient Text Classification", EACL
2017) over the foundation tokenizer's WordPiece ids: the mean of trainable embeddings of the text's tokens and of its
hashed token n-grams (n = 2..``ngrams``).

Why here: it is what a hospital can train well on a few hundred rows, like the TF-IDF + logistic regression baseline
it resembles, and its lexical knowledge is what the frozen sentence encoder lacks (``README`` FedKIM section). The
n-grams are hashed into a fixed number of buckets, so every site builds the same table without any site's
vocabulary (words of its private text) being shared. Hand-written: ``nn.EmbeddingBag`` is the library part; no
well-kept library builds hashed n-gram bags from token ids in torch (fastText's own package trains outside torch,
so it could not be averaged by the federated core).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from components.core.errors import DataError, ParamsError

_PRIME = 1_000_003  # the rolling hash's multiplier (an odd prime, as fastText's)
MAX_NGRAMS = 3


class NgramTextEncoder(nn.Module):
    """``forward(input_ids, attention_mask) -> (N, dim)``: mean of the embeddings of the real tokens (ids
    ``0..vocab_size-1``) and of their hashed n-grams for n = 2..``ngrams`` (``buckets`` rows after the vocabulary);
    a text with no real token gives zeros."""

    def __init__(self, vocab_size: int, buckets: int = 65536, dim: int = 32, ngrams: int = 2) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("buckets", buckets), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamsError(f"n-gram text encoder: {name}={value!r} must be an integer >= 1")
        if isinstance(ngrams, bool) or not isinstance(ngrams, int) or not 1 <= ngrams <= MAX_NGRAMS:
            raise ParamsError(f"n-gram text encoder: ngrams={ngrams!r} must be an integer in [1, {MAX_NGRAMS}]")
        self.config: dict[str, Any] = {"vocab_size": vocab_size, "buckets": buckets, "dim": dim, "ngrams": ngrams}
        self.vocab_size, self.buckets, self.ngrams = vocab_size, buckets, ngrams
        rows = vocab_size + (buckets if ngrams > 1 else 0)
        self.embedding = nn.EmbeddingBag(rows, dim, mode="mean")
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.out_dim = dim

    def bags(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat row ids of every text's bag and each bag's offset (``nn.EmbeddingBag``'s input)."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise DataError(f"n-gram text encoder: input_ids {tuple(input_ids.shape)} and attention_mask "
                            f"{tuple(attention_mask.shape)} must be the same (N, L)")
        real = attention_mask.bool()
        tokens = input_ids[real]
        if len(tokens):
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                raise DataError(f"n-gram text encoder: token ids range [{low}, {high}]; the tokenizer it was built for "
                                f"has {self.vocab_size}")
        ids, keep = [input_ids], [real]
        hashed, inside = input_ids.long() % self.buckets, real
        for n in range(2, self.ngrams + 1):  # n-gram starting at position i: tokens i..i+n-1, all real
            length = input_ids.shape[1] - n + 1
            if length < 1:
                break
            hashed = (hashed[:, :length] * _PRIME + input_ids[:, n - 1:].long()) % self.buckets
            inside = inside[:, :length] & real[:, n - 1:]
            ids.append(hashed + self.vocab_size)
            keep.append(inside)
        flat, mask = torch.cat(ids, 1), torch.cat(keep, 1)
        counts = mask.sum(1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        return flat[mask].long(), offsets

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        flat, offsets = self.bags(input_ids, attention_mask)
        return self.embedding(flat, offsets)
