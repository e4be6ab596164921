"""Single-peer commands: init, data, train, eval, generate, export, simulate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from swarmfold.daemon.options import add_data_arguments, int_at_least
from swarmfold.errors import ExitCode
from swarmfold.fsutil import write_atomic

if TYPE_CHECKING:
    from swarmfold.peer.data import DataOptions
    from swarmfold.spec import Spec

logger = logging.getLogger(__name__)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error otherwise, not a traceback)."""
    return int_at_least(text, 1)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=int(os.environ.get("SWARMFOLD_THREADS", "2")),
                   help="intra-op CPU threads; part of the determinism contract (default 2, or $SWARMFOLD_THREADS)")
    add_device(p)


# here, not in peer/device.py: that imports torch, and building the parser must not (a `swarmfold status`
# would take seconds of CPU to import it)
DEVICE_HELP = ("training device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; the model, its "
               "inner optimizer and the inner loop run there, the averaging stays on the CPU (default auto)")


def add_device(p: argparse.ArgumentParser) -> None:
    """`--device auto|cpu|cuda|cuda:N|mps` (default $SWARMFOLD_DEVICE, else auto)."""
    p.add_argument("--device", default=os.environ.get("SWARMFOLD_DEVICE", "auto"), metavar="DEVICE",
                   help=DEVICE_HELP + "; or $SWARMFOLD_DEVICE")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a spec file with every field explained")
    p.add_argument("--preset", choices=["tiny", "small", "base", "1b"], default="tiny",
                   help="model size and training settings (tiny, small: CPUs; base ~114M, 1b ~0.97B: a 24 GB GPU); "
                        "with --from-pretrained only the training settings")
    p.add_argument("--from-pretrained", type=Path, default=None, metavar="PATH",
                   help="a local Hugging Face model folder (config.json, *.safetensors, its tokenizer): "
                        "the swarm's genesis is its weights")
    p.add_argument("--mode", choices=["time", "steps"], default=None,
                   help="[round] mode: 'time' (the presets: each peer trains for round.seconds, at most H steps) "
                        "or 'steps' (every peer trains exactly H steps: reproducible alone, the old default)")
    p.add_argument("--out", required=True, type=Path, help="where to write the TOML spec")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("data", help="prepare data shards")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    s = dsub.add_parser("stdlib", help="the running Python's standard library, split by top-level module")
    s.add_argument("--shards", type=positive_int, required=True, help="how many shard folders to write")
    s.add_argument("--out", type=Path, required=True, help="folder that receives shard-0 .. shard-{N-1}")
    s.set_defaults(handler=cmd_data_stdlib)
    s = dsub.add_parser("prepare", help="check and tokenize files, folders or globs into the token cache; print "
                                        "what is used and what is skipped, and why")
    s.add_argument("--data", required=True, nargs="+", help="files, folders or globs of the shard")
    s.add_argument("--spec", type=Path, default=None,
                   help="the swarm spec (its tokenizer and seq_len; default: the tiny preset)")
    s.add_argument("--json", action="store_true", help="print the whole manifest (files used, files skipped) as JSON")
    add_data_arguments(s)
    s.set_defaults(handler=cmd_data_prepare)

    p = sub.add_parser("train", help="train alone: rounds of H inner steps + the outer step on its own delta")
    p.add_argument("--spec", required=True, type=Path)
    p.add_argument("--data", required=True, nargs="+", help="files, folders or globs of this peer's shard")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--rounds", required=True, type=positive_int, help="train until this many rounds are done")
    p.add_argument("--peer-id", default="local", help="seed-schedule identity of this peer (default 'local')")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, the same bits (not in the spec)")
    _add_threads(p)
    add_data_arguments(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint on shards")
    p.add_argument("target", help="a workdir (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--max-windows", type=positive_int, default=None, help="evaluate at most this many windows")
    p.add_argument("--json", action="store_true")
    _add_threads(p)
    add_data_arguments(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("target")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", type=positive_int, default=200, help="tokens to sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("export", help="write a transformers model folder (from_pretrained loads it)")
    p.add_argument("target")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("simulate", help="one peer per shard in one process, averaged in-process")
    p.add_argument("--spec", required=True, type=Path)
    p.add_argument("--data", required=True, nargs="+", help="one path per peer (a shard folder or file)")
    p.add_argument("--rounds", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--peer-ids", nargs="+", default=None, help="seed-schedule ids, one per shard")
    p.add_argument("--steps-from", nargs="+", type=Path, default=None, metavar="LOG",
                   help="the inner steps each peer trained in each round, from the round logs (rounds.jsonl, or "
                        "the workdirs holding them) of a time-mode swarm's peers: reproduces its rounds bit for bit")
    _add_threads(p)
    p.set_defaults(handler=cmd_simulate)


def cmd_init(args: argparse.Namespace) -> int:
    from swarmfold.spec import preset, to_toml

    if args.out.exists() and not args.force:
        print(f"swarmfold init: {args.out} exists; pass --force to overwrite", file=sys.stderr)
        return ExitCode.BAD_INPUT
    spec = preset(args.preset)
    source = f"preset {args.preset}"
    if args.from_pretrained is not None:
        from swarmfold.peer.model import spec_from_pretrained

        print(f"reading {args.from_pretrained} (weights, config, tokenizer) ...", flush=True)
        spec = spec_from_pretrained(args.from_pretrained, spec)
        source = f"genesis {spec.model.architecture} from {spec.model.pretrained_path}, " \
                 f"weights sha256 {spec.model.pretrained_sha256[:16]}…, training settings of preset {args.preset}"
        if spec.round.mode == "time":
            spec = _scaled_round_seconds(preset(args.preset), spec)
            source += f", round.seconds {spec.round.seconds:g} (the preset's, scaled by training FLOPs per step)"
    if args.mode is not None:
        spec = spec.replace(round={"mode": args.mode})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, to_toml(spec))
    print(f"wrote {args.out} ({source}, swarm id {spec.swarm_id})")
    for line in _memory_lines(spec):
        print(line)
    return ExitCode.OK


def _scaled_round_seconds(base: Spec, spec: Spec) -> Spec:
    """A pretrained start's time-mode round: the preset's round.seconds (about H steps of its own model
    on a CPU laptop) times the ratio of the two models' training FLOPs per step, rounded up to a second."""
    import math

    from swarmfold.peer.memory import train_flops_per_step
    from swarmfold.peer.tokenizer import load_tokenizer

    b, t = load_tokenizer(base.tokenizer), load_tokenizer(spec.tokenizer)
    ratio = train_flops_per_step(spec, t.vocab_size, t.eos_id) / train_flops_per_step(base, b.vocab_size, b.eos_id)
    return spec.replace(round={"seconds": float(math.ceil(base.round.seconds * ratio))})


def _memory_lines(spec: Spec) -> list[str]:
    from swarmfold.peer.memory import estimate
    from swarmfold.peer.tokenizer import load_tokenizer

    tok = load_tokenizer(spec.tokenizer)
    return estimate(spec, tok.vocab_size, tok.eos_id).lines(spec)


def cmd_data_stdlib(args: argparse.Namespace) -> int:
    from swarmfold.peer.corpus import write_stdlib_shards

    for path in write_stdlib_shards(args.shards, args.out):
        print(path)
    return ExitCode.OK


def data_options(args: argparse.Namespace) -> DataOptions:
    from swarmfold.peer.data import DataOptions

    return DataOptions(text_field=args.text_field, max_file_mb=args.max_file_mb, strict=args.strict_data)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from swarmfold.peer.data import Shard
    from swarmfold.peer.tokenizer import load_tokenizer
    from swarmfold.spec import load_spec, preset

    spec = load_spec(args.spec) if args.spec else preset("tiny")
    shard = Shard(args.data, load_tokenizer(spec.tokenizer), seq_len=spec.data.seq_len,
                  val_fraction=spec.data.val_fraction, options=data_options(args))
    if args.json:
        print(json.dumps(shard.manifest_document(), indent=1))
        return ExitCode.OK
    for s in shard.skipped:
        print(f"skipped {s.name}: {s.reason}")
    print(shard.summary())
    return ExitCode.OK


def cmd_train(args: argparse.Namespace) -> int:
    from swarmfold.averaging.base import SoloAverager
    from swarmfold.peer.checkpoint import CheckpointError, list_checkpoints
    from swarmfold.peer.local import LocalPeer
    from swarmfold.peer.trainer import set_threads
    from swarmfold.spec import load_spec

    spec = load_spec(args.spec)
    set_threads(args.threads)
    peer = LocalPeer(spec, args.data, peer_id=args.peer_id, threads=args.threads, workdir=args.workdir,
                     keep_checkpoints=args.keep, device=args.device,
                     activation_checkpointing=args.activation_checkpointing,
                     data_options=data_options(args))
    print(peer.shard.summary())
    if peer.resume():
        print(f"resuming at round {peer.round}")
    elif list_checkpoints(args.workdir):
        # Starting over would let pruning delete the fresh checkpoints in favour of the damaged ones.
        raise CheckpointError(f"{args.workdir}: every checkpoint is damaged (see the warnings above); "
                              "move checkpoints/ away to start over, or use a fresh --workdir")
    averager = SoloAverager()
    while peer.round < args.rounds:
        report = peer.run_round(averager)
        peer.save()
        print(f"round {report.round:4d}  loss {report.train_loss:.4f}  {report.tokens_per_second:,.0f} tokens/s")
    val = peer.evaluate(max_windows=256)
    print(f"done: {peer.round} rounds, validation loss {val:.4f}, model sha256 {peer.theta_sha256[:16]}")
    return ExitCode.OK


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from swarmfold.peer.checkpoint import resolve_checkpoint
    from swarmfold.peer.data import Shard
    from swarmfold.peer.local import evaluate_model, model_from_checkpoint
    from swarmfold.peer.tokenizer import load_tokenizer
    from swarmfold.peer.trainer import set_threads

    set_threads(args.threads)
    ckpt = resolve_checkpoint(args.target)
    spec, model = model_from_checkpoint(ckpt, args.device)
    shard = Shard(args.data, load_tokenizer(spec.tokenizer), seq_len=spec.data.seq_len,
                  val_fraction=spec.data.val_fraction, options=data_options(args))
    loss = evaluate_model(model, shard, spec.inner.batch_size, args.max_windows, precision=spec.inner.precision)
    result = {"checkpoint": str(ckpt.path), "round": ckpt.round, "val_loss": loss,
              "perplexity": math.exp(loss), "val_windows": len(shard.val_windows),
              "manifest_hash": shard.manifest_hash}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"round {ckpt.round}: validation loss {loss:.4f}, perplexity {math.exp(loss):.2f}")
    return ExitCode.OK


def cmd_generate(args: argparse.Namespace) -> int:
    from swarmfold.peer.checkpoint import resolve_checkpoint
    from swarmfold.peer.inference import generate
    from swarmfold.peer.trainer import set_threads

    set_threads(args.threads)
    text = generate(resolve_checkpoint(args.target), args.prompt, tokens=args.tokens,
                    temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=args.device)
    print(args.prompt + text)
    return ExitCode.OK


def cmd_export(args: argparse.Namespace) -> int:
    from swarmfold.peer.checkpoint import resolve_checkpoint
    from swarmfold.peer.inference import export

    if args.out.exists() and not (args.out / "swarmfold.json").is_file():
        print(f"swarmfold export: {args.out} exists and is not a swarmfold export; choose a new --out",
              file=sys.stderr)
        return ExitCode.BAD_INPUT
    out = export(resolve_checkpoint(args.target), args.out)
    print(f"exported to {out}; load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return ExitCode.OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from swarmfold.peer.simulate import simulate
    from swarmfold.peer.trainer import set_threads
    from swarmfold.spec import load_spec

    spec = load_spec(args.spec)
    set_threads(args.threads)
    steps = None
    if args.steps_from:
        from swarmfold.peer.roundlog import steps_from

        steps = steps_from(args.steps_from)
    peers, _ = simulate(spec, [[d] for d in args.data], rounds=args.rounds, threads=args.threads,
                        out=args.out, peer_ids=args.peer_ids, device=args.device, steps=steps)
    for p in peers:
        print(f"{p.peer_id}: round {p.round}, validation loss {p.evaluate(max_windows=256):.4f}, "
              f"model sha256 {p.theta_sha256[:16]}")
    return ExitCode.OK
