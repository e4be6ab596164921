"""The model: a transformers causal LM built from the spec, with genesis weights from the seed.

Genesis is our own initialisation, not transformers': every parameter is drawn from a
generator seeded by (genesis seed, "genesis", parameter name), so it is a pure function of
the spec and does not change when transformers changes its init code.
"""

from __future__ import annotations

import hashlib
import math

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from swarmfold.peer.seeds import derive_seed, make_generator
from swarmfold.spec import Spec


def build_config(spec: Spec, vocab_size: int, eos_id: int) -> PretrainedConfig:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

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


def build_model(spec: Spec, vocab_size: int, eos_id: int) -> torch.nn.Module:
    """The genesis model of the spec (float32, train mode)."""
    config = build_config(spec, vocab_size, eos_id)
    with torch.random.fork_rng(devices=[]):  # transformers' own init must not disturb global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * s)


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


def tensor_sha256(flat: torch.Tensor) -> str:
    """Canonical model hash: sha256 of the flat float32 parameter bytes (little-endian)."""
    return hashlib.sha256(flat.contiguous().numpy().tobytes()).hexdigest()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
