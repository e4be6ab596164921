"""Using a trained model: evaluation on shards, sampling text, and export to a transformers folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from swarmfold.peer.checkpoint import Checkpoint
from swarmfold.peer.local import model_from_checkpoint
from swarmfold.peer.seeds import make_generator
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate(ckpt: Checkpoint, prompt: str, *, tokens: int = 200, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, device: torch.device | str = "cpu") -> str:
    """Sample a continuation of `prompt` (seeded, so the same call gives the same text)."""
    if tokens < 1:
        raise ValueError("--tokens must be at least 1")
    spec, model = model_from_checkpoint(ckpt, device)
    device = next(model.parameters()).device
    tok = load_tokenizer(spec.tokenizer)
    ids = [int(i) for i in tok.encode(prompt)] or [tok.eos_id]
    g = make_generator(seed)
    window = spec.data.seq_len
    out: list[int] = []
    for _ in range(tokens):
        ctx = torch.tensor([(ids + out)[-window:]], dtype=torch.long).to(device)
        logits = model(input_ids=ctx).logits[0, -1].float().cpu()  # sampling on the CPU: same text everywhere
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = torch.where(logits < kth, torch.full_like(logits, -float("inf")), logits)
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if nxt == tok.eos_id:
            break
        out.append(nxt)
    return tok.decode(out)


def export(ckpt: Checkpoint, out: Path) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained(out)` loads (safetensors weights).

    The folder appears whole or not at all.
    """
    from swarmfold.progress import Progress

    bar = Progress(f"export to {out}", total=3, unit="step", interval=10.0, log=logger)
    spec, model = model_from_checkpoint(ckpt)
    bar.update(1)  # the checkpoint is loaded
    if not isinstance(model, PreTrainedModel):
        bar.close()
        raise TypeError(f"export: expected a transformers model, got {type(model).__name__}")
    out = Path(out)
    if out.exists() and not (out / "swarmfold.json").is_file():
        raise FileExistsError(f"{out} exists and is not a swarmfold export; choose a new --out folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_export(ckpt, spec, model, tmp, bar)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if out.exists():  # an earlier export: replace it whole
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write_export(ckpt: Checkpoint, spec: Spec, model: PreTrainedModel, folder: Path, bar: Any) -> None:
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # CLI output stays one line; the bar adds nothing for one file
    if spec.pretrained:  # the folder's own inference setting (training turns the KV cache off)
        model.config.use_cache = bool(spec.hf_config_dict().get("use_cache", True))
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    bar.update(1, B=sum(f.stat().st_size for f in folder.iterdir()))  # the weights are written
    if spec.tokenizer.kind == "hf":
        load_tokenizer(spec.tokenizer)._tok.save_pretrained(str(folder))  # type: ignore[attr-defined]
    bar.update(1)  # the tokenizer and swarmfold.json
    info = {"swarmfold_round": ckpt.round, "model_sha256": ckpt.meta.get("model_sha256"),
            "spec_hash": ckpt.meta.get("spec_hash"), "tokenizer": spec.tokenizer.kind,
            "note": "byte-level tokenizer: token i < 256 is byte i, 256 is end-of-text"
            if spec.tokenizer.kind == "bytes" else "tokenizer files included"}
    (folder / "swarmfold.json").write_text(json.dumps(info, indent=1))
