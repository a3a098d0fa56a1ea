"""Data: a character corpus for language modelling, and the synthetic tasks of
the LSTM paper (the adding problem, the copy/memory task), generated from a seed.

    corpus = CharCorpus.from_file("input.txt")          # or CharCorpus.python_stdlib()
    for inputs, targets, new_epoch in corpus.batches(seq_len, batch, start_step):
        ...                                              # inputs, targets: [T, B] int32

``batches`` cuts the text into B parallel streams and walks them T characters
at a time (truncated BPTT: the hidden state carries from one chunk to the next
and is reset when ``new_epoch`` is True).
"""

import os
import sysconfig

import numpy as np

DEFAULT_STDLIB_BYTES = 4_000_000


class DataError(ValueError):
    """Unusable data; the message says what and where."""


class CharCorpus:
    """A text as ids [N] int32 over its sorted character vocabulary (``vocab``
    given: that vocabulary, which must hold every character of the text)."""

    def __init__(self, text, source="<text>", vocab=None):
        if not text:
            raise DataError(f"{source}: the text is empty")
        self.source = source
        self.vocab = sorted(set(text)) if vocab is None else list(vocab)
        self.index = {ch: i for i, ch in enumerate(self.vocab)}
        self.ids = np.fromiter((self.index[ch] for ch in text), np.int32, len(text))

    @classmethod
    def _of_ids(cls, ids, vocab, source):
        """A corpus over ``vocab`` from its ids (a part of another corpus): no re-encoding."""
        corpus = cls.__new__(cls)
        corpus.source, corpus.vocab, corpus.ids = source, vocab, ids
        corpus.index = {ch: i for i, ch in enumerate(vocab)}
        return corpus

    def split(self, fraction):
        """(training part, held-out part): the held-out part is the last ``fraction``
        of the text (at least 2 characters: one input, one target), both over the
        whole text's vocabulary; fraction 0 gives (self, None)."""
        if fraction == 0:
            return self, None
        n_val = max(2, int(round(len(self.ids) * fraction)))
        if len(self.ids) - n_val < 2:
            raise DataError(f"--val-fraction {fraction}: {self.source} has {len(self.ids)} characters, "
                            f"too few to hold {n_val} out and train on the rest")
        return (CharCorpus._of_ids(self.ids[:-n_val], self.vocab, self.source),
                CharCorpus._of_ids(self.ids[-n_val:], self.vocab, f"the last {n_val} characters of {self.source}"))

    def prime(self, seed, length=4):
        """The first ``length`` characters (at most, and not past the newline) of a
        non-empty line drawn from the text by ``seed``: a prompt the model has seen."""
        newline = self.index.get("\n", -1)
        starts = np.concatenate([[0], np.flatnonzero(self.ids == newline) + 1])  # each line's first character
        starts = starts[starts < len(self.ids)]
        starts = starts[self.ids[starts] != newline]  # non-empty lines
        if not starts.size:
            return self.decode(self.ids[:length])
        start = starts[np.random.default_rng(seed).integers(len(starts))]
        return self.decode(self.ids[start:start + length]).split("\n")[0]

    @classmethod
    def from_file(cls, path):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        if os.path.isdir(path):
            raise DataError(f"{path}: is a directory, expected a UTF-8 text file")
        with open(path, "rb") as f:
            raw = f.read()
        if not raw:
            raise DataError(f"{path}: the file is empty")
        if b"\0" in raw:
            raise DataError(f"{path}: looks binary (contains NUL bytes), expected UTF-8 text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
        return cls(text, path)

    @classmethod
    def python_stdlib(cls, max_bytes=DEFAULT_STDLIB_BYTES):
        """The running interpreter's standard-library sources: no download needed."""
        root = sysconfig.get_paths()["stdlib"]
        parts, size = [], 0
        for name in sorted(os.listdir(root)):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            parts.append(text)
            size += len(text)
            if size >= max_bytes:
                break
        return cls("".join(parts)[:max_bytes], f"Python {sysconfig.get_python_version()} stdlib ({root})")

    def encode(self, text):
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise DataError(f"text: characters not in the vocabulary: {''.join(unknown)[:20]!r}")
        return np.array([self.index[ch] for ch in text], np.int32)

    def decode(self, ids):
        return "".join(self.vocab[int(i)] for i in ids)

    def chunks_per_epoch(self, seq_len, batch):
        stream = (len(self.ids) - 1) // batch
        if stream < seq_len:
            raise DataError(f"--seq-len {seq_len} x --batch {batch} needs more text than {self.source} has "
                            f"({len(self.ids)} characters); use a shorter --seq-len or a smaller --batch")
        return stream // seq_len

    def held_out_batches(self, seq_len, batch):
        """The whole text once, in order, as (inputs [T, B], targets [T, B]) chunks of
        B streams carried from chunk to chunk: the held-out walk of truncated BPTT.
        A text shorter than B*T characters gets fewer streams, then shorter chunks."""
        n = len(self.ids) - 1  # the last character is only a target
        streams = max(1, min(batch, n // seq_len))
        length = n // streams
        T = min(seq_len, length)
        base = np.arange(streams) * length
        for start in range(0, length - T + 1, T):
            idx = base[None, :] + start + np.arange(T)[:, None]
            yield self.ids[idx], self.ids[idx + 1]

    def batch_at(self, step, seq_len, batch):
        """(inputs [T, B], targets [T, B], new_epoch) for training step ``step`` (0-based)."""
        n = self.chunks_per_epoch(seq_len, batch)
        stream = (len(self.ids) - 1) // batch
        k = step % n
        starts = np.arange(batch) * stream + k * seq_len
        idx = starts[None, :] + np.arange(seq_len)[:, None]
        return self.ids[idx], self.ids[idx + 1], k == 0


def adding_problem(n, T, seed):
    """The adding problem: inputs [T, n, 2] (a value in [0, 1), a marker), two
    markers per sequence (one in each half); target [n, 1] the sum of the two
    marked values. Predicting 1.0 always gives MSE ~ 0.167."""
    if T < 2:
        raise DataError(f"T: the adding problem needs T >= 2, got {T}")
    rng = np.random.default_rng(seed)
    values = rng.random((T, n))
    first = rng.integers(0, T // 2, n)
    second = rng.integers(T // 2, T, n)
    markers = np.zeros((T, n))
    markers[first, np.arange(n)] = 1
    markers[second, np.arange(n)] = 1
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values[first, np.arange(n)] + values[second, np.arange(n)])[:, None].astype(np.float32)
    return x, y


def copy_task(n, T, seed, symbols=8, length=10):
    """The copy (memory) task: ``length`` random symbols, T blanks, a go marker,
    then the model must output the symbols. Vocabulary: 0..symbols-1 symbols,
    ``symbols`` blank, ``symbols+1`` go. Returns inputs [L, n], targets [L, n]
    with -1 (ignore) where no output is asked, L = 2*length + T."""
    rng = np.random.default_rng(seed)
    blank, go = symbols, symbols + 1
    L = 2 * length + T
    seq = rng.integers(0, symbols, (length, n))
    inputs = np.full((L, n), blank, np.int32)
    inputs[:length] = seq
    inputs[length + T - 1] = go
    targets = np.full((L, n), -1, np.int32)
    targets[length + T:] = seq
    return inputs, targets
