"""Tokenizers: byte-level by default (nothing to download), or a local Hugging Face folder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from swarmfold.spec import TokenizerSpec


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    ident: str  # stable identity, part of the token-cache key

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one end-of-text token (256) between documents."""

    vocab_size = 257
    eos_id = 256
    ident = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer folder on disk, loaded with `local_files_only` (never a hub download)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer.path: {path} is not a folder; point it at a saved tokenizer")
        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self.eos_id = int(eos) if eos is not None else self.vocab_size - 1
        digest = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.is_file():
                digest.update(f.name.encode() + b"\0" + f.read_bytes())
        self.ident = "hf-" + digest.hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        dtype = np.uint16 if self.vocab_size <= 65535 else np.uint32
        return np.asarray(ids, dtype=dtype)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def load_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if spec.kind == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec.path)
