"""One tokenised corpus read as a deterministic, epoch-shuffled sequence of samples.

Sample order is a pure function of (seed, source, epoch, sample index):
  1. the epoch's shard order is a permutation seeded by (seed, source, epoch);
  2. the shards' tokens, concatenated in that order, are cut into windows of seq_len + 1
     tokens (documents are packed; the epoch's final partial window, < seq_len + 1 tokens, is
     the only thing not used);
  3. windows are shuffled within consecutive blocks of `shuffle_buffer` windows (a bounded
     shuffle buffer), block b by a permutation seeded by (seed, source, epoch, b).
Reading is sequential; positions come from the manifest's token counts, so a resume seeks
straight to its shard and shards before it are never opened.

A bad shard (missing, truncated, corrupt, empty, ids out of range) is reported through the
`BadInput` policy. Under `skip` its unread tokens are MISSING and every sample touching them
becomes a hole that the loader masks out, so sample indices never shift: resumes stay exact and
nothing is repeated or dropped unannounced.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.badinput import BadInput, DataError
from data_pipeline.shards import SUFFIX, Manifest, ShardInfo

MISSING = -1


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class _ShardReader:
    """Sequential reader of one shard's tokens; failures turn the rest into MISSING."""

    def __init__(self, url: str, info: ShardInfo, manifest: Manifest, bad: BadInput):
        self.url, self.info, self.bad = url, info, bad
        self.dtype, self.vocab = np.dtype(manifest.dtype), manifest.vocab_size
        self.pos = 0  # tokens consumed so far
        self.buf = np.empty(0, dtype=np.int32)
        self.failed = False
        local = "://" not in url and not url.startswith("pipe:")
        if local and not Path(url).is_file():
            self._fail("missing (listed in the manifest but not found)")
            self.samples = iter(())
        else:
            # we place samples on ranks and workers ourselves: no splitting by webdataset
            self.samples = iter(wds.WebDataset([url], shardshuffle=False, empty_check=False,
                                               nodesplitter=None, workersplitter=None))

    def _fail(self, why: str) -> None:
        self.failed = True
        self.bad("shards", f"shard {self.url}: {why} at token {self.pos + len(self.buf)} of "
                 f"{self.info.tokens}")

    def _fill(self) -> bool:
        """Append the next chunk to the buffer; False once the shard cannot give more."""
        if self.failed:
            return False
        try:
            sample = next(self.samples)
        except StopIteration:
            self._fail("truncated (ends early)")
            return False
        except Exception as e:  # tarfile.ReadError, OSError, ... from the tar stream
            self._fail(f"unreadable tar ({type(e).__name__}: {e.args[0] if e.args else e})")
            return False
        raw = sample.get(SUFFIX)
        if not isinstance(raw, bytes) or len(raw) % self.dtype.itemsize:
            self._fail(f"sample {sample.get('__key__')!r} has no valid .{SUFFIX} payload")
            return False
        chunk = np.frombuffer(raw, dtype=self.dtype).astype(np.int32)
        if len(chunk) and int(chunk.max()) >= self.vocab:
            self._fail(f"sample {sample.get('__key__')!r} holds ids >= vocab_size {self.vocab}")
            return False
        self.buf = np.concatenate((self.buf, chunk)) if len(self.buf) else chunk
        return True

    def take(self, offset: int, n: int) -> np.ndarray:
        """Tokens [offset, offset + n) of the shard; offset must not be behind the reader."""
        out = np.full(n, MISSING, dtype=np.int32)
        skip = offset - self.pos
        while len(self.buf) < skip + n and self._fill():
            pass
        got = max(min(len(self.buf) - skip, n), 0)
        out[:got] = self.buf[skip:skip + got]
        self.buf = self.buf[min(skip + n, len(self.buf)):]
        self.pos = offset + n
        return out


class ShardSource:
    def __init__(self, directory: str, seq_len: int, seed: int, source_id: int, shuffle: bool,
                 shuffle_buffer: int, bad: BadInput, url_template: str = ""):
        self.dir, self.url_template = directory, url_template
        self.manifest = Manifest.load(directory)
        self.window = seq_len + 1
        self.samples_per_epoch = self.manifest.total_tokens // self.window
        if self.samples_per_epoch < 1:
            raise DataError(f"{directory}: {self.manifest.total_tokens} tokens cannot fill one "
                            f"sample of seq_len + 1 = {self.window} tokens")
        self.seed, self.source_id = seed, source_id
        self.shuffle, self.block = shuffle, shuffle_buffer
        self.bad = bad
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None
        self._reader: tuple[int, int, _ShardReader] | None = None  # (epoch, k, reader)
        self._rows: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def url(self, name: str) -> str:
        """Where shard `name` is read: the directory, or `url_template` with {shard} and {dir}
        substituted -- shell-quoted in a `pipe:` template, which is a command."""
        if not self.url_template:  # absolute: a directory named `pipe:...` stays a directory
            return str(Path(self.dir).absolute() / name)
        if self.url_template.startswith("pipe:"):
            return self.url_template.format(shard=shlex.quote(name), dir=shlex.quote(self.dir))
        url = self.url_template.format(shard=name, dir=self.dir)
        if url.startswith("pipe:"):  # only a template the user wrote as `pipe:` is a command
            raise DataError(f"url_template {self.url_template!r} with directory {self.dir!r} "
                            "makes a pipe: command; write the directory as an absolute path")
        return url

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start token of each position in the order) for `epoch`."""
        if self._plan is None or self._plan[0] != epoch:
            n = len(self.manifest.shards)
            order = (_rng(self.seed, self.source_id, epoch).permutation(n) if self.shuffle
                     else np.arange(n))
            sizes = np.array([self.manifest.shards[i].tokens for i in order], dtype=np.int64)
            self._plan = (epoch, order, np.cumsum(sizes) - sizes)
        return self._plan[1], self._plan[2]

    def sample(self, index: int) -> np.ndarray:
        """Sample `index` of this source: int32 [seq_len + 1], MISSING where unreadable."""
        epoch, j = divmod(index, self.samples_per_epoch)
        b, p = divmod(j, self.block)
        if self._rows is None or self._rows[:2] != (epoch, b):
            first = b * self.block
            n = min(self.block, self.samples_per_epoch - first)
            rows = self._read(epoch, first * self.window, n * self.window).reshape(n, self.window)
            perm = (_rng(self.seed, self.source_id, epoch, b).permutation(n) if self.shuffle
                    else np.arange(n))
            self._rows = (epoch, b, rows, perm)
        return self._rows[2][self._rows[3][p]]

    def _read(self, epoch: int, start: int, count: int) -> np.ndarray:
        order, starts = self.plan(epoch)
        out = np.empty(count, dtype=np.int32)
        done = 0
        while done < count:
            pos = start + done
            k = int(np.searchsorted(starts, pos, side="right")) - 1
            info = self.manifest.shards[order[k]]
            offset = pos - int(starts[k])
            n = min(count - done, info.tokens - offset)
            if self._reader is None or self._reader[:2] != (epoch, k) or self._reader[2].pos > offset:
                self._reader = (epoch, k, _ShardReader(self.url(info.name), info, self.manifest,
                                                       self.bad))
            out[done:done + n] = self._reader[2].take(offset, n)
            done += n
        return out
