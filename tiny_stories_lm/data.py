"""Step 1 of the lesson: text -> stories -> tokens.

TinyStories (Eldan & Li 2023) are short stories written by GPT-3.5/4 with a child's vocabulary.
The official files separate stories with <|endoftext|>; excerpts may use blank lines instead.
split_stories handles both. Two tokenizers turn a story into integers:

- WordTokenizer: words and punctuation, each keeping the space before it (" Lily", " ."), the
  seed's tokenizer. Every character seen in training is in the vocabulary too, so a word never
  seen is spelled out character by character and any text of known characters round-trips.
- bpe_tokenizer: byte-level BPE (Sennrich et al. 2016; GPT-2's byte alphabet) trained with the
  `tokenizers` library: no unknown input at all, and frequent words become one token.

The token stream of a split is every story followed by the end-of-text token, as one array.
"""
import http.client
import os
import re
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
UNK = "<unk>"
HF = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
# Per split, the files looked for in DATA_DIR/tinystories/, in order: the full corpus (downloaded when
# none is there), then an excerpt of it.
FILES = {"train": ["TinyStoriesV2-GPT4-train.txt", "train_excerpt.txt"],
         "valid": ["TinyStoriesV2-GPT4-valid.txt", "valid_excerpt.txt"]}


def download(url, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    os.replace(tmp, path)  # a broken download never looks like the corpus


def find_split(data_dir, split, full_only=False):
    """The path of a split's text: the first of FILES[split] present (only the full file if full_only),
    else the full file downloaded."""
    folder, names = Path(data_dir) / "tinystories", FILES[split][:1] if full_only else FILES[split]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    path = folder / FILES[split][0]
    try:
        print(f"downloading {HF + path.name} to {path}")
        download(HF + path.name, path)
    except (OSError, http.client.HTTPException) as e:
        raise SystemExit(f"tiny_stories_lm: no {split} text in {folder} (looked for {' or '.join(names)}) and "
                         f"the download from {HF + path.name} failed ({e}); save that file as {path}, or pass "
                         f"--data-dir DIR with DIR/tinystories/ holding {'it' if full_only else 'one of them'}")
    return path


def split_stories(text):
    """Stories separated by <|endoftext|> (the official files) or, without it, by blank lines."""
    parts = text.split(EOT) if EOT in text else re.split(r"\n[ \t]*\n", text)
    return [s.strip() for s in parts if s.strip()]


def read_stories(data_dir, split, max_chars=0, full_only=False):
    """The split's stories, the first max_chars characters of the file only if max_chars > 0."""
    path = find_split(data_dir, split, full_only)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(max_chars) if max_chars else f.read()
    stories = split_stories(text)
    if max_chars and len(text) == max_chars and len(stories) > 1:
        stories = stories[:-1]  # the last one was (probably) cut
    if not stories:
        raise SystemExit(f"tiny_stories_lm: {path} holds no story")
    return stories


class WordTokenizer:
    """Words and punctuation with their leading space; characters as the fallback."""
    PIECE = re.compile(r" ?\w+| ?[^\w\s]|\s")

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.eot, self.unk = self.stoi[EOT], self.stoi[UNK]

    @classmethod
    def train(cls, stories, vocab_size):
        counts = Counter(p for s in stories for p in cls.PIECE.findall(s))
        chars = sorted({c for s in stories for c in s})
        words = [w for w, _ in counts.most_common() if len(w) > 1][:max(0, vocab_size - 2 - len(chars))]
        return cls([EOT, UNK] + chars + words)

    def __len__(self):
        return len(self.itos)

    def encode(self, text):
        ids = []
        for piece in self.PIECE.findall(text):
            if piece in self.stoi:
                ids.append(self.stoi[piece])
            else:  # a word outside the vocabulary: its characters
                ids.extend(self.stoi.get(c, self.unk) for c in piece)
        return ids

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def to_json(self):
        return {"kind": "word", "itos": self.itos}


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library, with the same interface as WordTokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eot = tokenizer.token_to_id(EOT)

    @classmethod
    def train(cls, stories, vocab_size):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(stories, trainer)
        return cls(tok)

    def __len__(self):
        return self.tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def to_json(self):
        return {"kind": "bpe", "json": self.tok.to_str()}


TOKENIZERS = {"word": WordTokenizer, "bpe": BPETokenizer}


def train_tokenizer(kind, stories, vocab_size):
    return TOKENIZERS[kind].train(stories, vocab_size)


def load_tokenizer(saved):
    if saved["kind"] == "word":
        return WordTokenizer(saved["itos"])
    return BPETokenizer(Tokenizer.from_str(saved["json"]))


def piece_strings(tok, text):
    """The text cut into its tokens, as strings, for `main.py tokenize`."""
    if isinstance(tok, BPETokenizer):
        return [text[a:b] for a, b in tok.tok.encode(text).offsets]
    return [tok.itos[i] for i in tok.encode(text)]


def encode_stories(tok, stories, batch=4096):
    """One array: story, EOT, story, EOT, ... (uint16 while the vocabulary fits, as llama2.c stores it)."""
    dtype = np.uint16 if len(tok) <= 65536 else np.int32
    chunks = []
    for i in range(0, len(stories), batch):
        part = stories[i:i + batch]
        encoded = ([e.ids for e in tok.tok.encode_batch(part)] if isinstance(tok, BPETokenizer)
                   else [tok.encode(s) for s in part])
        chunks.append(np.fromiter((i for ids in encoded for i in ids + [tok.eot]), dtype=dtype))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def characters(stories):
    """Characters the token stream stands for: the stories plus one separator after each."""
    return sum(len(s) + 1 for s in stories)


def get_batch(data, batch_size, block_size, key):
    """x, y of shape (B, T), y shifted by one. The windows are a pure function of `key`
    (seed, step, rank, micro-step), so a resumed run sees exactly the batches it would have seen."""
    rng = np.random.default_rng(key)
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    w = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T + 1)
    return w[:, :-1], w[:, 1:]


def eval_windows(data, block_size, batch_size, max_tokens=0):
    """The stream (its first max_tokens, if > 0) as consecutive windows that predict every token
    but the first once, in batches; the last window is shorter when the stream does not divide."""
    data = torch.from_numpy((data[:max_tokens + 1] if max_tokens else data).astype(np.int64))
    starts = list(range(0, len(data) - 1, block_size))
    windows = [(data[s:s + block_size], data[s + 1:s + block_size + 1]) for s in starts]
    full = [w for w in windows if len(w[1]) == block_size]
    batches = [(torch.stack([x for x, _ in full[i:i + batch_size]]), torch.stack([y for _, y in full[i:i + batch_size]]))
               for i in range(0, len(full), batch_size)]
    if len(full) < len(windows):
        x, y = windows[-1]
        batches.append((x[:len(y)][None], y[None]))
    return batches
