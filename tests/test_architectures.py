"""Every entry of the FFN table, checked on a tiny random model built from its config (tests/tiny.py).

* capture hooks change nothing;
* a neuron is its value slot: zeroing neuron i through the hooks == zeroing value slot i in the weights
  (this pins the Conv1D orientation of GPT-2 too);
* the captured activation is the hand-computed act(x W_in + b), or act(gate) * up for gated MLPs;
* the resolved widths are the config's;
* the structural fallback, register_architecture and overrides.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from kneurons import architectures
from kneurons.architectures import ARCHITECTURES, get_attr_path, register_architecture, resolve
from kneurons.errors import KneuronsError
from kneurons.hooks import capture, ffn_hooks

from tiny import ALL_TYPES, CONFIGS, N_LAYERS, expected_dims, random_ids, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: intra-op threads only add sync overhead (5x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_entry_has_a_tiny_model():
    missing = sorted(set(ARCHITECTURES) - set(CONFIGS))
    assert not missing, f"table entries without a tiny model in tests/tiny.py: {missing}"


# (a) capture hooks are transparent ------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_capture_leaves_logits_unchanged(model_type):
    model = tiny_model(model_type)
    arch = resolve(model)
    ids = random_ids(model)
    plain = _logits(model, ids)
    with capture(arch) as cap:
        hooked = _logits(model, ids)
    assert torch.equal(plain, hooked)
    assert sorted(cap.acts) == list(range(arch.n_layers))
    # hooks are gone afterwards
    assert all(not m._forward_pre_hooks for m in arch.ffn_out)


# OPT's decoder layer flattens hidden states to [batch * seq, d] before fc1/fc2; ffn_hooks restores
# [batch, seq, d_ff] from the block's input shape, so every type is checked the same way here.
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_capture_shape_and_positions(model_type):
    model = tiny_model(model_type)
    arch = resolve(model)
    ids = random_ids(model)
    with capture(arch) as full:
        _logits(model, ids)
    positions = torch.tensor([6, 3])
    with capture(arch, positions=positions) as at:
        _logits(model, ids)
    for l in range(arch.n_layers):
        assert full.acts[l].shape == (2, 7, arch.d_ff)
        assert at.acts[l].shape == (2, arch.d_ff)
        assert torch.equal(at.acts[l], full.acts[l][torch.arange(2), positions])
    assert full.stacked().shape == (arch.n_layers, 2, 7, arch.d_ff)


# (b) neuron i <-> value slot i ------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_zeroing_neuron_equals_zeroing_value_slot(model_type):
    model = tiny_model(model_type, dtype=torch.float64)
    arch = resolve(model)
    ids = random_ids(model)
    clean = _logits(model, ids)
    g = torch.Generator().manual_seed(zlib.crc32(model_type.encode()))
    for layer in sorted({0, arch.n_layers - 1}):
        neuron = int(torch.randint(arch.d_ff, (1,), generator=g))

        def kill(l, x, _layer=layer, _i=neuron):
            assert l == _layer
            x = x.clone()
            x[..., _i] = 0
            return x

        with ffn_hooks(arch, kill, layers=[layer]):
            by_hook = _logits(model, ids)

        slots = arch.value_slots(layer)
        assert slots.shape == (arch.d_ff, arch.d_model)
        weight = arch.ffn_out[layer].weight
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                slots[neuron] = 0
            # the view wrote into the weight: exactly one slot (column, or row for Conv1D) is now zero
            zero_lines = (weight == 0).all(dim=0 if not arch.transposed else 1)
            assert zero_lines.nonzero().flatten().tolist() == [neuron]
            by_slot = _logits(model, ids)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert torch.equal(weight, saved)

        assert torch.allclose(by_hook, by_slot, rtol=0, atol=1e-10), (
            f"{model_type} layer {layer} neuron {neuron}: hook vs slot differ by {(by_hook - by_slot).abs().max()}")
        assert (by_hook - clean).abs().max() > 1e-8, f"{model_type}: zeroing neuron {neuron} changed nothing"
    assert torch.equal(_logits(model, ids), clean)


# (c) the captured activation is the FFN's hidden activation -----------------------------------------------

def _linear(module, x):
    return F.linear(x, module.weight, module.bias)


def _expected_bert(model, layer, x):
    spec = ARCHITECTURES["bert"]
    return ACT2FN[model.config.hidden_act](_linear(get_attr_path(layer, spec.ffn_in[0]), x))


def _expected_gpt2(model, layer, x):
    c_fc = get_attr_path(layer, ARCHITECTURES["gpt2"].ffn_in[0])  # Conv1D: x @ W + b, W is [d_model, d_ff]
    return ACT2FN[model.config.activation_function](x @ c_fc.weight + c_fc.bias)


def _expected_gated(act_field):
    def expected(model, layer, x):
        spec = ARCHITECTURES[model.config.model_type]
        gate_proj, up_proj = (get_attr_path(layer, p) for p in spec.ffn_in)
        return ACT2FN[getattr(model.config, act_field)](_linear(gate_proj, x)) * _linear(up_proj, x)
    return expected


def _expected_phi3(model, layer, x):
    gate, up = _linear(get_attr_path(layer, ARCHITECTURES["phi3"].ffn_in[0]), x).chunk(2, dim=-1)
    return ACT2FN[model.config.hidden_act](gate) * up


def _expected_modernbert(model, layer, x):
    inp, gate = _linear(get_attr_path(layer, ARCHITECTURES["modernbert"].ffn_in[0]), x).chunk(2, dim=-1)
    return ACT2FN[model.config.hidden_activation](inp) * gate


HAND = {
    "bert": _expected_bert,
    "gpt2": _expected_gpt2,
    "llama": _expected_gated("hidden_act"),
    "gemma3_text": _expected_gated("hidden_activation"),
    "phi3": _expected_phi3,
    "modernbert": _expected_modernbert,
}


@pytest.mark.parametrize("model_type", sorted(HAND))
def test_captured_activation_is_hand_computed(model_type):
    model = tiny_model(model_type, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases, so a forgotten bias would show
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    arch = resolve(model)
    ids = random_ids(model)
    first = arch.spec.ffn_in[0]
    mlp_inputs = {}
    handles = []
    for l, layer in enumerate(arch.layers):
        def pre(mod, args, _l=l):
            mlp_inputs[_l] = args[0].detach().clone()
        handles.append(get_attr_path(layer, first).register_forward_pre_hook(pre))
    try:
        with capture(arch) as cap:
            _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    for l, layer in enumerate(arch.layers):
        with torch.no_grad():
            want = HAND[model_type](model, layer, mlp_inputs[l])
        got = cap.acts[l]
        assert got.shape == want.shape == (2, 7, arch.d_ff)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()


# (d) widths, and the documented ffn_in paths --------------------------------------------------------------

@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_resolved_widths_match_config(model_type):
    model = tiny_model(model_type)
    arch = resolve(model)
    d_ff, d_model = expected_dims(model.config)
    assert (arch.d_ff, arch.d_model) == (d_ff, d_model)
    assert arch.d_ff != arch.d_model
    assert arch.n_layers == N_LAYERS
    assert not arch.guessed
    assert arch.spec.kind == ARCHITECTURES[model_type].kind
    assert arch.transposed == (model_type == "gpt2")
    for l in range(arch.n_layers):
        assert arch.value_slots(l).shape == (d_ff, d_model)
    assert arch.unembedding().shape[0] == model.config.vocab_size
    assert arch.embedding().shape[0] == model.config.vocab_size
    # ffn_in (documentation) paths exist and produce the FFN width (fused gated projections: twice it)
    assert arch.spec.ffn_in
    widths = []
    for path in arch.spec.ffn_in:
        mod = get_attr_path(arch.layers[0], path)
        widths.append(mod.weight.shape[1] if arch.transposed else mod.weight.shape[0])
    if arch.spec.gated and len(widths) == 1:
        assert widths == [2 * d_ff]
    else:
        assert widths == [d_ff] * len(widths)


# (e) fallback, registration, overrides --------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_structural_fallback_agrees_with_table(model_type):
    model = tiny_model(model_type)
    ref = resolve(model)
    model.config.model_type = "mystery"
    with pytest.warns(UserWarning, match="mystery"):
        guess = resolve(model)
    assert guess.guessed
    assert guess.spec.kind == ref.spec.kind
    assert len(guess.ffn_out) == len(ref.ffn_out)
    assert all(a is b for a, b in zip(guess.ffn_out, ref.ffn_out))


def test_fallback_warns_and_finds_down_proj():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.warns(UserWarning) as rec:
        arch = resolve(model)
    msg = " ".join(str(w.message) for w in rec)
    assert "mystery" in msg and "mlp.down_proj" in msg and "layers" in msg and "causal" in msg
    assert arch.guessed and arch.spec.ffn_out == "mlp.down_proj" and arch.spec.layers == "layers"
    assert arch.ffn_out[1] is model.model.layers[1].mlp.down_proj
    assert (arch.d_ff, arch.d_model) == (model.config.intermediate_size, model.config.hidden_size)

    with pytest.raises(KneuronsError, match="mystery"):
        resolve(model, fallback=False)

    # complete overrides stand in for a table entry: no guess, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arch = resolve(model, overrides={"kind": "causal", "layers": "layers", "ffn_out": "mlp.down_proj"},
                       fallback=False)
    assert not arch.guessed and arch.ffn_out[0] is model.model.layers[0].mlp.down_proj


def test_register_architecture(monkeypatch):
    monkeypatch.setattr(architectures, "ARCHITECTURES", dict(architectures.ARCHITECTURES))
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    spec = register_architecture("mystery", kind="causal", layers="layers", ffn_out="mlp.down_proj",
                                 ffn_in=("mlp.gate_proj", "mlp.up_proj"), gated=True)
    assert architectures.ARCHITECTURES["mystery"] is spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arch = resolve(model, fallback=False)
    assert not arch.guessed and arch.spec is spec
    assert arch.ffn_out[0] is model.model.layers[0].mlp.down_proj

    with pytest.raises(KneuronsError, match="already registered"):
        register_architecture("mystery", kind="causal", layers="layers", ffn_out="mlp.down_proj")
    with pytest.raises(KneuronsError):
        register_architecture("llama", kind="causal", layers="layers", ffn_out="mlp.down_proj")
    replaced = register_architecture("mystery", kind="causal", layers="layers", ffn_out="mlp.up_proj",
                                     replace_existing=True)
    assert architectures.ARCHITECTURES["mystery"] is replaced
    with pytest.raises(KneuronsError):
        register_architecture("other", kind="seq2seq", layers="layers", ffn_out="mlp.down_proj")


def test_register_architecture_cleaned_up():
    assert "mystery" not in ARCHITECTURES and "mystery" not in architectures.ARCHITECTURES


def test_bad_overrides_raise():
    model = tiny_model("llama")
    with pytest.raises(KneuronsError, match="bogus"):
        resolve(model, overrides={"bogus": "x"})
    with pytest.raises(KneuronsError, match="mlp.nope"):
        resolve(model, overrides={"ffn_out": "mlp.nope"})
    with pytest.raises(KneuronsError, match="no.such.layers"):
        resolve(model, overrides={"layers": "no.such.layers"})
    with pytest.raises(KneuronsError):
        resolve(model, overrides={"layers": "norm"})  # exists, but is not a list of blocks
    # a valid override is applied
    arch = resolve(model, overrides={"ffn_out": "mlp.down_proj", "note": "x"})
    assert arch.spec.note == "x" and arch.ffn_out[0] is model.model.layers[0].mlp.down_proj
