"""Training batches from plain text: a ``.txt`` file or a directory of them, tokenized with the checkpoint's
tokenizer, cut into random windows of ``seq_len`` tokens. (Named corpora are ``dms_perf.train.data``'s.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch


def read_texts(path) -> list[str]:
    """The text of ``path``: one file, or every ``*.txt`` under a directory (recursively, sorted by path).
    Raises ValueError naming the path when there is nothing to read."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"{path}: a directory without .txt files")
    else:
        raise ValueError(f"{path}: no such file or directory")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise ValueError(f"{file}: cannot read it: {exc.strerror or exc}") from None
    if not any(t.strip() for t in texts):
        raise ValueError(f"{path}: holds no text")
    return texts


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """The documents' token ids end to end (int64, 1-D), each followed by the tokenizer's EOS token if it has one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def random_windows(tokens: torch.Tensor, seq_len: int, batch: int, *, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless ``[batch, seq_len]`` batches of windows at random offsets of ``tokens`` (seeded)."""
    if tokens.numel() < seq_len:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    last_start = tokens.numel() - seq_len
    while True:
        starts = torch.randint(0, last_start + 1, (batch,), generator=generator)
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
