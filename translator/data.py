"""Tatoeba English-French pairs -> a fixed split by English sentence -> a shared BPE -> batches.

The manythings.org/anki export fra-eng.zip holds fra.txt, one pair a line: English<TAB>French
(newer exports add <TAB>attribution). An English sentence often has several French translations
("Run!" -> "Cours !", "Courez !"): the split is made over the unique English sentences, so that a
sentence and all its translations fall in one split, and the test scores use every translation.

The split (written down so that scores compare): the unique English sentences, sorted, permuted by
numpy's default_rng(SPLIT_SEED = 0); the first 5% are the test split, the next 5% validation, the
rest training. It does not depend on --seed. Within a split, the pairs follow that permutation, so
the first N sentences of a split (--max-pairs, --max-eval) are a random sample of it.
"""
import hashlib
import http.client
import math
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn.utils.rnn import pad_sequence

URL = "https://www.manythings.org/anki/fra-eng.zip"
SPLIT_SEED = 0
TEST_FRACTION = VALID_FRACTION = 0.05
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: padding, BOS (starts the decoder's input), EOS
PAD, BOS, EOS = 0, 1, 2


def download(url, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    req = urllib.request.Request(url, headers={"User-Agent": "Mozilla/5.0"})  # manythings.org refuses urllib's
    with urllib.request.urlopen(req, timeout=30) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    os.replace(tmp, path)  # a broken download never looks like the data


def find_zip(data_dir):
    """DATA_DIR/tatoeba/fra-eng.zip, downloaded there when missing."""
    path = Path(data_dir) / "tatoeba" / "fra-eng.zip"
    if path.is_file():
        return path
    try:
        print(f"downloading {URL} to {path}")
        download(URL, path)
    except (OSError, http.client.HTTPException) as e:
        raise SystemExit(f"translator: no {path} and downloading {URL} failed ({e}); download it yourself to "
                         f"DIR/tatoeba/fra-eng.zip (the zip holding fra.txt) and pass --data-dir DIR")
    return path


def read_pairs(path):
    """The (English, French) pairs of the zip's fra.txt in file order, and the sha256 of fra.txt."""
    try:
        with zipfile.ZipFile(path) as z:
            raw = z.read("fra.txt")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise SystemExit(f"translator: {path} is not the Tatoeba export holding fra.txt ({e})")
    pairs = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        cols = line.split("\t")
        if len(cols) >= 2 and cols[0].strip() and cols[1].strip():
            pairs.append((cols[0].strip(), cols[1].strip()))
    if not pairs:
        raise SystemExit(f"translator: {path}'s fra.txt holds no English<TAB>French line")
    return pairs, hashlib.sha256(raw).hexdigest()


def split_pairs(pairs):
    """{"train", "valid", "test"} -> pairs, split by unique English sentence (see the module's docstring)."""
    sentences = sorted({en for en, _ in pairs})
    rank = {sentences[i]: r for r, i in enumerate(np.random.default_rng(SPLIT_SEED).permutation(len(sentences)))}
    n_test = math.ceil(TEST_FRACTION * len(sentences))
    n_valid = math.ceil(VALID_FRACTION * len(sentences))
    splits = {"train": [], "valid": [], "test": []}
    for en, fr in sorted(pairs, key=lambda p: rank[p[0]]):  # stable: a sentence's translations keep file order
        r = rank[en]
        splits["test" if r < n_test else "valid" if r < n_test + n_valid else "train"].append((en, fr))
    return splits


def group(pairs):
    """[(English, [its French translations])], in order of first appearance."""
    refs = {}
    for en, fr in pairs:
        refs.setdefault(en, []).append(fr)
    return list(refs.items())


def first_sentences(pairs, n):
    """The pairs of the first n English sentences (all of them if n is 0)."""
    return [p for en, refs in group(pairs)[:n or None] for p in ((en, fr) for fr in refs)]


def train_tokenizer(texts, vocab_size):
    """One byte-level BPE (Sennrich et al. 2016, on GPT-2's byte alphabet) for both languages: the
    shared vocabulary that lets the source, target and output layers share one embedding (§3.4).
    Bytes, so no input is unknown: an unseen character becomes its UTF-8 bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [PAD, BOS, EOS]
    return tok


def load_tokenizer(saved):
    return Tokenizer.from_str(saved)


def encode(tok, texts):
    return [e.ids for e in tok.encode_batch(list(texts))]


def collate(src, tgt):
    """Token lists -> src (B, S) = x EOS, tgt_in (B, T) = BOS y and tgt_out (B, T) = y EOS, padded."""
    pad = lambda seqs: pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=PAD)
    return pad([s + [EOS] for s in src]), pad([[BOS] + t for t in tgt]), pad([t + [EOS] for t in tgt])


class Batches:
    """Training batches, similar lengths together (little padding; the paper batches by length too, §5.1),
    in a fresh shuffled order each epoch (seeded by (seed, epoch)). With batch_tokens, the pairs are
    sorted by (source, target) length and cut into batches of at most batch_tokens tokens, padding
    included (source x EOS and target y EOS), as the paper's ~25,000-token batches are; else each
    epoch's permutation is cut into pools of 100 batches of batch_size pairs, each pool sorted by length.
    Batch `index` (counted across epochs) is a pure function of (seed, index): a resumed run sees the
    batches it would have seen."""
    POOL = 100

    def __init__(self, src, tgt, batch_size, seed, batch_tokens=0):
        self.src, self.tgt, self.batch_size, self.seed, self.batch_tokens = src, tgt, batch_size, seed, batch_tokens
        self.src_len, self.tgt_len = np.array([len(s) for s in src]), np.array([len(t) for t in tgt])
        self.lengths = self.src_len + self.tgt_len
        n, pool = len(src), batch_size * self.POOL
        self.per_epoch = (len(self.by_tokens(np.arange(n))) if batch_tokens else
                          sum(math.ceil(min(pool, n - i) / batch_size) for i in range(0, n, pool)))
        self.epoch, self.order = None, None

    def by_tokens(self, perm):
        """perm sorted by (source, target) length (stable: equal lengths keep perm's order), then cut into
        batches of at most batch_tokens padded tokens; the cuts depend on the lengths alone, so every
        epoch has as many batches."""
        perm = perm[np.lexsort((self.tgt_len[perm], self.src_len[perm]))]
        batches, start, longest_src, longest_tgt = [], 0, 0, 0
        for j, (S, T) in enumerate(zip(self.src_len[perm] + 1, self.tgt_len[perm] + 1)):  # x EOS, BOS y
            s, t = max(longest_src, S), max(longest_tgt, T)
            if j > start and (j - start + 1) * (s + t) > self.batch_tokens:  # pair j opens the next batch
                batches.append(perm[start:j])
                start, s, t = j, S, T
            longest_src, longest_tgt = s, t
        return batches + [perm[start:]]

    def batches_of(self, epoch):
        rng = np.random.default_rng((self.seed, epoch))
        perm, pool, bs = rng.permutation(len(self.src)), self.batch_size * self.POOL, self.batch_size
        if self.batch_tokens:
            batches = self.by_tokens(perm)
        else:
            batches = []
            for i in range(0, len(perm), pool):
                chunk = perm[i:i + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches += [chunk[j:j + bs] for j in range(0, len(chunk), bs)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def __call__(self, index):
        epoch, k = divmod(index, self.per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, self.batches_of(epoch)
        ids = self.order[k]
        return collate([self.src[i] for i in ids], [self.tgt[i] for i in ids])


def eval_batches(src, tgt, batch_size):
    """All pairs once, sorted by length, in batches."""
    order = sorted(range(len(src)), key=lambda i: len(src[i]) + len(tgt[i]))
    return [collate([src[i] for i in order[j:j + batch_size]], [tgt[i] for i in order[j:j + batch_size]])
            for j in range(0, len(order), batch_size)]
