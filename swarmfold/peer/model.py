"""The model: a transformers causal LM built from the spec, with genesis weights from the seed
or from a pretrained folder.

Genesis is our own initialisation, not transformers': every parameter is drawn from a
generator seeded by (genesis seed, "genesis", parameter name), so it is a pure function of
the spec and does not change when transformers changes its init code. transformers' own
initialisation is skipped (it would be overwritten anyway): genesis of the `base` preset
is one `randn` per matrix, no Python loop per element.

A pretrained start (`spec.model.hf_config`) is built from the folder's config and loaded
from its safetensors (never a pickle, never a hub download); its weights must hash to
`spec.model.pretrained_sha256`, the round-0 model hash, or the peer is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from swarmfold.errors import UserError
from swarmfold.peer.seeds import derive_seed, make_generator
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)

# config.json keys that say where a file came from, not what the model is
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "architectures")


class PretrainedError(UserError):
    """A pretrained folder is missing, unloadable, or not the copy the spec names."""


def build_config(spec: Spec, vocab_size: int, eos_id: int) -> PretrainedConfig:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if spec.pretrained:
        return pretrained_config(spec.hf_config_dict())
    m = spec.model
    common = dict(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=spec.data.seq_len,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
        attention_dropout=0.0,
        use_cache=False,
    )
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[m.architecture]
    config = cls(**common)
    config._attn_implementation = "sdpa"
    return config


def pretrained_config(cfg: dict[str, Any]) -> PretrainedConfig:
    """A transformers config from a recorded config.json (the spec's model.hf_config)."""
    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise PretrainedError(f"model.hf_config: transformers {_tf_version()} cannot build a {model_type!r} "
                              f"model ({e}); use a transformers version that knows it") from e
    config.use_cache = False
    config._attn_implementation = "sdpa"
    return config


def _tf_version() -> str:
    import transformers

    return str(transformers.__version__)


@contextlib.contextmanager
def _skip_hf_init() -> Iterator[None]:
    """transformers' random initialisation is skipped: genesis (or a checkpoint) overwrites every weight."""
    from transformers.initialization import no_init_weights

    with torch.random.fork_rng(devices=[]), no_init_weights():  # and the global RNG is left alone
        yield


def build_model(spec: Spec, vocab_size: int, eos_id: int, *, genesis: bool = True) -> torch.nn.Module:
    """The genesis model of the spec (float32, train mode): seeded init, or the pretrained weights.

    With `genesis=False` the weights are left unset (for a caller that loads a checkpoint
    into them next): nothing is drawn and no pretrained folder is read.
    """
    config = build_config(spec, vocab_size, eos_id)
    if spec.pretrained and genesis:
        model = load_pretrained(spec, config)
    else:
        with _skip_hf_init():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()  # skipped with the init: tied embeddings must share one tensor
        if genesis:
            genesis_init(model, spec)
    model.train()
    return model


def genesis_init(model: torch.nn.Module, spec: Spec) -> None:
    std = spec.model.init_std
    residual_std = std / math.sqrt(2 * spec.model.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
                continue
            g = make_generator(derive_seed(spec.seed, "genesis", name))
            s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            torch.randn(p.shape, generator=g, dtype=torch.float32, out=p.data)
            p.mul_(s)


# ---- pretrained starts ---------------------------------------------------------------

def read_pretrained_config(folder: str | Path) -> dict[str, Any]:
    """The architecture part of a Hugging Face folder's config.json (provenance keys dropped)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{folder}: no config.json; point --from-pretrained at a folder written by "
                              "save_pretrained (config.json + model.safetensors)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise PretrainedError(f"{path}: has no model_type; not a transformers model config")
    return {k: v for k, v in cfg.items() if k not in _PROVENANCE_KEYS}


def load_pretrained(spec: Spec, config: PretrainedConfig | None = None, *, check: bool = True) -> torch.nn.Module:
    """The weights of `spec.model.pretrained_path` (float32), refused unless they hash to the spec's."""
    folder = Path(spec.model.pretrained_path)
    model = load_pretrained_folder(folder, config or pretrained_config(spec.hf_config_dict()))
    if check:
        digest = params_sha256(model)
        if digest != spec.model.pretrained_sha256:
            raise PretrainedError(
                f"model.pretrained_path: the weights in {folder} hash to {digest[:16]}…, the spec's genesis "
                f"(model.pretrained_sha256) is {spec.model.pretrained_sha256[:16]}…; this copy of the folder "
                "differs from the one the swarm started from: point model.pretrained_path at an exact copy")
    return model


def load_pretrained_folder(folder: Path, config: PretrainedConfig) -> torch.nn.Module:
    """from_pretrained with safetensors only, local files only, and every weight present."""
    if not folder.is_dir():
        raise PretrainedError(f"model.pretrained_path: {folder} is not a folder; point it at your copy of the "
                              "pretrained model (config.json + *.safetensors)")
    if not any(folder.glob("*.safetensors")):
        raise PretrainedError(f"{folder}: no *.safetensors weights (swarmfold never loads pickled .bin files); "
                              "convert with model.save_pretrained(folder, safe_serialization=True)")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one line of CLI output, not a bar per file
    try:
        with torch.random.fork_rng(devices=[]):
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(folder), config=config, dtype=torch.float32, local_files_only=True, use_safetensors=True,
                output_loading_info=True, trust_remote_code=False)
        model: torch.nn.Module = loaded[0]
        info: dict[str, Any] = loaded[1]
    except (OSError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"{folder}: transformers cannot load it ({e})") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise PretrainedError(f"{folder}: the weights lack {len(missing)} tensors the config needs "
                              f"({', '.join(sorted(missing)[:3])} ...); a genesis must have every weight")
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise PretrainedError(f"{folder}: {len(mismatched)} tensors have the wrong shape for config.json "
                              f"({mismatched[0]!r}); the folder is inconsistent")
    return model


def params_sha256(model: torch.nn.Module) -> str:
    """`tensor_sha256(flat_params(model))` without building the flat copy."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(_bytes_view(p.detach().to(torch.float32)))
    return digest.hexdigest()


def param_layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """All parameters as one flat float32 CPU tensor (a copy), in named_parameters order.

    From a GPU the parameters are copied straight into one pinned CPU buffer, asynchronously,
    then waited for once: no full-size temporary on the device.
    """
    params = list(model.parameters())
    device = params[0].device
    cuda = device.type == "cuda"
    out = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, pin_memory=cuda)
    offset = 0
    for p in params:
        n = p.numel()
        out[offset : offset + n].view_as(p).copy_(p.detach(), non_blocking=cuda)
        offset += n
    if cuda:
        torch.cuda.synchronize(device)
    return out


def set_flat_params(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Load a flat float32 CPU vector into the parameters (on whatever device they live)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if total != flat.numel():
        raise ValueError(f"set_flat_params: vector has {flat.numel()} elements, model has {total}")
    device = params[0].device
    cuda = device.type == "cuda"
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p), non_blocking=cuda)
            offset += n
    if cuda:  # the caller may change `flat` as soon as we return
        torch.cuda.synchronize(device)


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without copying them (a contiguous copy only if it is not)."""
    return t.detach().cpu().contiguous().reshape(-1).numpy().data.cast("B")


def tensor_sha256(flat: torch.Tensor) -> str:
    """Canonical model hash: sha256 of the flat float32 parameter bytes (little-endian); no copy."""
    return hashlib.sha256(_bytes_view(flat)).hexdigest()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spec_from_pretrained(folder: str | Path, base: Spec) -> Spec:
    """A spec whose genesis is the pretrained folder's weights; training settings come from `base`.

    It records the architecture (config.json), the folder's own tokenizer and the sha256 of
    the weights (= the round-0 model hash). The folder's path is a local setting.
    """
    from swarmfold.peer.tokenizer import HFTokenizer, tokenizer_sha256

    root = Path(folder).resolve()
    cfg = read_pretrained_config(root)
    config = pretrained_config(cfg)
    tok_digest = tokenizer_sha256(root)
    tok = HFTokenizer(str(root), tok_digest)
    vocab = int(config.vocab_size)
    if tok.vocab_size > vocab:
        raise PretrainedError(f"{root}: the tokenizer has {tok.vocab_size} tokens but the model only {vocab} "
                              "embeddings; the folder's tokenizer does not belong to its model")
    model = load_pretrained_folder(root, config)
    digest = params_sha256(model)
    heads = int(getattr(config, "num_attention_heads", 0) or base.model.num_heads)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = min(base.data.seq_len, int(max_pos)) if max_pos else base.data.seq_len
    rope = getattr(config, "rope_theta", None)
    if rope is None:
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", base.model.rope_theta)
    model_fields = {
        "architecture": cfg["model_type"],
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                 or 4 * int(config.hidden_size)),
        "num_layers": int(config.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "rope_theta": float(rope),
        "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "hf_config": json.dumps(cfg, sort_keys=True, separators=(",", ":")),
        "pretrained_sha256": digest,
        "pretrained_path": str(root),
    }
    logger.info("pretrained %s: %s, %d parameters, weights sha256 %s", root, cfg["model_type"],
                sum(p.numel() for p in model.parameters()), digest[:16])
    return base.replace(name=f"swarmfold-{root.name}", model=model_fields,
                        tokenizer={"kind": "hf", "path": str(root), "sha256": tok_digest},
                        data={"seq_len": seq_len})
