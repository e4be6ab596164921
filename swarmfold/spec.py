"""The swarm spec: a typed tree loaded from TOML, validated as a whole, hashed into the swarm id.

Every peer of a swarm runs the same spec. Its canonical hash (sha256 over a canonical
JSON form of every field that decides the training) is the swarm id: peers with a
different hash are refused. The `network` section (bootstrap addresses) is not part of
the hash, so that publishing a new bootstrap list does not fork the swarm.

Loading never stops at the first problem: every error is collected and reported at
once, each with a hint that says how to fix it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from swarmfold.errors import UserError

logger = logging.getLogger(__name__)

SPEC_VERSION = 1


def _doc(text: str, **kw: Any) -> Any:
    """Attach a one-line explanation to a field; `swarmfold init` writes it as a comment."""
    return field(metadata={"doc": text}, **kw)


@dataclass(kw_only=True)
class ModelSpec:
    architecture: str = _doc(
        "transformers causal-LM architecture: llama, mistral or qwen2", default="llama"
    )
    hidden_size: int = _doc("width of the residual stream", default=128)
    intermediate_size: int = _doc("width of the MLP hidden layer", default=352)
    num_layers: int = _doc("number of transformer blocks", default=4)
    num_heads: int = _doc("attention heads (hidden_size must divide by it)", default=4)
    num_kv_heads: int = _doc("key/value heads for grouped-query attention", default=4)
    init_std: float = _doc("std of the normal genesis initialisation of weight matrices", default=0.02)
    rope_theta: float = _doc("RoPE base frequency", default=10000.0)
    tie_embeddings: bool = _doc("share input embedding and output head", default=False)
    hf_config: str = _doc(
        "a pretrained start's architecture: its config.json as canonical JSON ('' = built from the fields "
        "above; written by `init --from-pretrained`; the shape fields above then only describe it)",
        default="",
    )
    pretrained_sha256: str = _doc(
        "a pretrained start's genesis: sha256 of its weights as swarmfold hashes models (flat float32 in "
        "parameter order, = the round-0 model hash); a peer whose copy hashes differently is refused",
        default="",
    )
    pretrained_path: str = _doc(
        "local folder of the pretrained model (safetensors; a local setting, not part of the swarm id: "
        "each peer points at its own copy, which must hash to pretrained_sha256)",
        default="",
    )


@dataclass(kw_only=True)
class TokenizerSpec:
    kind: str = _doc("'bytes' (256 byte values + end-of-text, nothing to download) or 'hf'", default="bytes")
    path: str = _doc("local Hugging Face tokenizer folder, used when kind = 'hf'", default="")
    sha256: str = _doc(
        "sha256 of the tokenizer's files ('' = none): when set, `path` is a local setting (not part of the "
        "swarm id) and a folder whose tokenizer files hash differently is refused",
        default="",
    )


@dataclass(kw_only=True)
class DataSpec:
    seq_len: int = _doc("tokens per training sequence", default=128)
    val_fraction: float = _doc("fraction of each shard held out for validation", default=0.05)


@dataclass(kw_only=True)
class InnerSpec:
    lr: float = _doc("AdamW peak learning rate of the inner (local) steps", default=2e-3)
    beta1: float = _doc("AdamW beta1", default=0.9)
    beta2: float = _doc("AdamW beta2", default=0.95)
    eps: float = _doc("AdamW epsilon", default=1e-8)
    weight_decay: float = _doc("AdamW decoupled weight decay", default=0.1)
    warmup_steps: int = _doc("linear learning-rate warm-up, in inner steps of this peer", default=20)
    grad_clip: float = _doc("clip the global gradient norm to this (0 = no clipping)", default=1.0)
    batch_size: int = _doc("sequences per inner step", default=16)
    precision: str = _doc("inner-loop arithmetic: 'fp32', or 'bf16' (autocast forward and backward; float32 "
                          "master weights, optimizer state, loss and pseudo-gradient)", default="fp32")
    allow_tf32: bool = _doc("let CUDA matmuls use TF32 (faster on Ampere and later, other bits than float32); "
                            "no effect on the CPU", default=False)
    micro_batch_size: int = _doc(
        "sequences per forward/backward pass; the gradients of batch_size / micro_batch_size passes are "
        "accumulated into one step (0 = the whole batch at once). Changes the float rounding, so hashed",
        default=0,
    )
    lr_schedule: str = _doc(
        "learning rate after the warm-up: 'constant' (no decay: a swarm without an end), 'cosine' (from lr "
        "down to min_lr_ratio * lr at step decay_steps) or 'wsd' (warm-up, stable at lr, then a linear decay "
        "over the last wsd_decay_fraction of decay_steps); the decays stay at the floor after decay_steps",
        default="constant",
    )
    decay_steps: int = _doc(
        "the run's length in inner steps of this peer, over which 'cosine' and 'wsd' decay (warm-up "
        "included); unused by 'constant'", default=0,
    )
    min_lr_ratio: float = _doc("floor of 'cosine' and 'wsd' as a fraction of lr (0 decays to zero)", default=0.1)
    wsd_decay_fraction: float = _doc("fraction of decay_steps that 'wsd' spends decaying (the rest is stable)",
                                     default=0.2)
    optimizer: str = _doc(
        "inner optimizer: 'adamw' (every parameter), or 'muon' (Muon for the hidden weight matrices: attention "
        "and MLP; AdamW with the settings above for the rest: embeddings, the output head, norms, biases)",
        default="adamw",
    )
    muon_lr: float = _doc("optimizer = 'muon': peak lr of the Muon group, on its own scale (muon_adjust_lr = "
                          "'original'; 0.01 measured best for the tiny preset, docs/results.md section 12; 0.02 is "
                          "the usual start for larger models); the warm-up and schedule above apply to it too",
                          default=0.01)
    muon_momentum: float = _doc("optimizer = 'muon': Muon's momentum", default=0.95)
    muon_nesterov: bool = _doc("optimizer = 'muon': Nesterov momentum", default=True)
    muon_weight_decay: float = _doc("optimizer = 'muon': decoupled weight decay of the Muon group (scaled by "
                                    "muon_lr: at muon_lr 0.02, 0.01 decays as much per step as AdamW's 0.1 x 2e-3)",
                                    default=0.01)
    muon_adjust_lr: str = _doc("optimizer = 'muon': how Muon scales its lr by matrix shape: 'original' "
                               "(sqrt(max(1, rows/cols)), Keller Jordan's) or 'match_rms_adamw' (0.2 sqrt(max(rows, "
                               "cols)), Moonshot's: then muon_lr is on AdamW's scale)", default="original")


LR_SCHEDULES = ("constant", "cosine", "wsd")
INNER_OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("original", "match_rms_adamw")
MUON_FIELDS = ("muon_lr", "muon_momentum", "muon_nesterov", "muon_weight_decay", "muon_adjust_lr")
TOPK_SIZES = (8, 16, 32, 64)  # K of the topk<K> codecs: elements kept of every 1024 (a multiple of 4)
COMPRESSIONS = ("none", "fp16", "int8") + tuple(f"topk{k}" for k in TOPK_SIZES) + ("sign1",)


ROUND_MODES = ("steps", "time")


@dataclass(kw_only=True)
class RoundSpec:
    inner_steps: int = _doc("H: inner steps between two averagings (25: see docs/results.md); in time mode, "
                            "the most steps a peer may train in one round (its weight's cap)", default=25)
    mode: str = _doc("'time' (what the presets write): each peer trains as many steps as fit in round.seconds (at "
                     "least min_steps, at most inner_steps), weighted by its tokens; 'steps': every peer trains "
                     "inner_steps steps a round (the old default, and what a spec file without this line gets)",
                     default="steps")
    seconds: float = _doc("time mode: seconds a peer trains each round before it averages, measured on its own "
                          "monotonic clock (rests of a low power level included; peers' clocks are never compared); "
                          "the presets: about inner_steps steps of a CPU laptop (docs/results.md, section 10.1)",
                          default=0.0)
    min_steps: int = _doc("time mode: the fewest steps a peer trains in a round, however slow it is", default=1)
    max_tokens_per_round: int = _doc(
        "cap on the weight (tokens) one peer may claim for a round; 0 = H * batch * seq_len",
        default=0,
    )


@dataclass(kw_only=True)
class OuterSpec:
    kind: str = _doc("'sgd' or 'nesterov'; sgd with lr 1 and momentum 0 is plain averaging", default="sgd")
    lr: float = _doc("outer learning rate applied to the averaged pseudo-gradient", default=1.0)
    momentum: float = _doc("outer momentum (0 for plain averaging)", default=0.0)


@dataclass(kw_only=True)
class AveragingSpec:
    group_size: int = _doc("G: at most this many peers average together", default=8)
    min_group_size: int = _doc(
        "a group smaller than this does not average; 1 lets a lonely peer step alone, more makes it wait",
        default=1,
    )
    matchmaking_timeout: float = _doc("seconds a ready peer waits for others to join its group", default=15.0)
    join_timeout: float = _doc("seconds to wait for a group leader's answer", default=5.0)
    allreduce_timeout: float = _doc("seconds a reducer or member waits for tensor parts", default=60.0)
    commit_timeout: float = _doc("seconds a member waits for the others' digests", default=10.0)
    max_attempts: int = _doc("how many times a round's all-reduce is redone after a failure", default=3)
    max_message_bytes: int = _doc("largest accepted message (bytes), tensor parts included", default=256 * 2**20)
    compression: str = _doc(
        "pseudo-gradient wire format: none, fp16, int8 (blockwise absmax) or topk8/16/32/64 (the K largest "
        "of every 1024 elements, 2-bit values, 10-bit offsets: 20/32/56/104 bytes per 1024, the aggregate re-sparsified "
        "the same way) or sign1 (a sign bit per element and a mean magnitude per 1024: 132 bytes); every "
        "compressed format keeps what it did not send in an error-feedback residual",
        default="int8")
    aggregation: str = _doc("how a reducer combines contributions: mean, trimmed_mean or median", default="mean")
    trim_fraction: float = _doc("fraction cut from each end per coordinate by trimmed_mean", default=0.2)
    record_ttl: float = _doc("seconds a published DHT record (round, model hash, metrics) lives", default=120.0)


@dataclass(kw_only=True)
class VerifySpec:
    tolerance: float = _doc(
        "verify passes a replay from another environment when |replay - claim| / |claim| is at most this",
        default=1e-4,
    )
    snapshot_interval: int = _doc(
        "contribute keeps a parameter + inner-optimizer snapshot every this many steps, for spot checks (0 = none)",
        default=0,
    )
    fraction: float = _doc(
        "fraction of its group's contributions a peer replays each round (needs public_data; 0 = none)",
        default=0.0,
    )
    public_data: str = _doc(
        "manifest hash of the public shard every peer trains on and anyone may replay ('' = data is private)",
        default="",
    )
    deny_ttl: float = _doc("seconds a signed deny record for a peer whose contribution failed replay lives", default=3600.0)
    deny_quorum: int = _doc("distinct peers that must deny a peer before others refuse it", default=1)


@dataclass(kw_only=True)
class NetworkSpec:
    bootstrap_peers: list[str] = _doc(
        "multiaddrs of public peers to join (not part of the swarm id)", default_factory=list
    )
    dht_timeout: float = _doc("seconds one DHT store or get may take before it counts as failed (a local "
                              "setting, not part of the swarm id)", default=20.0)
    fetch_wait: float = _doc("seconds a peer without --data looks for peers serving a verifying swarm's "
                             "public data before it gives up", default=60.0)
    fetch_timeout: float = _doc("seconds a peer serving or fetching public data waits for the other side's "
                                "next answer or chunk before it moves on", default=30.0)
    state_sync_timeout: float = _doc("seconds one download of the model and outer state from one peer may take "
                                     "when joining or catching up (a local setting, not part of the swarm id)",
                                     default=120.0)
    poll_interval: float = _doc("seconds between two reads of the matchmaking declarations while gathering a "
                                "group (a local setting, not part of the swarm id)", default=0.2)
    direct_streams: bool = _doc("accept the all-reduce's tensor bytes on a direct TCP connection beside libp2p "
                                "(authenticated through libp2p, integrity-checked; falls back to libp2p when the "
                                "address cannot be reached). Off: every byte goes through libp2p", default=True)
    data_port: int = _doc("TCP port of the direct streams, on libp2p's listen address (0: any free port; forward "
                          "it, and pass --announce-data, to be reachable from outside a NAT)", default=0)


@dataclass(kw_only=True)
class Spec:
    name: str = _doc("human-readable swarm name (part of the swarm id)", default="swarmfold")
    seed: int = _doc("genesis seed: weights and every random draw derive from it", default=1234)
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    inner: InnerSpec = field(default_factory=InnerSpec)
    round: RoundSpec = field(default_factory=RoundSpec)
    outer: OuterSpec = field(default_factory=OuterSpec)
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    verify: VerifySpec = field(default_factory=VerifySpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)

    # ---- derived values -------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.inner.batch_size * self.data.seq_len

    @property
    def token_cap(self) -> int:
        return self.round.max_tokens_per_round or self.round.inner_steps * self.tokens_per_step

    @property
    def round_min_steps(self) -> int:
        """The fewest inner steps a peer may declare for a round: min_steps in time mode, else H."""
        return self.round.min_steps if self.round.mode == "time" else self.round.inner_steps

    @property
    def micro_batch(self) -> int:
        """Sequences per forward/backward pass (the whole batch when micro_batch_size is 0)."""
        return self.inner.micro_batch_size or self.inner.batch_size

    @property
    def pretrained(self) -> bool:
        return bool(self.model.hf_config)

    def hf_config_dict(self) -> dict[str, Any]:
        """The pretrained start's config.json ({} for a spec-built model)."""
        return dict(json.loads(self.model.hf_config)) if self.model.hf_config else {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hashed_dict(self) -> dict[str, Any]:
        """The fields that define the swarm (everything but `network`)."""
        d = self.to_dict()
        d.pop("network")
        d["model"].pop("pretrained_path")  # local: the weights' hash is what every peer must share
        if d["model"]["hf_config"] == "" and d["model"]["pretrained_sha256"] == "":
            # a spec-built model: hashed exactly as before pretrained starts existed
            d["model"].pop("hf_config")
            d["model"].pop("pretrained_sha256")
        if d["tokenizer"]["sha256"]:
            d["tokenizer"].pop("path")  # local: the files' hash is what every peer must share
        else:
            d["tokenizer"].pop("sha256")
        if d["inner"]["micro_batch_size"] == 0:
            d["inner"].pop("micro_batch_size")  # the whole batch at once: hashed as before micro-batches
        if d["inner"]["lr_schedule"] == "constant":  # no decay: hashed as before schedules existed
            for key in ("lr_schedule", "decay_steps", "min_lr_ratio", "wsd_decay_fraction"):
                d["inner"].pop(key)
        if d["inner"]["optimizer"] == "adamw":  # AdamW everywhere: hashed as before Muon existed
            for key in ("optimizer", *MUON_FIELDS):
                d["inner"].pop(key)
        if d["round"]["mode"] == "steps":  # every peer trains H steps: hashed as before time-boxed rounds
            for key in ("mode", "seconds", "min_steps"):
                d["round"].pop(key)
        d["spec_version"] = SPEC_VERSION
        return d

    @property
    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of `hashed_dict()`: the swarm id."""
        return canonical_hash(self.hashed_dict())

    @property
    def swarm_id(self) -> str:
        return self.spec_hash[:16]

    def replace(self, **sections: Any) -> Spec:
        """Copy with some fields replaced: `spec.replace(round={"inner_steps": 5})`."""
        d = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict):
                d[key].update(value)
            else:
                d[key] = value
        return spec_from_dict(d)


def canonical_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()


class SpecError(UserError):
    """A spec failed to load. `errors` lists every problem, each with a fix hint."""

    def __init__(self, errors: list[str], source: str = "spec"):
        self.errors = errors
        lines = [f"{source}: {len(errors)} problem(s):"] + [f"  - {e}" for e in errors]
        super().__init__("\n".join(lines))


# ---- presets -------------------------------------------------------------------------

# Time mode's round length per preset: about H inner steps of a CPU laptop peer at the daemon's
# default 2 threads, so that such a peer trains ~H steps, a faster one reaches the cap H and a slower
# one trains fewer and still counts. tiny and small are measured (scripts/measure_step_time.py);
# base and 1b are too slow to train here and derived from small's FLOP rate (docs/results.md, 10.1).
PRESET_ROUND_SECONDS = {"tiny": 4.0, "small": 53.0, "base": 19_000.0, "1b": 150_000.0}


def _time_round(name: str, inner_steps: int) -> RoundSpec:
    return RoundSpec(inner_steps=inner_steps, mode="time", seconds=PRESET_ROUND_SECONDS[name], min_steps=1)


def preset(name: str) -> Spec:
    """The model sizes, with byte-level tokens (257-token vocabulary):

    - `tiny` (~0.87M parameters) and `small` (~10M): seconds per round on a laptop CPU;
    - `base` (~114M): GPT-2 small's shape (width 768, 12 layers, 12 heads, MLP 3072, tied
      embeddings) as a llama block;
    - `1b` (~0.97B): Llama-3.2-1B's shape (width 2048, 16 layers, 32 heads, 8 key/value
      heads, MLP 8192, tied embeddings).

    `base` and `1b` are sized for a 24 GB GPU: micro-batches of 8 and 1 sequences of 1024
    tokens keep the activations within it (`swarmfold init` prints the estimate; see
    docs/foundation.md, "Memory").

    Every preset runs time-boxed rounds (`[round] mode = "time"`, `seconds` from
    PRESET_ROUND_SECONDS, at most H steps); `.replace(round={"mode": "steps"})` is the old
    default, where every peer trains exactly H steps.
    """
    if name == "tiny":
        return Spec(round=_time_round(name, 25))
    if name == "small":
        return Spec(
            model=ModelSpec(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=6),
            data=DataSpec(seq_len=256),
            inner=InnerSpec(lr=1e-3, batch_size=16, warmup_steps=50),
            round=_time_round(name, 25),
        )
    if name == "base":
        return Spec(
            model=ModelSpec(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, num_kv_heads=12,
                            tie_embeddings=True),
            data=DataSpec(seq_len=1024),
            inner=InnerSpec(lr=6e-4, batch_size=32, micro_batch_size=8, warmup_steps=100),
            round=_time_round(name, 100),
            averaging=AveragingSpec(allreduce_timeout=300.0, commit_timeout=60.0, matchmaking_timeout=30.0,
                                    record_ttl=300.0),
            network=NetworkSpec(state_sync_timeout=900.0),
        )
    if name == "1b":
        return Spec(
            model=ModelSpec(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                            rope_theta=500000.0, tie_embeddings=True),
            data=DataSpec(seq_len=1024),
            inner=InnerSpec(lr=3e-4, batch_size=32, micro_batch_size=1, warmup_steps=100),
            round=_time_round(name, 100),
            averaging=AveragingSpec(allreduce_timeout=900.0, commit_timeout=120.0, matchmaking_timeout=60.0,
                                    record_ttl=600.0, max_message_bytes=1024 * 2**20),
            network=NetworkSpec(state_sync_timeout=3600.0),
        )
    raise SpecError([f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}"])


PRESETS = ("tiny", "small", "base", "1b")


# ---- loading and validation ----------------------------------------------------------

def _coerce(value: Any, typ: Any, where: str, errors: list[str], example: Any = None) -> Any:
    """Check a TOML value against a field type; ints are accepted for floats.

    `example` (the field's default) goes into the fix hint.
    """
    name = where.split(".")[-1]
    if typ in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}; write e.g. {name} = "
                          f"{example if isinstance(example, int) else 4}")
            return None
        return value
    if typ in ("float", float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{where}: expected a number, got {value!r}; write e.g. {name} = "
                          f"{example if isinstance(example, float) else 0.5}")
            return None
        if not math.isfinite(value):
            errors.append(f"{where}: must be finite, got {value!r}")
            return None
        return float(value)
    if typ in ("bool", bool):
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {value!r}")
            return None
        return value
    if typ in ("str", str):
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}; quote it: \"...\"")
            return None
        return value
    if typ in ("list[str]", list[str]):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f"{where}: expected a list of strings, got {value!r}")
            return None
        return list(value)
    raise TypeError(f"unsupported spec field type {typ!r}")  # programming error, not input


def _load_section(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a table [{where}], got {raw!r}")
        return cls()
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            errors.append(
                f"{where}.{key}: unknown field; known fields are {', '.join(sorted(known))} "
                "(run `swarmfold init` to see a complete spec)"
            )
            continue
        f = known[key]
        section = _SECTIONS.get(key) if cls is Spec else None
        if section is not None:
            kwargs[key] = _load_section(section, value, key, errors)
            continue
        example = f.default if f.default is not dataclasses.MISSING else None
        coerced = _coerce(value, f.type, f"{where}.{key}" if where else key, errors, example)
        if coerced is not None:
            kwargs[key] = coerced
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "model": ModelSpec, "tokenizer": TokenizerSpec, "data": DataSpec, "inner": InnerSpec,
    "round": RoundSpec, "outer": OuterSpec, "averaging": AveragingSpec, "verify": VerifySpec,
    "network": NetworkSpec,
}


# settings that once sat in a hashed section but are purely local: (section, field) -> where they live now
_MOVED_TO_NETWORK = {("averaging", "state_sync_timeout"): "state_sync_timeout"}


def _move_local_settings(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept a spec written before a local setting left the hashed sections: move its value to
    [network] and say how to fix the file (the swarm id is computed without it either way)."""
    moved = None
    for (section, key), new in _MOVED_TO_NETWORK.items():
        old = raw.get(section)
        if isinstance(old, dict) and key in old:
            moved = moved or {**raw, section: dict(old), "network": dict(raw.get("network") or {})}
            value = moved[section].pop(key)
            moved["network"].setdefault(new, value)
            logger.warning("%s: %s.%s is deprecated: it is a local setting and now lives in [network] "
                           "(outside the swarm id); move the line `%s = %s` from [%s] to [network]",
                           source, section, key, new, value, section)
    return moved if moved is not None else raw


def spec_from_dict(raw: dict[str, Any], source: str = "spec") -> Spec:
    errors: list[str] = []
    raw = _move_local_settings(raw, source)
    spec = _load_section(Spec, raw, "", errors)
    errors.extend(validate(spec))
    if errors:
        raise SpecError(errors, source)
    return spec


def load_spec(path: str | Path) -> Spec:
    """Load and validate a TOML spec. Raises SpecError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such file; create one with `swarmfold init --preset tiny --out {path}`"], str(path))
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError([f"not valid TOML: {e}; compare with `swarmfold init` output"], str(path)) from e
    spec = spec_from_dict(raw, str(path))
    return _resolve_local_paths(spec, path.parent)


def _resolve_local_paths(spec: Spec, base: Path) -> Spec:
    """Relative local (unhashed) folders are read relative to the spec file, not the working directory."""
    changes: dict[str, dict[str, str]] = {}
    mp = spec.model.pretrained_path
    if mp and not Path(mp).is_absolute():
        changes["model"] = {"pretrained_path": str((base / mp).resolve())}
    tp = spec.tokenizer.path
    if spec.tokenizer.sha256 and tp and not Path(tp).is_absolute():
        changes["tokenizer"] = {"path": str((base / tp).resolve())}
    return spec.replace(**changes) if changes else spec


def validate(s: Spec) -> list[str]:
    """Every cross-field rule, each message with a fix."""
    e: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            e.append(msg)

    m = s.model
    if m.hf_config:
        e.extend(_validate_pretrained(s))
    else:
        need(m.architecture in ("llama", "mistral", "qwen2"),
             f"model.architecture: {m.architecture!r} is not supported; use 'llama', 'mistral' or 'qwen2' "
             "(or start from a pretrained folder of any architecture: `swarmfold init --from-pretrained PATH`)")
        need(not m.pretrained_sha256 and not m.pretrained_path,
             "model.pretrained_sha256/pretrained_path: set without model.hf_config; write the spec with "
             "`swarmfold init --from-pretrained PATH`")
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        need(getattr(m, name) > 0, f"model.{name}: must be positive, got {getattr(m, name)}")
    if not m.hf_config:  # a spec-built model's shape rules (a pretrained config was checked by transformers)
        _validate_shape(m, need)
    need(0 < m.init_std < 1, f"model.init_std: must be in (0, 1), got {m.init_std}")

    t = s.tokenizer
    need(t.kind in ("bytes", "hf"), f"tokenizer.kind: {t.kind!r} is unknown; use 'bytes' or 'hf'")
    if t.kind == "hf":
        need(bool(t.path), "tokenizer.path: required when tokenizer.kind = 'hf'; point it at a local tokenizer folder")
    need(t.sha256 == "" or _is_sha256(t.sha256),
         f"tokenizer.sha256: {t.sha256!r} is not a sha256 (64 hex digits); leave it '' or rewrite the spec "
         "with `swarmfold init --from-pretrained`")

    d = s.data
    need(d.seq_len >= 8, f"data.seq_len: must be at least 8, got {d.seq_len}")
    need(0 < d.val_fraction < 0.5, f"data.val_fraction: must be in (0, 0.5), got {d.val_fraction}; 0.05 is typical")

    i = s.inner
    need(i.lr > 0, f"inner.lr: must be positive, got {i.lr}; 1e-3 is a safe start")
    need(0 <= i.beta1 < 1 and 0 <= i.beta2 < 1, f"inner.beta1/beta2: must be in [0, 1), got {i.beta1}, {i.beta2}")
    need(i.eps > 0, f"inner.eps: must be positive, got {i.eps}")
    need(i.weight_decay >= 0, f"inner.weight_decay: must be >= 0, got {i.weight_decay}")
    need(i.warmup_steps >= 0, f"inner.warmup_steps: must be >= 0, got {i.warmup_steps}")
    need(i.grad_clip >= 0, f"inner.grad_clip: must be >= 0 (0 disables clipping), got {i.grad_clip}")
    need(i.batch_size > 0, f"inner.batch_size: must be positive, got {i.batch_size}")
    need(i.precision in ("fp32", "bf16"), f"inner.precision: {i.precision!r} is unknown; use 'fp32' or 'bf16'")
    need(0 <= i.micro_batch_size <= max(1, i.batch_size),
         f"inner.micro_batch_size: must be between 0 (the whole batch) and inner.batch_size ({i.batch_size}), "
         f"got {i.micro_batch_size}")
    if i.micro_batch_size > 0 and i.batch_size > 0:
        need(i.batch_size % i.micro_batch_size == 0,
             f"inner.micro_batch_size ({i.micro_batch_size}) must divide inner.batch_size ({i.batch_size}); "
             "choose a divisor, e.g. " + ", ".join(str(k) for k in range(1, i.batch_size + 1)
                                                   if i.batch_size % k == 0)[:60])

    need(i.lr_schedule in LR_SCHEDULES,
         f"inner.lr_schedule: {i.lr_schedule!r} is unknown; use 'constant', 'cosine' or 'wsd'")
    if i.lr_schedule in ("cosine", "wsd"):
        need(i.decay_steps > i.warmup_steps,
             f"inner.decay_steps ({i.decay_steps}) must exceed inner.warmup_steps ({i.warmup_steps}) with "
             f"lr_schedule = {i.lr_schedule!r}: set it to the run's length in inner steps of one peer "
             "(rounds * round.inner_steps)")
        need(0 <= i.min_lr_ratio <= 1, f"inner.min_lr_ratio: must be in [0, 1], got {i.min_lr_ratio}; 0.1 is typical")
    if i.lr_schedule == "wsd":
        need(0 < i.wsd_decay_fraction <= 1,
             f"inner.wsd_decay_fraction: must be in (0, 1], got {i.wsd_decay_fraction}; 0.2 is typical")
        if i.decay_steps > i.warmup_steps and 0 < i.wsd_decay_fraction <= 1:
            start = wsd_decay_start(i.decay_steps, i.wsd_decay_fraction)
            need(start >= i.warmup_steps,
                 f"inner.wsd_decay_fraction ({i.wsd_decay_fraction}) starts the decay at step {start}, inside "
                 f"the warm-up ({i.warmup_steps} steps); lower it or raise inner.decay_steps")
    need(i.decay_steps >= 0, f"inner.decay_steps: must be >= 0, got {i.decay_steps}")
    need(i.optimizer in INNER_OPTIMIZERS, f"inner.optimizer: {i.optimizer!r} is unknown; use 'adamw' or 'muon'")
    if i.optimizer == "muon":
        _validate_muon(i, need)

    r = s.round
    need(r.inner_steps > 0, f"round.inner_steps: must be positive, got {r.inner_steps}; 25 suits the presets")
    need(r.max_tokens_per_round >= 0, f"round.max_tokens_per_round: must be >= 0, got {r.max_tokens_per_round}")
    need(r.mode in ROUND_MODES, f"round.mode: {r.mode!r} is unknown; use 'steps' (every peer trains "
         "inner_steps steps) or 'time' (each trains for round.seconds)")
    if r.mode == "time":
        need(r.seconds > 0 and math.isfinite(r.seconds),
             f"round.seconds: time mode needs a positive round length in seconds, got {r.seconds}; e.g. the "
             "seconds your fastest peers take for inner_steps steps")
        need(1 <= r.min_steps <= r.inner_steps,
             f"round.min_steps: must be in [1, round.inner_steps = {r.inner_steps}], got {r.min_steps}")
    if r.max_tokens_per_round and r.inner_steps > 0 and i.batch_size > 0:
        full = r.inner_steps * i.batch_size * d.seq_len
        need(r.max_tokens_per_round >= full,
             f"round.max_tokens_per_round ({r.max_tokens_per_round}) is below one round's tokens ({full}); "
             f"set it to at least {full}, or 0 for that value")

    o = s.outer
    need(o.kind in ("sgd", "nesterov"), f"outer.kind: {o.kind!r} is unknown; use 'sgd' or 'nesterov'")
    need(o.lr > 0, f"outer.lr: must be positive, got {o.lr}; 1.0 with sgd is plain averaging")
    need(0 <= o.momentum < 1, f"outer.momentum: must be in [0, 1), got {o.momentum}")
    if o.kind == "nesterov":
        need(o.momentum > 0, "outer.momentum: nesterov needs momentum > 0 (e.g. 0.9); or use kind = 'sgd'")

    a = s.averaging
    need(a.group_size >= 1, f"averaging.group_size: must be >= 1, got {a.group_size}")
    need(1 <= a.min_group_size <= max(1, a.group_size),
         f"averaging.min_group_size ({a.min_group_size}) must be between 1 and group_size ({a.group_size})")
    for name in ("matchmaking_timeout", "join_timeout", "allreduce_timeout", "commit_timeout", "record_ttl"):
        need(getattr(a, name) > 0, f"averaging.{name}: must be a positive number of seconds, got {getattr(a, name)}")
    need(a.max_attempts >= 1, f"averaging.max_attempts: must be >= 1, got {a.max_attempts}")
    need(a.max_message_bytes >= 2**16, f"averaging.max_message_bytes: must be >= 65536, got {a.max_message_bytes}")
    need(a.compression in COMPRESSIONS,
         f"averaging.compression: {a.compression!r} is unknown; use one of {', '.join(COMPRESSIONS)} "
         "(topk<K> keeps K of every 1024 elements)")
    need(a.aggregation in ("mean", "trimmed_mean", "median"),
         f"averaging.aggregation: {a.aggregation!r} is unknown; use 'mean', 'trimmed_mean' or 'median'")
    need(0 <= a.trim_fraction < 0.5, f"averaging.trim_fraction: must be in [0, 0.5), got {a.trim_fraction}")
    need(a.record_ttl > a.matchmaking_timeout,
         f"averaging.record_ttl ({a.record_ttl}) must exceed matchmaking_timeout ({a.matchmaking_timeout})")

    v = s.verify
    need(0 < v.tolerance < 1, f"verify.tolerance: must be in (0, 1), got {v.tolerance}; 1e-4 is typical")
    need(v.snapshot_interval >= 0, f"verify.snapshot_interval: must be >= 0 (0 = no snapshots), got {v.snapshot_interval}")
    need(0 <= v.fraction <= 1, f"verify.fraction: must be in [0, 1], got {v.fraction}")
    if v.fraction > 0:
        need(bool(v.public_data), "verify.fraction > 0 needs verify.public_data (the public shard's manifest hash); "
             "peers can only replay contributions made on data they can fetch")
    need(v.deny_ttl > 0, f"verify.deny_ttl: must be a positive number of seconds, got {v.deny_ttl}")
    need(v.deny_quorum >= 1, f"verify.deny_quorum: must be >= 1, got {v.deny_quorum}")

    need(isinstance(s.seed, int) and 0 <= s.seed < 2**63, f"seed: must be an integer in [0, 2^63), got {s.seed}")
    need(bool(s.name.strip()), "name: must not be empty")
    for name in ("dht_timeout", "fetch_wait", "fetch_timeout", "state_sync_timeout", "poll_interval"):
        value = getattr(s.network, name)
        need(isinstance(value, (int, float)) and value > 0,
             f"network.{name}: must be a positive number of seconds, got {value}")
    port = s.network.data_port
    need(isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535,
         f"network.data_port: must be a TCP port between 0 and 65535 (0: any free port), got {port}")
    need(isinstance(s.network.direct_streams, bool),
         f"network.direct_streams: must be true or false, got {s.network.direct_streams!r}")
    for addr in s.network.bootstrap_peers:
        need(addr.startswith("/") and "/p2p/" in addr,
             f"network.bootstrap_peers: {addr!r} is not a full multiaddr; expected /ip4/HOST/tcp/PORT/p2p/PEER_ID")
    return e


def wsd_decay_start(decay_steps: int, fraction: float) -> int:
    """The inner step where a 'wsd' schedule leaves its stable phase."""
    return decay_steps - max(1, round(fraction * decay_steps))


def _validate_muon(i: InnerSpec, need: Any) -> None:
    need(i.muon_lr > 0 and math.isfinite(i.muon_lr),
         f"inner.muon_lr: must be positive, got {i.muon_lr}; 0.01-0.02 suit muon_adjust_lr = 'original'")
    need(0 <= i.muon_momentum < 1, f"inner.muon_momentum: must be in [0, 1), got {i.muon_momentum}; 0.95 is typical")
    need(i.muon_weight_decay >= 0, f"inner.muon_weight_decay: must be >= 0, got {i.muon_weight_decay}")
    need(i.muon_adjust_lr in MUON_ADJUST_LR,
         f"inner.muon_adjust_lr: {i.muon_adjust_lr!r} is unknown; use 'original' or 'match_rms_adamw'")


def _validate_shape(m: ModelSpec, need: Any) -> None:
    if m.num_heads > 0 and m.hidden_size > 0:
        need(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads}); "
             "choose sizes where hidden_size / num_heads is a whole number")
        head_dim = m.hidden_size // m.num_heads
        need(head_dim % 2 == 0, f"model: head size hidden_size/num_heads = {head_dim} must be even for RoPE")
    if m.num_kv_heads > 0 and m.num_heads > 0:
        need(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({m.num_kv_heads})")
    need(m.rope_theta > 0, f"model.rope_theta: must be positive, got {m.rope_theta}")


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _validate_pretrained(s: Spec) -> list[str]:
    """A pretrained start: its config parses, agrees with the shape fields, and its weights are named."""
    m, e = s.model, []
    try:
        cfg = json.loads(m.hf_config)
    except json.JSONDecodeError as exc:
        return [f"model.hf_config: not valid JSON ({exc}); rewrite the spec with `swarmfold init --from-pretrained`"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        return ["model.hf_config: expected a config.json object with a model_type; "
                "rewrite the spec with `swarmfold init --from-pretrained`"]
    if cfg["model_type"] != m.architecture:
        e.append(f"model.architecture ({m.architecture!r}) differs from model.hf_config's model_type "
                 f"({cfg['model_type']!r}); they must agree")
    for name, keys in (("hidden_size", ("hidden_size", "n_embd", "d_model")),
                       ("num_layers", ("num_hidden_layers", "n_layer", "num_layers"))):
        value = next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), None)
        if value is not None and value != getattr(m, name):
            e.append(f"model.{name} ({getattr(m, name)}) differs from model.hf_config ({value}); "
                     "with a pretrained start the config decides: copy its value")
    if not _is_sha256(m.pretrained_sha256):
        e.append(f"model.pretrained_sha256: {m.pretrained_sha256!r} is not a sha256 (64 hex digits); "
                 "rewrite the spec with `swarmfold init --from-pretrained`")
    if not m.pretrained_path:
        e.append("model.pretrained_path: required with model.hf_config; point it at your copy of the pretrained folder")
    if s.tokenizer.kind != "hf":
        e.append("tokenizer.kind: a pretrained start trains with its own tokenizer; set kind = 'hf' and path to "
                 "the pretrained folder")
    return e


# ---- writing -------------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(spec: Spec) -> str:
    """Every field with its value and a one-line comment saying what it does."""
    lines = [
        "# swarmfold swarm spec. Every peer of a swarm runs the same file; its hash is the swarm id.",
        "# Everything but [network] is hashed: change any of it and you start a different swarm.",
        "",
    ]

    def emit(obj: Any) -> None:
        for f in fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                continue
            lines.append(f"# {f.metadata.get('doc', '')}")
            lines.append(f"{f.name} = {_toml_value(v)}")

    emit(spec)
    for f in fields(spec):
        v = getattr(spec, f.name)
        if dataclasses.is_dataclass(v):
            lines += ["", f"[{f.name}]"]
            emit(v)
    return "\n".join(lines) + "\n"
