"""How much memory a spec's peer needs, roughly, per device kind (printed by `swarmfold init`).

The count follows the copies a peer holds (docs/foundation.md, "Memory"), for P parameters:

  on the training device   weights 4P, gradients 4P, AdamW's two moments 8P, activations;
                           with inner.optimizer = 'muon', Muon's one momentum buffer 4M for its
                           M matrix weights and AdamW's 8(P − M) for the rest
  on the CPU, always       θ_r 4P; during averaging Δ 4P and the aggregate 4P; the wire
                           form ~1P (int8; ~0.05P for topk32); the compression residual
                           4P (every codec but none);
                           the outer momentum 4P (outer.momentum > 0)

On the CPU both lists share one RAM. Activations are estimated per micro-batch from the
tensors a llama block keeps for its backward pass (about 8·d + 4·I numbers per token and
layer, d = width, I = MLP width; attention is SDPA, so no T×T matrix is kept) and the
float32 logits with their gradient (3·V per token). It is an estimate for choosing a
device, not a promise: allocator slack and the framework's own buffers come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmfold.averaging import codec
from swarmfold.spec import Spec

GiB = 2**30


@dataclass
class MemoryEstimate:
    parameters: int
    device_bytes: int  # training state + activations, on a GPU / MPS device
    host_bytes: int  # what stays on the CPU while a GPU / MPS device trains
    cpu_bytes: int  # everything, when the CPU trains
    activation_bytes: int

    def lines(self, spec: Spec) -> list[str]:
        mb, t = spec.micro_batch, spec.data.seq_len
        return [
            f"model: {self.parameters / 1e6:,.{1 if self.parameters >= 1e6 else 3}f}M parameters; memory, roughly "
            f"(micro-batch {mb} x {t} tokens, activations {self.activation_bytes / GiB:.1f} GiB):",
            f"  cpu:      {self.cpu_bytes / GiB:6.1f} GiB of RAM",
            f"  cuda/mps: {self.device_bytes / GiB:6.1f} GiB on the device + {self.host_bytes / GiB:.1f} GiB of RAM"
            + ("" if self.device_bytes <= 22 * GiB else
               "  (over a 24 GB GPU: lower inner.micro_batch_size or turn on activation checkpointing)"),
        ]


def count_parameters(spec: Spec, vocab_size: int, eos_id: int) -> int:
    """Exact parameter count, from the model built on the meta device (no memory, no init)."""
    return _counts(spec, vocab_size, eos_id)[0]


def _counts(spec: Spec, vocab_size: int, eos_id: int) -> tuple[int, int]:
    """(all parameters, those Muon trains), from the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    from swarmfold.peer.model import _skip_hf_init, build_config
    from swarmfold.peer.trainer import muon_parameters

    config = build_config(spec, vocab_size, eos_id)
    with _skip_hf_init(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in muon_parameters(model))


def optimizer_state_bytes(p: int, muon: int, optimizer: str) -> int:
    """Inner-optimizer state for P parameters, M of them Muon's: AdamW 8 bytes each, Muon 4 (float32)."""
    return 8 * (p - muon) + 4 * muon if optimizer == "muon" else 8 * p


def _shape(spec: Spec, vocab_size: int) -> tuple[int, int, int, int]:
    """(width, MLP width, layers, vocabulary), from the pretrained config when there is one."""
    cfg = spec.hf_config_dict()
    m = spec.model
    d = int(cfg.get("hidden_size") or cfg.get("n_embd") or m.hidden_size)
    inner = int(cfg.get("intermediate_size") or cfg.get("n_inner") or (m.intermediate_size if not cfg else 4 * d))
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or m.num_layers)
    vocab = int(cfg.get("vocab_size") or vocab_size)
    return d, inner, layers, vocab


def estimate(spec: Spec, vocab_size: int, eos_id: int, *, activation_checkpointing: bool = False) -> MemoryEstimate:
    p, muon = _counts(spec, vocab_size, eos_id)
    d, inner, layers, vocab = _shape(spec, vocab_size)
    tokens = spec.micro_batch * spec.data.seq_len
    act_bytes = 2 if getattr(spec.inner, "precision", "fp32") == "bf16" else 4
    per_layer = tokens * (8 * d + 4 * inner) * act_bytes
    if activation_checkpointing:  # only each layer's input is kept; one layer is recomputed at a time
        blocks = layers * tokens * d * 4 + per_layer
    else:
        blocks = layers * per_layer
    activations = blocks + tokens * vocab * 4 * 3
    # weights, gradients and the optimizer state, all float32 (Muon's Newton–Schulz temporaries are
    # bfloat16 copies of one matrix at a time: left out)
    train_state = 8 * p + optimizer_state_bytes(p, muon, spec.inner.optimizer)
    # θ_r, Δ, the aggregate, and the wire form: ~1 byte a parameter for int8 (counted for the
    # others too, as before), ~0.05 for topk32 (its encoder works on 256 blocks at a time)
    wire = codec.encoded_size(spec.averaging.compression, p) if codec.topk_size(spec.averaging.compression) else p
    host = 4 * p + 4 * p + 4 * p + wire
    if spec.averaging.compression != "none":
        host += 4 * p  # error-feedback residual
    if spec.outer.momentum > 0:
        host += 4 * p
    return MemoryEstimate(parameters=p, device_bytes=train_state + activations + GiB // 2, host_bytes=host,
                          cpu_bytes=train_state + activations + host, activation_bytes=activations)


def train_flops_per_step(spec: Spec, vocab_size: int, eos_id: int) -> float:
    """Training FLOPs of one inner step, roughly: tokens per step x (6 N + 12 L d T) (PaLM, appendix B).

    N counts the parameters that take part in a matmul for every token: all but the input
    embedding (a tied output head is that same tensor and still multiplies, so it stays in);
    L layers, d the width, T the sequence length. Used to carry a measured step time from one
    model to another (scripts/measure_step_time.py, `swarmfold init --from-pretrained`)."""
    d, _inner, layers, vocab = _shape(spec, vocab_size)
    cfg = spec.hf_config_dict()
    tied = bool(cfg.get("tie_word_embeddings", True)) if cfg else spec.model.tie_embeddings
    n = count_parameters(spec, vocab_size, eos_id) - (0 if tied else vocab * d)
    return spec.tokens_per_step * (6.0 * n + 12.0 * layers * d * spec.data.seq_len)
