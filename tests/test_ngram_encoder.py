"""The fastText client text encoder (``components.nn.ngram``): its bags are the real tokens and their in-text
n-grams, word order reaches it only through the n-grams, and bad input or settings fail with one clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.core.errors import DataError, ParamsError
from components.nn.ngram import NgramTextEncoder


def test_a_bag_holds_the_real_tokens_and_their_ngrams_inside_the_text() -> None:
    enc = NgramTextEncoder(vocab_size=50, buckets=7, dim=3, ngrams=3)
    ids = torch.tensor([[4, 9, 11, 0, 0], [4, 9, 0, 0, 0], [0, 0, 0, 0, 0]])
    flat, offsets = enc.bags(ids, (ids != 0).long())
    # 3 tokens + 2 bigrams + 1 trigram; 2 tokens + 1 bigram; an empty text (no n-gram crosses the padding)
    assert offsets.tolist() == [0, 6, 9]
    assert flat[:3].tolist() == [4, 9, 11] and flat[6:8].tolist() == [4, 9]
    assert all(50 <= int(i) < 57 for i in flat[3:6]) and 50 <= int(flat[8]) < 57
    assert flat[3] == flat[8]  # the bigram (4, 9) hashes to one bucket wherever it appears
    out = enc(ids, (ids != 0).long())
    assert out.shape == (3, 3) and torch.equal(out[2], torch.zeros(3))  # no real token: zeros
    # padding is not text: the same words with more padding give the same feature
    longer = torch.nn.functional.pad(ids, (0, 4))
    assert torch.allclose(enc(longer, (longer != 0).long()), out)


@pytest.mark.parametrize("ngrams, learns_order", [(1, False), (2, True)])
def test_word_order_is_learnt_through_the_ngrams_only(ngrams: int, learns_order: bool) -> None:
    # label = does token 5 come before token 6; every text holds both, so a bag of tokens alone is at chance
    g = torch.Generator().manual_seed(0)
    n = 256
    filler = torch.randint(10, 40, (n, 6), generator=g)
    y = torch.arange(n) % 2
    pair = torch.stack([torch.where(y == 1, 5, 6), torch.where(y == 1, 6, 5)], 1)
    ids = torch.cat([filler[:, :3], pair, filler[:, 3:]], 1)
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    enc = NgramTextEncoder(vocab_size=40, buckets=512, dim=8, ngrams=ngrams)
    head = nn.Linear(8, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=0.05)
    for _ in range(150):
        loss = nn.functional.cross_entropy(head(enc(ids, mask)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = float((head(enc(ids, mask)).argmax(1) == y).float().mean())
    assert (accuracy > 0.95) if learns_order else (accuracy < 0.7)


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 0}, "vocab_size"), ({"vocab_size": 10, "buckets": 0}, "buckets"),
    ({"vocab_size": 10, "dim": 2.5}, "dim"), ({"vocab_size": 10, "ngrams": 4}, "ngrams"),
])
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ParamsError, match=match):
        NgramTextEncoder(**kwargs)


def test_ids_of_another_tokenizer_or_a_bad_shape_are_refused() -> None:
    enc = NgramTextEncoder(vocab_size=20, buckets=8, dim=4)
    with pytest.raises(DataError, match="tokenizer it was built for has 20"):
        enc(torch.tensor([[1, 25]]), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(DataError, match="same"):
        enc(torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.long))
    # an id beyond the vocabulary under the padding mask is padding, not an error
    assert enc(torch.tensor([[1, 99]]), torch.tensor([[1, 0]])).shape == (1, 4)
