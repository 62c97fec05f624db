"""The datasets and their batches.

IMDb (Maas et al. 2011): 25,000 train + 25,000 test movie reviews, half positive, read straight
from the Stanford archive DATA_DIR/imdb/aclImdb_v1.tar.gz (downloaded there when missing).
10% of the train reviews, picked by a fixed shuffle, are held out for validation.

Human numbers (fast.ai): 1 to 9,999 in English words, "one . two . three . ...", one token
stream; the first 8,000 numbers train, the rest validate. Generated here, nothing to download.

Characters: makemore's 32,032 names (DATA_DIR/names/names.txt, downloaded there when missing),
80/10/10 by a fixed shuffle, each name framed by '.'; or any text file, its first 90% for training.

At the end, one builder per --task (DATA): the flags -> (loaders for train, valid and maybe test,
vocabulary).
"""
import os
import re
import tarfile
import urllib.request
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_FILE = "imdb/aclImdb_v1.tar.gz"
NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_FILE = "names/names.txt"
IGNORE = -100  # the target at padding: cross-entropy and accuracy skip it
PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1 of every vocabulary here
VALID_SEED = 0               # the validation reviews do not move with --seed, so scores compare


# ---- IMDb

def tokenize(text):
    """Lower-cased words (with their apostrophes) and single punctuation marks; <br /> is a space."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)*|[^\sa-z0-9]", text.lower().replace("<br />", " "))


def download(url, path):
    """url -> path, through a temp file so that an interrupted download leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        urllib.request.urlretrieve(url, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(data_dir, file, url, what):
    """DATA_DIR/file, downloaded from url first if missing; offline, one line naming --data-dir."""
    path = Path(data_dir) / file
    if not path.is_file():
        try:
            print(f"downloading {what} to {path}")
            download(url, path)
        except OSError as e:
            raise SystemExit(f"sequence_models: {what} not found: expected {path} and could not download it "
                             f"({type(e).__name__}); pass --data-dir DIR where DIR/{file} exists")
    return path


def read_imdb(data_dir):
    """{'train': [(text, label)], 'test': [...]} with label 1 = positive, in the archive's order."""
    path = fetch(data_dir, IMDB_FILE, IMDB_URL, "IMDb (84 MB)")
    splits = {"train": [], "test": []}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                parts = member.name.split("/")  # aclImdb/<split>/<pos|neg>/<id>_<rating>.txt
                if len(parts) == 4 and parts[1] in splits and parts[2] in ("pos", "neg") and member.isfile():
                    text = tar.extractfile(member).read().decode("utf-8")
                    splits[parts[1]].append((text, int(parts[2] == "pos")))
    except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise SystemExit(f"sequence_models: {path} is not a readable aclImdb tar.gz ({type(e).__name__}: {e})")
    if not all({label for _, label in reviews} == {0, 1} for reviews in splits.values()):
        raise SystemExit(f"sequence_models: {path} holds no aclImdb/{{train,test}}/{{pos,neg}}/*.txt reviews")
    return splits


def split_valid(reviews, fraction=0.1):
    """A fixed shuffle of the train reviews, its first `fraction` held out: (train, valid)."""
    order = torch.randperm(len(reviews), generator=torch.Generator().manual_seed(VALID_SEED)).tolist()
    n_valid = max(1, int(len(reviews) * fraction))
    return [reviews[i] for i in order[n_valid:]], [reviews[i] for i in order[:n_valid]]


class Vocab:
    """Token <-> id; 0 is padding, 1 stands for every token outside the vocabulary."""

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def build(cls, token_lists, max_size, min_freq=2):
        counts = Counter(t for tokens in token_lists for t in tokens)
        common = [t for t, c in counts.most_common(max_size - 2) if c >= min_freq]
        return cls([PAD, UNK] + common)

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens):
        return [self.stoi.get(t, 1) for t in tokens]

    def decode(self, ids):
        return [self.itos[i] for i in ids]


def encode_reviews(reviews, vocab, max_len):
    """[(text, label)] -> [(ids, label)], each review cut to its last max_len tokens (where the
    verdict usually is); an empty review keeps one <unk> so that it still has a time step."""
    out = []
    for text, label in reviews:
        ids = vocab.encode(tokenize(text))[-max_len:]
        out.append((ids or [1], label))
    return out


class ReviewLoader:
    """Batches of (x, mask, y): x (N, L) ids padded on the right with 0, mask (N, L) True at real
    tokens, y (N,) labels. Reviews of similar length share a batch (sorted within pools of 50
    batches), so little time goes into padding; the batch order is shuffled every epoch from
    (seed, epoch), which makes a resumed run see the same batches as an uninterrupted one.
    All reviews are padded once into one tensor (moved to the training device by to()); a batch
    is an index gather there, cut to its longest review."""

    def __init__(self, encoded, batch_size, shuffle=False, seed=0):
        self.encoded, self.batch_size, self.shuffle, self.seed = encoded, batch_size, shuffle, seed
        self.epoch = 0
        self.lengths = [len(ids) for ids, _ in encoded]
        self.x = torch.zeros(len(encoded), max(self.lengths, default=1), dtype=torch.long)  # (reviews, longest)
        for r, (ids, _) in enumerate(encoded):
            self.x[r, :len(ids)] = torch.tensor(ids)
        self.y = torch.tensor([label for _, label in encoded], dtype=torch.long)

    def to(self, device):
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __len__(self):
        return -(-len(self.encoded) // self.batch_size)

    def batches(self):
        n, bs = len(self.encoded), self.batch_size
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: self.lengths[i])
            return [order[i:i + bs] for i in range(0, n, bs)]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order, pool = torch.randperm(n, generator=g).tolist(), 50 * bs
        order = [i for s in range(0, n, pool) for i in sorted(order[s:s + pool], key=lambda i: self.lengths[i])]
        batches = [order[i:i + bs] for i in range(0, n, bs)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        batches = self.batches()
        self.epoch += 1
        order = torch.tensor([i for idx in batches for i in idx], device=self.x.device).split([len(b) for b in batches])
        for idx, rows in zip(batches, order):  # idx on the host (the lengths), rows on the device (the gather)
            x = self.x[rows, :max(self.lengths[i] for i in idx)]
            yield x, x != 0, self.y[rows]


# ---- Human numbers

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n):
    """1 <= n <= 9999 in fast.ai's words: 8123 -> 'eight thousand one hundred twenty three'."""
    assert 1 <= n <= 9999, n
    words = []
    if n >= 1000:
        words += [ONES[n // 1000], "thousand"]
    if n % 1000 >= 100:
        words += [ONES[n % 1000 // 100], "hundred"]
    r = n % 100
    if r >= 20:
        words += [TENS[r // 10]] + ([ONES[r % 10]] if r % 10 else [])
    elif r:
        words += [ONES[r]]
    return words


def human_numbers(first=1, last=9999, n_train=8000):
    """Token streams: (train words, valid words), numbers separated by '.'."""
    stream = lambda a, b: [w for n in range(a, b + 1) for w in number_words(n) + ["."]]
    return stream(first, first + n_train - 1), stream(first + n_train, last)


class StreamLoader:
    """fastbook's layout for a stateful language model: the stream is cut into N equal rows that
    run side by side, and batch i is the i-th window of bptt tokens of every row, so that row r of
    batch i+1 continues row r of batch i and the hidden state can be carried over.
    Yields (x, y), both (N, bptt), y = x shifted by one token."""

    def __init__(self, ids, batch_size, bptt, n_out=None):
        n_rows = min(batch_size, (len(ids) - 1) // bptt)
        per_row = (len(ids) - 1) // n_rows
        data = torch.tensor(ids[:n_rows * per_row + 1])
        self.x = torch.stack([data[r * per_row:(r + 1) * per_row] for r in range(n_rows)])        # (N, T)
        self.y = torch.stack([data[r * per_row + 1:(r + 1) * per_row + 1] for r in range(n_rows)])
        if n_out:  # a head over the n_out most frequent ids only: the rarer targets become <unk>
            self.y = torch.where(self.y < n_out, self.y, 1)
        self.bptt = bptt

    def to(self, device):
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __len__(self):
        return self.x.size(1) // self.bptt

    def __iter__(self):
        for i in range(0, len(self) * self.bptt, self.bptt):
            yield self.x[:, i:i + self.bptt], self.y[:, i:i + self.bptt]


# ---- Characters

def read_utf8(path, need):
    """The text of a UTF-8 file, newlines as '\\n'; a binary or non-UTF-8 file is one line that says
    what is needed."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SystemExit(f"sequence_models: cannot read {path} ({e.strerror})")
    except UnicodeDecodeError as e:
        raise SystemExit(f"sequence_models: {path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                         f"{need}")
    if "\0" in text:
        raise SystemExit(f"sequence_models: {path} looks binary (it holds NUL bytes); {need}")
    return text.replace("\r\n", "\n").replace("\r", "\n")


NAME = re.compile(r"[^\W\d_]+(?:[-' ][^\W\d_]+)*")  # letters, with single inner hyphens, apostrophes, spaces


def read_names(data_dir):
    """One name per line (blank lines skipped), letters only: '.' is the start/end token."""
    path = fetch(data_dir, NAMES_FILE, NAMES_URL, "makemore's names")
    need = "it needs UTF-8 text, one name of letters per line (like makemore's names.txt)"
    lines = [line.strip() for line in read_utf8(path, need).split("\n")]
    for n, name in enumerate(lines, 1):
        if name and not NAME.fullmatch(name):
            raise SystemExit(f"sequence_models: {path} line {n} is not a name ({name[:30]!r}); {need}")
    names = [name for name in lines if name]
    if len(names) < 10:
        raise SystemExit(f"sequence_models: {path} holds {len(names)} names; it needs one name per line, at least 10")
    return names


def split_names(names, seed=42):
    """80/10/10 by a fixed shuffle: (train, valid, test)."""
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n1, n2 = int(0.8 * len(names)), int(0.9 * len(names))
    return [[names[i] for i in order[a:b]] for a, b in ((0, n1), (n1, n2), (n2, len(names)))]


def char_vocab(text):
    """The text's characters, sorted, with '.' among them (it frames names: makemore's start/end token)."""
    return Vocab([PAD, UNK] + sorted(set(text) | {"."}))


def name_contexts(names, vocab, context):
    """makemore's dataset for the MLP: every character of '.'-framed names with the `context`
    characters before it. -> X (M, context), Y (M,)"""
    dot, X, Y = vocab.stoi["."], [], []
    for name in names:
        window = [dot] * context
        for t in vocab.encode(list(name)) + [dot]:
            X.append(window)
            Y.append(t)
            window = window[1:] + [t]
    return torch.tensor(X), torch.tensor(Y)


def stream_contexts(ids, context):
    """Every position of a token stream with the `context` tokens before it: X (M, context), Y (M,)."""
    ids = torch.tensor(ids)
    return ids[:-1].unfold(0, context, 1), ids[context:]


def epoch_order(n, shuffle, seed, epoch):
    """0..n-1, shuffled as a function of (seed, epoch) if asked: a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)) if shuffle \
        else torch.arange(n)


class TensorLoader:
    """Minibatches (X[b], Y[b]) of example tensors, reshuffled every epoch from (seed, epoch)."""

    def __init__(self, X, Y, batch_size, shuffle=False, seed=0):
        self.X, self.Y, self.batch_size, self.shuffle, self.seed = X, Y, batch_size, shuffle, seed
        self.epoch = 0

    def to(self, device):
        self.X, self.Y = self.X.to(device), self.Y.to(device)
        return self

    def __len__(self):
        return -(-len(self.X) // self.batch_size)

    def __iter__(self):
        order = epoch_order(len(self.X), self.shuffle, self.seed, self.epoch).to(self.X.device)  # one copy an epoch
        self.epoch += 1
        for b in order.split(self.batch_size):
            yield self.X[b], self.Y[b]


class NameLoader:
    """Whole names for a recurrent LM: x = '.' + name, y = name + '.', padded on the right
    (x with '.', y with IGNORE); shuffled every epoch from (seed, epoch). All names are framed and
    padded once (moved to the training device by to()); a batch is an index gather there, cut to
    its longest name + 1."""

    def __init__(self, names, vocab, batch_size, shuffle=False, seed=0):
        ids = [vocab.encode(list(name)) for name in names]
        self.dot, self.batch_size, self.shuffle, self.seed = vocab.stoi["."], batch_size, shuffle, seed
        self.epoch = 0
        self.lengths = [len(i) for i in ids]
        self.x = torch.full((len(ids), max(self.lengths) + 1), self.dot)         # (names, longest + 1)
        self.y = torch.full((len(ids), max(self.lengths) + 1), IGNORE)
        for r, i in enumerate(ids):
            self.x[r, 1:len(i) + 1] = torch.tensor(i, dtype=torch.long)
            self.y[r, :len(i) + 1] = torch.tensor(i + [self.dot])

    def to(self, device):
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __len__(self):
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = epoch_order(len(self.lengths), self.shuffle, self.seed, self.epoch)
        self.epoch += 1
        bs, host = self.batch_size, order.tolist()
        for b, rows in enumerate(order.to(self.x.device).split(bs)):  # one copy to the device an epoch
            T = max(self.lengths[i] for i in host[b * bs:(b + 1) * bs]) + 1                 # longest name + 1
            yield self.x[rows, :T], self.y[rows, :T]


# ---- The tasks: flags -> (loaders, vocabulary)

def imdb_splits(args, vocab=None):
    """The train / valid / test reviews and the vocabulary of the train text: one construction for
    the classifier and its pretrained language model, so that their word ids agree."""
    reviews = read_imdb(args.data_dir)
    train, valid = split_valid(reviews["train"])
    test = reviews["test"]
    if args.limit:  # --quick: a slice of each split, classes still balanced by the shuffle
        g = torch.Generator().manual_seed(1)
        test = [test[i] for i in torch.randperm(len(test), generator=g)[:args.limit // 2].tolist()]
        train, valid = train[:args.limit], valid[:args.limit // 4]
    vocab = vocab or Vocab.build((tokenize(text) for text, _ in train), args.vocab_size)
    return train, valid, test, vocab


def labelled(train, n, seed=0):
    """N labelled reviews, half of each class (positive first): of each class's reviews, in the
    fixed shuffle of split_valid, the seed-th block of N/2 (seed 0: the first N/2), wrapping around;
    so different seeds label different reviews, disjoint while seed * N/2 fits in a class."""
    picked = []
    for label, k in ((1, n // 2), (0, n - n // 2)):
        reviews = [r for r in train if r[1] == label]
        start = seed * k % max(len(reviews), 1)
        picked += (reviews[start:] + reviews[:start])[:k]
    return picked


def imdb_data(args, vocab=None):
    """Loaders for train / valid / test and the vocabulary (built on the train reviews)."""
    train, valid, test, vocab = imdb_splits(args, vocab)
    if args.valid_size:
        valid = valid[:args.valid_size]
    if args.labels:  # only N labelled reviews; the vocabulary still comes from all the text
        train = labelled(train, args.labels, args.seed)
    enc = lambda reviews: encode_reviews(reviews, vocab, args.max_len)
    data = SimpleNamespace(train=ReviewLoader(enc(train), args.batch_size, shuffle=True, seed=args.seed),
                           valid=ReviewLoader(enc(valid), 2 * args.batch_size),
                           test=ReviewLoader(enc(test), 2 * args.batch_size))
    return data, vocab


def imdb_lm_data(args, vocab=None):
    """IMDb as unlabelled text, for pretraining the classifier's encoder: the train split's reviews
    as one token stream (labels unused), the validation reviews' text to validate. The vocabulary
    is the classifier's; the head predicts only the --lm-vocab most frequent words."""
    train, valid, _, vocab = imdb_splits(args, vocab)
    stream = lambda reviews: [i for text, _ in reviews for i in vocab.encode(tokenize(text))]
    return SimpleNamespace(train=StreamLoader(stream(train), args.batch_size, args.bptt, args.lm_vocab),
                           valid=StreamLoader(stream(valid), args.batch_size, args.bptt, args.lm_vocab)), vocab


def numbers_data(args, vocab=None):
    train, valid = human_numbers()
    vocab = vocab or Vocab([w for w in dict.fromkeys(["<pad>", "<unk>"] + train + valid)])
    return SimpleNamespace(train=StreamLoader(vocab.encode(train), args.batch_size, args.bptt),
                           valid=StreamLoader(vocab.encode(valid), args.batch_size, args.bptt)), vocab


def names_data(args, vocab=None):
    """makemore's names: the MLP sees (context, next character) examples, a recurrent LM whole names."""
    train, valid, test = split_names(read_names(args.data_dir))
    vocab = vocab or char_vocab("".join(train))
    if args.model == "mlp":
        loader = lambda names, shuffle: TensorLoader(*name_contexts(names, vocab, args.context), args.batch_size,
                                                     shuffle, args.seed)
    else:
        loader = lambda names, shuffle: NameLoader(names, vocab, args.batch_size, shuffle, args.seed)
    return SimpleNamespace(train=loader(train, True), valid=loader(valid, False), test=loader(test, False)), vocab


def text_data(args, vocab=None):
    """Any text file, character level: its first 90% trains, the rest validates."""
    path = Path(args.text)
    if not path.is_file():
        raise SystemExit(f"sequence_models: --text {path}: no such file")
    text = read_utf8(path, "--text takes a UTF-8 text file")
    cut = int(0.9 * len(text))
    if cut < 2 * max(args.context, args.bptt) + 2:
        raise SystemExit(f"sequence_models: --text {path} is too short ({len(text)} characters) to train on")
    vocab = vocab or char_vocab(text[:cut])
    train, valid = vocab.encode(list(text[:cut])), vocab.encode(list(text[cut:]))
    if args.model == "mlp":
        return SimpleNamespace(train=TensorLoader(*stream_contexts(train, args.context), args.batch_size, True, args.seed),
                               valid=TensorLoader(*stream_contexts(valid, args.context), args.batch_size)), vocab
    return SimpleNamespace(train=StreamLoader(train, args.batch_size, args.bptt),
                           valid=StreamLoader(valid, args.batch_size, args.bptt)), vocab


DATA = {"imdb": imdb_data, "imdb-lm": imdb_lm_data, "numbers": numbers_data, "names": names_data,
        "text": text_data}
