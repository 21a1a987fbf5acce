"""The FFN-neuron table: where the knowledge neurons of each architecture live.

A knowledge neuron is one input feature of a layer's FFN *output projection* (the second matrix of the
feed-forward block): post-activation, and for gated MLPs the product ``act(gate) * up``. It is read with a
forward pre-hook on that projection. The matching *value slot* is the projection's weight column for a
``nn.Linear`` (``weight[:, i]``) or the weight row for GPT-2's transposed ``Conv1D`` (``weight[i, :]``).

Every architecture fact lives in :data:`ARCHITECTURES`, keyed by ``config.model_type``:

``kind``
    ``"masked"`` (cloze by mask tokens) or ``"causal"`` (cloze by continuation).
``layers``
    dotted path of the list of transformer blocks, relative to ``model.base_model`` (HF's base model).
``ffn_out``
    dotted path, relative to one block, of the FFN output projection.
``ffn_in``
    dotted path(s) of the projection(s) feeding the activation (documentation and tests only).
``gated``
    whether the neuron is ``act(gate) * up``.
``unembedding``
    dotted path (relative to the task model) of the output word embedding matrix, or ``None`` to use
    ``model.get_output_embeddings()``.

and what the attribution engine may do with the model — each ``True``, ``False`` or ``"probe"`` (settled once
per handle by :func:`kneurons.attribution.plan.probe`; the meaning of each word is in that module):

``prefix_from_clean_run``
    the rows' prefix KV cache can be cut from the clean run's: a plain dynamic cache (no sliding windows) and
    blocks that return only their hidden states.
``partial_blocks``
    a block can run on some rows of a batch (every batch-shaped argument has the batch first).
``head_on_scored_positions``
    the last block's output can be cut to the scored positions before the LM head (no reshape after it).
``fused_head``
    the model returns its plain linear head's output unchanged (no soft-capping or scaling of the logits).
``batch_prompts``
    several prompts' rows may be padded into one batch (``True``/``False``; checked against one-prompt runs).

Unknown types fall back to a structural guess that warns what it chose; :func:`register_architecture`
adds or replaces entries; ``resolve(model, overrides=...)`` accepts dotted-path overrides.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import KneuronsError

try:  # GPT-2 style transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    kind: str  # "masked" | "causal"
    layers: str
    ffn_out: str
    ffn_in: tuple[str, ...] = ()
    gated: bool = False
    unembedding: str | None = None
    note: str = ""
    # attribution may put several prompts' rows in one batch (padded, with an attention mask); the prompt-batching
    # tests in tests/test_attribution.py compare it with one-prompt runs
    batch_prompts: bool = True
    # what the attribution engine may do (True / False / "probe"); checked per entry in
    # tests/test_attribution_plan.py against the probe and, forced either way, against a naive reference
    prefix_from_clean_run: bool | str = "probe"
    partial_blocks: bool | str = "probe"
    head_on_scored_positions: bool | str = "probe"
    fused_head: bool | str = "probe"
    # its attention keeps the attention weights under sdpa too (its own sdpa call gets an explicit mask, so
    # torch takes the kernel that materialises them; measured): the engine's memory estimate counts them
    sdpa_keeps_weights: bool = False

    def __post_init__(self):
        for name in CAPABILITIES:
            value = getattr(self, name)
            if not (isinstance(value, bool) or value == "probe"):
                raise KneuronsError(f"{self.model_type}: {name} must be True, False or 'probe', got {value!r}")


#: the engine capabilities an ArchSpec declares (see the module docstring)
CAPABILITIES = ("prefix_from_clean_run", "partial_blocks", "head_on_scored_positions", "fused_head")


def _e(model_type, kind, layers, ffn_out, ffn_in=(), gated=False, unembedding=None, note="", batch_prompts=True,
       **capabilities):
    if isinstance(ffn_in, str):
        ffn_in = (ffn_in,)
    return ArchSpec(model_type, kind, layers, ffn_out, tuple(ffn_in), gated, unembedding, note, batch_prompts,
                    **capabilities)


# The table. Paths were read off the Hugging Face implementations (transformers 5) and each entry is checked
# by tests/test_architectures.py on a tiny random model built from its config.
# engine capabilities shared by many entries (fused_head stays "probe" unless known: a subclass may post-process
# its logits; the probe compares the head's output with the model's)
_MASKED = dict(prefix_from_clean_run=False, partial_blocks=True, head_on_scored_positions=True)
_PLAIN = dict(prefix_from_clean_run=True, partial_blocks=True)
_SLIDING_OPTION = dict(prefix_from_clean_run="probe", partial_blocks=True, head_on_scored_positions=True)

_TABLE: list[ArchSpec] = [
    # encoder (masked) models: no KV cache
    _e("bert", "masked", "encoder.layer", "output.dense", "intermediate.dense", **_MASKED),
    _e("roberta", "masked", "encoder.layer", "output.dense", "intermediate.dense", **_MASKED),
    _e("xlm-roberta", "masked", "encoder.layer", "output.dense", "intermediate.dense", **_MASKED),
    _e("camembert", "masked", "encoder.layer", "output.dense", "intermediate.dense", **_MASKED),
    _e("electra", "masked", "encoder.layer", "output.dense", "intermediate.dense", **_MASKED),
    _e("distilbert", "masked", "transformer.layer", "ffn.lin2", "ffn.lin1", **_MASKED),
    _e("modernbert", "masked", "layers", "mlp.Wo", "mlp.Wi", gated=True,
       note="Wi produces [input, gate]; neuron = act(input) * gate; padded prompt batches give NaN at the pads "
            "(local attention), which leaks into real positions: prompts are attributed one at a time",
       batch_prompts=False, **_MASKED),
    # decoder (causal) models. prefix_from_clean_run is probed where a config option can add sliding-window
    # cache layers (mistral, qwen2/3, phi3, starcoder2); BLOOM, Falcon and GPT-Neo blocks also return their
    # attention weights (not cut or stacked per prompt: no prefix from the clean run, no shared passes)
    _e("gpt2", "causal", "h", "mlp.c_proj", "mlp.c_fc", note="Conv1D: value slot = weight row",
       **_PLAIN, head_on_scored_positions=False),  # reshapes to the input's shape after its last block
    _e("gpt_neo", "causal", "h", "mlp.c_proj", "mlp.c_fc", batch_prompts=False, prefix_from_clean_run=False,
       partial_blocks=True, head_on_scored_positions=False),
    _e("gptj", "causal", "h", "mlp.fc_out", "mlp.fc_in", **_PLAIN, head_on_scored_positions=True),
    _e("gpt_neox", "causal", "layers", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", **_PLAIN,
       head_on_scored_positions=True),
    _e("gpt_bigcode", "causal", "h", "mlp.c_proj", "mlp.c_fc", **_PLAIN, head_on_scored_positions=False),
    _e("opt", "causal", "decoder.layers", "fc2", "fc1", **_PLAIN, head_on_scored_positions=True),
    _e("bloom", "causal", "h", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", batch_prompts=False,
       prefix_from_clean_run=False, head_on_scored_positions=True,
       partial_blocks=False),  # its ALiBi bias is [batch * heads, ...]: cannot be cut to some rows
    _e("falcon", "causal", "h", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", batch_prompts=False,
       prefix_from_clean_run=False, head_on_scored_positions=True, sdpa_keeps_weights=True,
       partial_blocks=True),  # with config.alibi too: the bias reaches the blocks as [batch, heads, ...]
    _e("phi", "causal", "layers", "mlp.fc2", "mlp.fc1", **_PLAIN, head_on_scored_positions=True),
    _e("llama", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True, **_PLAIN,
       head_on_scored_positions=True),
    _e("mistral", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True,
       **_SLIDING_OPTION),
    _e("qwen2", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True,
       **_SLIDING_OPTION),
    _e("qwen3", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True,
       **_SLIDING_OPTION),
    _e("olmo2", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True, **_PLAIN,
       head_on_scored_positions=True),
    _e("gemma", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True, **_PLAIN,
       head_on_scored_positions=True),
    _e("gemma2", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True,
       prefix_from_clean_run=False, partial_blocks=True, head_on_scored_positions=True,
       fused_head=False),  # sliding-window cache layers; soft-caps its logits after the LM head
    _e("gemma3_text", "causal", "layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), gated=True,
       prefix_from_clean_run=False, partial_blocks=True, head_on_scored_positions=True),  # sliding windows
    _e("phi3", "causal", "layers", "mlp.down_proj", "mlp.gate_up_proj", gated=True,
       note="gate_up_proj is fused: neuron = act(gate) * up of its two halves", **_SLIDING_OPTION),
    _e("starcoder2", "causal", "layers", "mlp.c_proj", "mlp.c_fc", **_SLIDING_OPTION),
]

ARCHITECTURES: dict[str, ArchSpec] = {spec.model_type: spec for spec in _TABLE}


def register_architecture(model_type: str, *, kind: str, layers: str, ffn_out: str, ffn_in=(),
                          gated: bool = False, unembedding: str | None = None, note: str = "",
                          batch_prompts: bool = False, replace_existing: bool = False,
                          **capabilities) -> ArchSpec:
    """Add an architecture to the table (or replace one with ``replace_existing=True``). ``batch_prompts``
    lets attribution pad several prompts into one batch — leave it off unless checked for this model. The
    engine capabilities (:data:`CAPABILITIES`) default to ``"probe"``."""
    if kind not in ("masked", "causal"):
        raise KneuronsError(f"kind must be 'masked' or 'causal', got {kind!r}")
    if model_type in ARCHITECTURES and not replace_existing:
        raise KneuronsError(f"architecture {model_type!r} is already registered (pass replace_existing=True)")
    unknown = set(capabilities) - set(CAPABILITIES)
    if unknown:
        raise KneuronsError(f"unknown architecture field(s): {', '.join(sorted(unknown))}")
    spec = _e(model_type, kind, layers, ffn_out, ffn_in, gated, unembedding, note, batch_prompts, **capabilities)
    ARCHITECTURES[model_type] = spec
    return spec


def get_attr_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if part == "":
            continue
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


@dataclass
class ResolvedArch:
    """An :class:`ArchSpec` bound to one model instance."""

    spec: ArchSpec
    layers: list[nn.Module]
    ffn_out: list[nn.Module]
    d_ff: int
    d_model: int
    transposed: bool  # True for Conv1D (value slot = weight row)
    guessed: bool = False
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def value_slots(self, layer: int) -> torch.Tensor:
        """A ``[d_ff, d_model]`` *view* of the value slots of ``layer`` (row i = slot of neuron i)."""
        w = self.ffn_out[layer].weight
        return w if self.transposed else w.t()

    def unembedding(self) -> torch.Tensor:
        """The output word-embedding matrix ``[vocab, d_model]``."""
        if self.spec.unembedding:
            return get_attr_path(self._model, self.spec.unembedding)
        emb = self._model.get_output_embeddings()
        if emb is None:
            raise KneuronsError(f"model type {self.spec.model_type!r} has no output embeddings")
        return emb.weight

    def embedding(self) -> torch.Tensor:
        """The input word-embedding matrix ``[vocab, d_model]``."""
        return self._model.get_input_embeddings().weight


def _in_out(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, transposed) of a projection module."""
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], True
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) or (w is not None and w.dim() == 2):
        return w.shape[1], w.shape[0], False
    raise KneuronsError(f"FFN output projection {type(module).__name__} is neither nn.Linear nor Conv1D")


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _bind(model: nn.Module, spec: ArchSpec, guessed: bool = False) -> ResolvedArch:
    base = _base(model)
    layers = None
    for root in (base, model):
        try:
            layers = get_attr_path(root, spec.layers)
            break
        except AttributeError:
            continue
    if layers is None or not isinstance(layers, (nn.ModuleList, nn.Sequential, list, tuple)):
        raise KneuronsError(f"model type {spec.model_type!r}: no list of layers at {spec.layers!r}")
    layers = list(layers)
    try:
        outs = [get_attr_path(layer, spec.ffn_out) for layer in layers]
    except AttributeError:
        raise KneuronsError(f"model type {spec.model_type!r}: layers have no FFN output projection {spec.ffn_out!r}")
    d_ff, d_model, transposed = _in_out(outs[0])
    return ResolvedArch(spec, layers, outs, d_ff, d_model, transposed, guessed, model)


_FFN_OUT_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "lin2", "Wo", "w2", "output.dense")


def _guess(model: nn.Module, model_type: str) -> ArchSpec:
    """Structural fallback: the longest ModuleList of blocks, and in a block the projection that maps the
    widest hidden size back to the model width, preferring the usual names, skipping attention."""
    base = _base(model)
    best = None
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise KneuronsError(f"unsupported model type {model_type!r}: no list of layers found (register_architecture it)")
    layers_path, layers = best
    block = layers[0]
    candidates = []
    for name, mod in block.named_modules():
        if not name or "attn" in name.lower() or "attention" in name.lower():
            continue
        try:
            d_in, d_out, _ = _in_out(mod)
        except KneuronsError:
            continue
        if d_in > d_out:
            named = any(name == n or name.endswith("." + n) for n in _FFN_OUT_NAMES)
            candidates.append((named, d_in, name))
    if not candidates:
        raise KneuronsError(f"unsupported model type {model_type!r}: no FFN output projection found in {layers_path}")
    candidates.sort(reverse=True)
    ffn_out = candidates[0][2]
    kind = "masked" if _looks_masked(model) else "causal"
    warnings.warn(
        f"kneurons: model type {model_type!r} is not in the FFN table; guessed layers={layers_path!r}, "
        f"ffn_out={ffn_out!r}, kind={kind!r}. Check it, then register_architecture() it.",
        stacklevel=3,
    )
    return ArchSpec(model_type, kind, layers_path, ffn_out, note="structural guess", partial_blocks=False,
                    head_on_scored_positions=False)


def _looks_masked(model: nn.Module) -> bool:
    names = list(getattr(model.config, "architectures", None) or []) + [type(model).__name__]
    if any("MaskedLM" in n for n in names):
        return True
    if any("CausalLM" in n or "LMHead" in n for n in names):
        return False
    return not bool(getattr(model.config, "is_decoder", False)) and "encoder" in dict(model.named_children()).keys()


def resolve(model: nn.Module, overrides: dict | None = None, fallback: bool = True) -> ResolvedArch:
    """Bind the table entry for ``model.config.model_type`` to ``model``.

    ``overrides`` may replace any :class:`ArchSpec` field, e.g. ``{"ffn_out": "mlp.proj_out"}``.
    Without an entry, ``fallback=True`` guesses the structure (with a warning); ``fallback=False`` raises.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    spec = ARCHITECTURES.get(model_type)
    guessed = False
    if spec is None:
        if overrides and {"layers", "ffn_out", "kind"} <= set(overrides):
            spec = ArchSpec(model_type, overrides["kind"], overrides["layers"], overrides["ffn_out"])
        elif not fallback:
            raise KneuronsError(
                f"unsupported model type {model_type!r}: not in the FFN table and the fallback is off "
                "(use register_architecture or overrides)")
        else:
            spec = _guess(model, model_type)
            guessed = True
    if overrides:
        unknown = set(overrides) - set(ArchSpec.__dataclass_fields__)
        if unknown:
            raise KneuronsError(f"unknown architecture override(s): {', '.join(sorted(unknown))}")
        ov = dict(overrides)
        if isinstance(ov.get("ffn_in"), str):
            ov["ffn_in"] = (ov["ffn_in"],)
        spec = replace(spec, **ov)
    return _bind(model, spec, guessed)
