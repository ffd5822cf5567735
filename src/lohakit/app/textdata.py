"""Local text data for ``lohakit train``: reading .txt/.jsonl/.csv, tokenising, packing, batching.

Nothing here downloads anything. When a model directory ships no tokenizer, text is encoded as
its UTF-8 bytes (ids 0..255): a byte-level model needs ``vocab_size >= 256``.

Batches are a pure function of ``(seed, step)``: the sample at global position ``p`` is
``perm_e[p mod N]`` with ``e = p // N`` and ``perm_e`` a permutation seeded by ``seed + e``.
With ``G`` samples per optimiser step over all processes, rank ``k`` of ``W`` takes positions
``[step·G + k·G/W, step·G + (k+1)·G/W)``. So a resumed run sees exactly the batches an
uninterrupted run would, and ``W`` processes with per-process batch ``G/W`` see the same
global batch as one process with batch ``G``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ByteTokenizer",
    "TextTokenizer",
    "load_tokenizer",
    "read_records",
    "CausalLMData",
    "ClassificationData",
    "SUPPORTED_SUFFIXES",
]

#: Files whose presence in a model directory means "it ships a tokenizer".
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class TextTokenizer(Protocol):
    """What the trainer needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255); no special tokens except an optional EOS id."""

    name = "bytes"
    vocab_size = 256

    def __init__(self, eos_id: int | None = None, pad_id: int = 0) -> None:
        self.eos_id = eos_id
        self.pad_id = pad_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    """Adapter around a transformers tokenizer loaded from a local directory."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.name = type(tok).__name__
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(model_dir: str | os.PathLike | None, eos_id: int | None = None) -> TextTokenizer:
    """The model directory's tokenizer when it has one, else :class:`ByteTokenizer`.

    Args:
        model_dir: A local model directory, or None (import-path models): bytes.
        eos_id: EOS id for the byte tokenizer (the model config's ``eos_token_id`` when < 256).
    """
    if model_dir is not None and any((Path(model_dir) / f).is_file() for f in _TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is an install extra
            raise ImportError("reading a model directory's tokenizer needs transformers: pip install 'lohakit[cli]'") from e
        return _HFTokenizer(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True))
    return ByteTokenizer(eos_id=eos_id if eos_id is not None and 0 <= eos_id < 256 else None)


# ------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------
def _read_txt(path: Path, text_field: str, label_field: str | None) -> list[dict[str, Any]]:
    if label_field is not None:
        raise ValueError(f"{path}: a .txt file has no labels; use .jsonl or .csv with a {label_field!r} field")
    return [{"text": path.read_text(encoding="utf-8")}]


def _read_jsonl(path: Path, text_field: str, label_field: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}:{lineno}: no text field {text_field!r} (found {keys}); set --text-field")
            if not isinstance(obj[text_field], str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(obj[text_field]).__name__}")
            rec = {"text": obj[text_field]}
            if label_field is not None:
                if label_field not in obj:
                    raise ValueError(f"{path}:{lineno}: no label field {label_field!r} (found {sorted(obj)}); set --label-field")
                rec["label"] = obj[label_field]
            out.append(rec)
    return out


def _read_csv(path: Path, text_field: str, label_field: str | None) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        for needed, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
            if needed is not None and needed not in cols:
                raise ValueError(f"{path}: no column {needed!r} (columns: {cols}); set {flag}")
        out = []
        for row in reader:
            rec: dict[str, Any] = {"text": row[text_field] or ""}
            if label_field is not None:
                rec["label"] = row[label_field]
            out.append(rec)
    return out


#: file suffix -> reader(path, text_field, label_field) -> records
_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
SUPPORTED_SUFFIXES = tuple(_READERS)


def check_readable(path: str | os.PathLike, what: str = "data file") -> Path:
    """Raise FileNotFoundError/ValueError/PermissionError naming ``path`` unless it is a readable data file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} is not a file")
    if p.suffix.lower() not in _READERS:
        raise ValueError(f"{what} {str(p)!r}: unsupported type {p.suffix!r}; expected one of {list(SUPPORTED_SUFFIXES)}")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{what} {str(p)!r} is not readable (permission denied)")
    return p


def read_records(path: str | os.PathLike, text_field: str = "text", label_field: str | None = None) -> list[dict[str, Any]]:
    """Records ``{"text": str[, "label": Any]}`` from a .txt, .jsonl or .csv file."""
    p = check_readable(path)
    try:
        return _READERS[p.suffix.lower()](p, text_field, label_field)
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except PermissionError:
        raise PermissionError(f"data file {str(p)!r} is not readable (permission denied)") from None


# ------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------
class _Positions:
    """Deterministic infinite sample order: position p -> index (see module docstring)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perm: dict[int, list[int]] = {}

    def index(self, p: int) -> int:
        epoch, k = divmod(p, self.n)
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perm[epoch][k]

    def batch(self, step: int, micro: int, accum: int, global_batch: int, rank: int, world: int) -> list[int]:
        """Sample indices of rank ``rank``'s share of micro-batch ``micro`` of optimiser step ``step``."""
        per = global_batch // world
        start = (step * accum + micro) * global_batch + rank * per
        return [self.index(start + i) for i in range(per)]


def _n_eval(n: int, eval_fraction: float) -> int:
    """How many trailing items of ``n`` are held out for evaluation (none when n < 2 or fraction 0)."""
    return max(1, round(n * eval_fraction)) if n >= 2 and eval_fraction > 0 else 0


@dataclass
class CausalLMData:
    """Token stream packed into equal blocks of ``seq_len`` tokens: ``train`` and ``eval`` (B, L) tensors."""

    train: torch.Tensor  # (N_train, L) int64
    eval: torch.Tensor  # (N_eval, L) int64, possibly N_eval = 0
    seed: int = 0
    _order: _Positions | None = field(default=None, repr=False)

    @staticmethod
    def pack(texts: Sequence[str], tok: TextTokenizer, seq_len: int) -> torch.Tensor:
        """Concatenate ``tok(text) + [eos]`` over ``texts`` and cut into (N, seq_len) blocks.

        When the stream is shorter than one block but has at least 2 tokens, it is one short block.
        """
        stream: list[int] = []
        for t in texts:
            stream.extend(tok.encode(t))
            if tok.eos_id is not None:
                stream.append(tok.eos_id)
        n = len(stream) // seq_len
        if n == 0:
            return torch.tensor([stream], dtype=torch.long) if len(stream) >= 2 else torch.empty(0, seq_len, dtype=torch.long)
        return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, L)

    @classmethod
    def build(
        cls,
        train_texts: Sequence[str],
        tok: TextTokenizer,
        seq_len: int,
        eval_texts: Sequence[str] | None = None,
        eval_fraction: float = 0.1,
        seed: int = 0,
        source: str = "data set",
    ) -> "CausalLMData":
        blocks = cls.pack(train_texts, tok, seq_len)
        if blocks.shape[0] == 0:
            raise ValueError(f"{source} is empty: fewer than 2 tokens of text")
        if eval_texts is not None:
            ev = cls.pack(eval_texts, tok, seq_len)
        else:
            n = blocks.shape[0]
            n_eval = _n_eval(n, eval_fraction)
            blocks, ev = blocks[: n - n_eval], blocks[n - n_eval :]
        return cls(train=blocks, eval=ev, seed=seed)

    def batch(self, step: int, micro: int, accum: int, global_batch: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s share of micro-batch ``micro`` of optimiser step ``step``."""
        if self._order is None:
            self._order = _Positions(self.train.shape[0], self.seed)
        ids = self.train[self._order.batch(step, micro, accum, global_batch, rank, world)]  # (B, L)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def eval_batches(self, batch_size: int, max_batches: int | None) -> list[dict[str, torch.Tensor]]:
        out = []
        for s in range(0, self.eval.shape[0], batch_size):
            ids = self.eval[s : s + batch_size]  # (B, L)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            if max_batches is not None and len(out) >= max_batches:
                break
        return out


@dataclass
class ClassificationData:
    """Texts with integer labels; batches padded to the longest sequence (right padding)."""

    train_ids: list[list[int]]
    train_labels: list[int]
    eval_ids: list[list[int]]
    eval_labels: list[int]
    label_names: list[str]
    pad_id: int
    seed: int = 0
    _order: _Positions | None = field(default=None, repr=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @staticmethod
    def label_map(labels: Sequence[Any]) -> list[str]:
        """Sorted label names; integer-like labels 0..K-1 keep their value as index."""
        names = sorted({str(v) for v in labels})
        if all(n.lstrip("-").isdigit() for n in names):
            ints = sorted(int(n) for n in names)
            if ints[0] < 0:
                raise ValueError(f"labels must be non-negative integers or strings, got {ints[0]}")
            return [str(i) for i in range(ints[-1] + 1)]
        return names

    @classmethod
    def build(
        cls,
        train: Sequence[dict[str, Any]],
        tok: TextTokenizer,
        seq_len: int,
        eval_records: Sequence[dict[str, Any]] | None = None,
        eval_fraction: float = 0.1,
        seed: int = 0,
        source: str = "data set",
    ) -> "ClassificationData":
        train = [r for r in train if r["text"]]
        if not train:
            raise ValueError(f"{source} is empty: no non-empty text records")
        if eval_records is None:
            n = len(train)
            n_eval = _n_eval(n, eval_fraction)
            train, eval_records = list(train[: n - n_eval]), list(train[n - n_eval :])
        names = cls.label_map([r["label"] for r in list(train) + list(eval_records)])
        index = {n: i for i, n in enumerate(names)}

        def enc(recs: Sequence[dict[str, Any]]) -> tuple[list[list[int]], list[int]]:
            ids = [tok.encode(r["text"])[:seq_len] or [tok.pad_id] for r in recs]
            return ids, [index[str(r["label"])] for r in recs]

        tr_ids, tr_lab = enc(train)
        ev_ids, ev_lab = enc(eval_records)
        return cls(tr_ids, tr_lab, ev_ids, ev_lab, names, tok.pad_id, seed)

    def _collate(self, ids: list[list[int]], labels: list[int]) -> dict[str, torch.Tensor]:
        L = max(len(x) for x in ids)
        inp = torch.full((len(ids), L), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(ids), L, dtype=torch.long)  # (B, L)
        for i, x in enumerate(ids):
            inp[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return {"input_ids": inp, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}

    def batch(self, step: int, micro: int, accum: int, global_batch: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        if self._order is None:
            self._order = _Positions(len(self.train_ids), self.seed)
        idx = self._order.batch(step, micro, accum, global_batch, rank, world)
        return self._collate([self.train_ids[i] for i in idx], [self.train_labels[i] for i in idx])

    def eval_batches(self, batch_size: int, max_batches: int | None) -> list[dict[str, torch.Tensor]]:
        out = []
        for s in range(0, len(self.eval_ids), batch_size):
            out.append(self._collate(self.eval_ids[s : s + batch_size], self.eval_labels[s : s + batch_size]))
            if max_batches is not None and len(out) >= max_batches:
                break
        return out
