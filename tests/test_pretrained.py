"""Pretrained starts: `init --from-pretrained` on small Hugging Face folders made here with
save_pretrained (nothing from a hub), training from them, `export` back, and refusal of a
copy whose weights or tokenizer differ.

Logits are compared with torch.equal and models by sha256: bits, not tolerances.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import swarmfold_cmd
from swarm_helpers import log_tail, model_hashes, start_peer, wait_exit, wait_ready

from swarmfold.averaging.base import SoloAverager
from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.cli import main
from swarmfold.peer.checkpoint import resolve_checkpoint
from swarmfold.peer.inference import export
from swarmfold.peer.local import LocalPeer, model_from_checkpoint
from swarmfold.peer.model import PretrainedError, params_sha256, spec_from_pretrained
from swarmfold.peer.simulate import simulate
from swarmfold.peer.tokenizer import TokenizerError
from swarmfold.spec import Spec, load_spec, preset, to_toml

ARCHS = ("llama", "gpt2", "qwen2", "mistral")


def make_tokenizer(folder: Path, vocab: int = 300) -> int:
    """A byte-level BPE tokenizer trained here on a few lines of Python, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "import os\nclass A:\n    pass\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return len(fast)


def make_pretrained(folder: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random `arch` model with its tokenizer, written as a Hugging Face folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder) + 3  # a few spare embeddings, as real models have
    if arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=vocab)
    else:
        cfg = AutoConfig.for_model(arch, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   vocab_size=vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    return folder


def small_training(spec: Spec) -> Spec:
    return spec.replace(data={"seq_len": 32}, inner={"batch_size": 4, "warmup_steps": 2},
                        round={"inner_steps": 3, "mode": "steps"})  # H steps: the swarm equals simulate


def assert_same_logits(export_dir: Path, ours: torch.nn.Module, vocab: int) -> None:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(export_dir), local_files_only=True, use_safetensors=True)
    theirs.eval()
    ours.eval()
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_init_records_architecture_tokenizer_and_weights_hash(tmp_path: Path) -> None:
    folder = make_pretrained(tmp_path / "llama-tiny", "llama")
    out = tmp_path / "spec.toml"
    assert main(["init", "--from-pretrained", str(folder), "--out", str(out)]) == 0
    spec = load_spec(out)
    saved = json.loads((folder / "config.json").read_text())
    assert spec.model.architecture == "llama" and spec.pretrained
    # time mode, its round the tiny preset's scaled by training FLOPs per step (rounded up to a second)
    assert spec.round.mode == "time" and spec.round.seconds >= 1.0 and spec.round.seconds == int(spec.round.seconds)
    recorded = spec.hf_config_dict()
    assert {k: v for k, v in saved.items() if k not in ("transformers_version", "architectures")} == recorded
    assert spec.tokenizer.kind == "hf" and Path(spec.tokenizer.path) == folder.resolve() and spec.tokenizer.sha256
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    assert spec.model.pretrained_sha256 == params_sha256(loaded)
    # the genesis of every peer is exactly those weights
    peer = LocalPeer(spec, [], peer_id="p", threads=1, shard=_empty_shard(spec))
    assert peer.theta_sha256 == spec.model.pretrained_sha256
    # the folder's path is local: another path to the same weights is the same swarm
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert spec.replace(model={"pretrained_path": str(moved)}, tokenizer={"path": str(moved)}).spec_hash \
        == spec.spec_hash


def _empty_shard(spec: Spec):  # noqa: ANN202 - a Shard over a few generated lines
    from swarmfold.peer.data import Shard
    from swarmfold.peer.tokenizer import load_tokenizer

    text = Path(__file__).resolve().parent / "conftest.py"
    return Shard([text], load_tokenizer(spec.tokenizer), seq_len=spec.data.seq_len,
                 val_fraction=spec.data.val_fraction)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_and_export_round_trip(arch: str, tmp_path: Path, shards: list[Path]) -> None:
    folder = make_pretrained(tmp_path / f"{arch}-tiny", arch)
    spec = small_training(spec_from_pretrained(folder, preset("tiny")))
    assert spec.model.architecture == arch
    peer = LocalPeer(spec, [shards[0]], peer_id="p", threads=1, workdir=tmp_path / "w")
    assert peer.theta_sha256 == spec.model.pretrained_sha256
    report = peer.run_round(SoloAverager())
    assert report.model_sha256 != spec.model.pretrained_sha256  # it trained
    peer.save()
    ckpt = resolve_checkpoint(tmp_path / "w")
    exported = export(ckpt, tmp_path / "export")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == arch
    assert config.get("use_cache", True) == json.loads((folder / "config.json").read_text()).get("use_cache", True)
    assert (exported / "tokenizer.json").is_file()
    _, ours = model_from_checkpoint(ckpt)
    assert params_sha256(ours) == peer.theta_sha256
    assert_same_logits(exported, ours, int(spec.hf_config_dict()["vocab_size"]))


def test_a_different_copy_is_refused(tmp_path: Path) -> None:
    folder = make_pretrained(tmp_path / "llama-tiny", "llama", seed=0)
    spec = small_training(spec_from_pretrained(folder, preset("tiny")))
    other = make_pretrained(tmp_path / "llama-other", "llama", seed=1)  # same tokenizer, other weights
    with pytest.raises(PretrainedError) as e:
        LocalPeer(spec.replace(model={"pretrained_path": str(other)}), [], peer_id="p", threads=1,
                  shard=_empty_shard(spec))
    msg = str(e.value)
    assert str(other) in msg and spec.model.pretrained_sha256[:16] in msg and "differs" in msg
    retok = tmp_path / "retok"
    shutil.copytree(folder, retok)
    make_tokenizer(retok, vocab=280)
    with pytest.raises(TokenizerError, match="different tokenizer"):
        LocalPeer(spec.replace(tokenizer={"path": str(retok)}), [], peer_id="p", threads=1)


def test_bad_folders_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PretrainedError, match="no config.json"):
        spec_from_pretrained(tmp_path, preset("tiny"))
    folder = make_pretrained(tmp_path / "m", "llama")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(PretrainedError, match="no \\*.safetensors"):
        spec_from_pretrained(folder, preset("tiny"))


@pytest.mark.slow
def test_pretrained_swarm_equals_simulate_and_exports(tmp_path: Path, shards: list[Path],
                                                      procs: list[subprocess.Popen]) -> None:
    """small llama folder -> init --from-pretrained -> 2 real peers, 2 rounds (== simulate bit for bit)
    -> export -> transformers loads it with the same logits; a peer with another copy is refused."""
    folder = make_pretrained(tmp_path / "llama-tiny", "llama")
    spec_path = tmp_path / "spec.toml"
    assert subprocess.run(swarmfold_cmd("init", "--from-pretrained", str(folder), "--out", str(spec_path)),
                          check=False).returncode == 0
    spec = small_training(load_spec(spec_path)).replace(averaging={
        "min_group_size": 2, "matchmaking_timeout": 10.0, "join_timeout": 8.0, "allreduce_timeout": 5.0,
        "commit_timeout": 4.0})
    spec_path.write_text(to_toml(spec))
    rounds = 2
    workdirs = [tmp_path / "peer-0", tmp_path / "peer-1"]
    start_peer(procs, workdirs[0], spec_path, shards[0], rounds=rounds)
    first = wait_ready(workdirs[0])["maddrs"][:1]
    start_peer(procs, workdirs[1], spec_path, shards[1], rounds=rounds, initial=first)
    # a third peer whose copy of the folder has other weights: refused at start, with the reason
    other = make_pretrained(tmp_path / "llama-other", "llama", seed=1)
    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text(to_toml(spec.replace(model={"pretrained_path": str(other)})))
    assert load_spec(bad_spec).spec_hash == spec.spec_hash  # the same swarm id: only the weights differ
    bad = start_peer(procs, tmp_path / "peer-bad", bad_spec, shards[2], rounds=rounds, initial=first)
    assert wait_exit(bad, tmp_path / "peer-bad") == 2
    log = log_tail(tmp_path / "peer-bad")
    assert str(other) in log and "pretrained_sha256" in log, log
    for p, w in zip(procs[:2], workdirs, strict=True):
        assert wait_exit(p, w) == 0, log_tail(w)
    ids = [load_or_create_identity(w / "identity.key").peer_id for w in workdirs]
    simulate(spec, [[shards[0]], [shards[1]]], rounds=rounds, threads=1, out=tmp_path / "sim", peer_ids=ids,
             keep_checkpoints=100)
    sim = model_hashes(tmp_path / "sim" / "peer-0")
    for w in workdirs:
        got = model_hashes(w)
        assert [got[r] for r in range(1, rounds + 1)] == [sim[r] for r in range(1, rounds + 1)], (w, got, sim)
    assert subprocess.run(swarmfold_cmd("export", str(workdirs[0]), "--out", str(tmp_path / "export")),
                          check=False).returncode == 0
    _, ours = model_from_checkpoint(resolve_checkpoint(workdirs[0]))
    assert_same_logits(tmp_path / "export", ours, int(spec.hf_config_dict()["vocab_size"]))
