"""Tokenizers: byte-level by default (nothing to download), or a local Hugging Face folder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from swarmfold.errors import UserError
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


def is_tokenizer_file(name: str) -> bool:
    """The files of a Hugging Face folder that make up its tokenizer (not the weights or the model card)."""
    return (name.startswith(("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece",
                             "chat_template", "sentencepiece"))
            or name.endswith((".tiktoken", ".model")))


def tokenizer_sha256(folder: str | Path) -> str:
    """sha256 over the tokenizer files of a folder (sorted names, each name and its bytes)."""
    root = Path(folder)
    files = sorted(f for f in root.iterdir() if f.is_file() and is_tokenizer_file(f.name))
    if not files:
        raise TokenizerError(f"{root}: no tokenizer files (tokenizer.json, vocab.json, tokenizer.model ...); "
                             "save the tokenizer into the folder with tokenizer.save_pretrained(folder)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class TokenizerError(UserError):
    """A tokenizer folder is missing, unreadable, or not the one the spec names."""


class HFTokenizer:
    """A tokenizer folder on disk, loaded with `local_files_only` (never a hub download).

    With `sha256` (the spec's tokenizer.sha256), the folder's tokenizer files must hash to it.
    """

    def __init__(self, path: str, sha256: str = ""):
        from transformers import AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer.path: {path} is not a folder; point it at a saved tokenizer")
        digest = tokenizer_sha256(folder)
        if sha256 and digest != sha256:
            raise TokenizerError(f"tokenizer.path: the tokenizer files in {folder} hash to {digest[:16]}…, the spec's "
                                 f"tokenizer.sha256 is {sha256[:16]}…; this is a different tokenizer from the one "
                                 "the swarm trains with: point tokenizer.path at an exact copy of that folder")
        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self.eos_id = int(eos) if eos is not None else self.vocab_size - 1
        self.ident = "hf-" + digest[:16]

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        dtype = np.uint16 if self.vocab_size <= 65535 else np.uint32
        return np.asarray(ids, dtype=dtype)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def load_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if spec.kind == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec.path, spec.sha256)
