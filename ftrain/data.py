"""The recipe's data: windows of tokens, sharded across ranks, read through ``StatefulDataLoader``.

Two formats (``data.format``): ``text``, the bytes of text files as tokens, and ``tokens``, a flat binary file
of ``uint16``/``uint32`` token ids (nanoGPT's ``train.bin``), memory-mapped. The built-in corpus is the top-level modules of the Python standard library (``Lib/*.py`` of the interpreter
that runs ftrain): real text, present offline on every machine that can run us.

Sharding uses one global order per epoch (a seeded permutation of fixed-length windows). Every optimizer step
consumes the next ``world_size * batch_size`` windows of that order, rank ``r`` taking the ``r``-th slice. The
position is therefore one global number (epoch, cursor) that is the same on every rank.
"""

from __future__ import annotations

import os
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ftrain.config import DataConfig
from ftrain.gc_policy import enable_in_worker

# torchdata 0.11 calls a torch API that torch 2.13 deprecated; nothing for our users to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".csv", ".html", ".c", ".h"}


def builtin_corpus_files() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted so every run sees the same order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def corpus_files(path: str) -> list[Path]:
    """Files named by ``data.path``: a text file, a directory of text files, or '' for the built-in corpus."""
    if not path:
        return builtin_corpus_files()
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"data.path {root} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        return files
    raise ValueError(f"data.path {root} does not exist")


TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SCAN_LIMIT_BYTES = 256 << 20  # token files up to this size are scanned for ids >= vocab_size before training


def open_token_file(path: str, dtype: str) -> np.memmap:
    """A flat binary file of ``dtype`` token ids (nanoGPT's ``train.bin``), memory-mapped read-only; ``ValueError``
    with one line if it is missing, empty, or not a whole number of tokens."""
    file = Path(path).expanduser()
    if not path or not file.is_file():
        raise ValueError(f"data.path {path or '(empty)'}: no such token file (data.format=tokens)")
    size = file.stat().st_size
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    if size == 0:
        raise ValueError(f"data.path {path} is empty")
    if size % itemsize:
        raise ValueError(f"data.path {path} has {size} bytes, not a whole number of {dtype} tokens ({itemsize} bytes each)")
    return np.memmap(file, dtype=TOKEN_DTYPES[dtype], mode="r")


def check_data(cfg: Any) -> None:
    """The data module's checks before anything is written (called by ``ftrain.preflight``): for
    ``data.format=tokens``, a readable token file holding at least one step's windows, with ids below
    ``model.vocab_size`` (scanned when the file is at most 256 MB; larger files are checked window by window)."""
    if cfg.data.format != "tokens":
        return
    tokens = open_token_file(cfg.data.path, cfg.data.dtype)
    seq_len = cfg.model.seq_len
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"data.path {cfg.data.path} has {len(tokens)} tokens, fewer than one window of model.seq_len + 1 = {seq_len + 1}")
    global_batch = cfg.train.batch_size * int(os.environ.get("WORLD_SIZE", "1") or 1)
    if windows < global_batch:
        raise ValueError(
            f"data.path {cfg.data.path} has {windows} windows of model.seq_len={seq_len}, fewer than one step needs "
            f"(train.batch_size x ranks = {global_batch})"
        )
    if tokens.nbytes <= _SCAN_LIMIT_BYTES:
        largest = int(tokens.max())
        if largest >= cfg.model.vocab_size:
            raise ValueError(f"data.path {cfg.data.path} holds token id {largest}, not below model.vocab_size={cfg.model.vocab_size}")


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens of a memory-mapped token file: inputs and next-token targets."""

    def __init__(self, tokens: np.memmap, seq_len: int, vocab_size: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.length = (len(tokens) - 1) // seq_len
        if self.length < 1:
            raise ValueError(f"token file of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        if int(chunk.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(chunk.max())} at window {index} is not below model.vocab_size={self.vocab_size}")
        return index, chunk[:-1], chunk[1:]


def load_tokens(path: str) -> torch.Tensor:
    """All files concatenated as one uint8 tensor of byte tokens."""
    blob = b"".join(p.read_bytes() for p in corpus_files(path))
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class WindowDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.length = (len(tokens) - 1) // seq_len
        if self.length < 1:
            raise ValueError(f"corpus of {len(tokens)} bytes is shorter than one sequence of {seq_len + 1}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        chunk = self.tokens[start : start + self.seq_len + 1].long()
        return index, chunk[:-1], chunk[1:]


class GlobalOrderSampler(Sampler[int]):
    """Endless sampler: epoch after epoch of one seeded global order, each rank reading its slice of each step.

    Its iterator is ``Stateful`` so ``StatefulDataLoader`` saves the position; the position (epoch, cursor) is
    global, so it means the same thing whatever the world size.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch = batch_size * world_size
        if self.global_batch > num_samples:
            raise ValueError(
                f"corpus has {num_samples} sequences, fewer than one global batch "
                f"({world_size} ranks x train.batch_size {batch_size})"
            )
        self.start = {"epoch": 0, "cursor": 0}

    def __iter__(self) -> Iterator[int]:
        return _GlobalOrderIterator(self, **self.start)

    def advance(self, position: dict[str, int]) -> dict[str, int]:
        """The position after one more step from ``position`` (what every rank's iterator will have done)."""
        epoch, cursor = next_position(position["epoch"], position["cursor"], self.global_batch, self.num_samples)
        return {"epoch": epoch, "cursor": cursor + self.global_batch}

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    # The sampler itself carries where iteration starts, so a restored position survives ``iter()``.
    def state_dict(self) -> dict[str, int]:
        return dict(self.start)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = {"epoch": int(state["epoch"]), "cursor": int(state["cursor"])}


def next_position(epoch: int, cursor: int, global_batch: int, num_samples: int) -> tuple[int, int]:
    """Where the next step's global batch starts: the epoch's ragged tail (shorter than a batch) is dropped."""
    if cursor + global_batch > num_samples:
        return epoch + 1, 0
    return epoch, cursor


class _GlobalOrderIterator(Iterator[int]):
    def __init__(self, sampler: GlobalOrderSampler, epoch: int, cursor: int) -> None:
        self.sampler = sampler
        self.epoch = epoch
        self.cursor = cursor  # global samples consumed in this epoch, at a step boundary
        self.offset = 0  # samples of this rank's slice already yielded for the current step
        self.perm = sampler.order(epoch)

    def __next__(self) -> int:
        s = self.sampler
        if self.offset == 0:
            epoch, self.cursor = next_position(self.epoch, self.cursor, s.global_batch, s.num_samples)
            if epoch != self.epoch:
                self.epoch, self.perm = epoch, s.order(epoch)
        index = int(self.perm[self.cursor + s.rank * s.batch_size + self.offset])
        self.offset += 1
        if self.offset == s.batch_size:
            self.cursor += s.global_batch
            self.offset = 0
        return index

    def state_dict(self) -> dict[str, int]:
        if self.offset:
            raise RuntimeError("data position saved in the middle of a batch")
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self.offset = int(state["epoch"]), int(state["cursor"]), 0
        self.perm = self.sampler.order(self.epoch)


def build_dataloader(
    cfg: DataConfig, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int, vocab_size: int = 256
) -> StatefulDataLoader:
    if cfg.format == "tokens":
        dataset: Dataset = TokenWindows(open_token_file(cfg.path, cfg.dtype), seq_len, vocab_size)
    else:
        dataset = WindowDataset(load_tokens(cfg.path), seq_len)
    sampler = GlobalOrderSampler(len(dataset), batch_size, rank, world_size, seed)
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        # A generator of its own keeps the loader from drawing on the global torch RNG, which the resumed
        # run restores: otherwise creating the iterator after a resume would shift every later dropout mask.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        worker_init_fn=enable_in_worker if cfg.num_workers > 0 else None,
    )
