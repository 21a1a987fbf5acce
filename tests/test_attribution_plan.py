"""The execution plan: capabilities declared in the table or probed once, and every fallback of the engine forced
(an option or a capability off, or the plan changed by hand) and compared with the naive reference."""

from __future__ import annotations

import pytest
import torch

from helpers import word_tokenizer
from kneurons import ModelHandle
from kneurons.architectures import ARCHITECTURES, CAPABILITIES
from kneurons.attribution import Options, attribute, integrated_gradients
from kneurons.attribution.executor import run
from kneurons.attribution.plan import ExecutionPlan, probe
from kneurons.errors import KneuronsError
from kneurons.prompts import encode
from reference import naive_ig
from tiny import ALL_TYPES, tiny_config, tiny_model

PROMPT = "the capital of france is ___ ."
MLM_PROMPT = "the capital of [MASK] is paris ."
CAUSAL_PARAPHRASES = ["the capital of france is ___", "paris is the capital of ___",
                      "a city in europe called france has as its capital ___"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _handle(model_type, model=None, **overrides):
    """A float64 tiny model of ``model_type`` with table fields overridden (e.g. a capability set to "probe")."""
    model = (model if model is not None else tiny_model(model_type)).to(torch.float64)
    return ModelHandle.from_model(model, word_tokenizer(ARCHITECTURES[model_type].kind),
                                  arch_overrides=overrides or None)


def _fact(h):
    return (MLM_PROMPT, "france") if h.is_masked else (PROMPT, "paris berlin")


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _forced(h, steps=4, batch_size=None, **changes):
    """Attribute with the plan decided as usual, then changed by hand (the result must not change)."""
    prompt, target = _fact(h)
    options = Options.build(h, steps=steps, batch_size=batch_size)
    return run(h, [prompt], [target], options, adjust=lambda plan: plan.replace(**changes))[0]


def _matches_naive(h, got, steps=4, tol=1e-6):
    prompt, target = _fact(h)
    ref = naive_ig(h, prompt, target, steps=steps)
    assert ref.abs().max() > 0
    assert _rel_err(got.scores, ref) <= tol


# ------------------------------------------------------------------------------------ capabilities

@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_declared_capabilities_are_what_the_probe_finds(model_type):
    h = _handle(model_type, **{c: "probe" for c in CAPABILITIES})
    prompt, target = _fact(h)
    found = probe(h, encode(h, prompt, target), trials=["partial_blocks", "head_on_scored_positions"])
    spec = ARCHITECTURES[model_type]
    declared = {c: getattr(spec, c) for c in CAPABILITIES if getattr(spec, c) != "probe"}
    assert declared, "every entry declares something"
    assert {c: found[c] for c in declared} == declared
    assert found["use_cache"] is h.is_causal
    # blocks that return their attention weights as well cannot share passes: the table says so too
    assert found["plain_block_outputs"] or not spec.batch_prompts


@pytest.mark.parametrize("model_type, config, capability, expected", [
    ("mistral", {"sliding_window": None}, "prefix_from_clean_run", True),  # the tiny default has a window of 4
    ("mistral", {}, "prefix_from_clean_run", False),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0,
               "layer_types": ["sliding_attention", "sliding_attention"]}, "prefix_from_clean_run", False),
    # Falcon's ALiBi bias is built as BLOOM's, [batch * heads, ...], but reshaped to [batch, heads, ...] before
    # the blocks: partial blocks work (the probe's trial compares the logits, not just "no error")
    ("falcon", {"alibi": True}, "partial_blocks", True),
    ("bloom", {}, "partial_blocks", False),
])
def test_probed_capabilities_follow_the_config(model_type, config, capability, expected):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    h = _handle(model_type, model=model, **{capability: "probe"})
    got = integrated_gradients(h, PROMPT, "paris berlin", steps=4, batch_size=1000)
    assert got.params[capability] is expected and capability in got.params["probed"]
    _matches_naive(h, got)


def test_probe_runs_once_per_handle(monkeypatch):
    h = _handle("falcon", partial_blocks="probe")  # partial_blocks and fused_head are probed
    a = integrated_gradients(h, PROMPT, "paris", steps=2)
    assert sorted(a.params["probed"]) == ["fused_head", "partial_blocks"]
    assert h.capabilities["partial_blocks"] is True and h.capabilities["use_cache"] is True

    def no_more(*args, **kwargs):
        raise AssertionError("probed twice")

    monkeypatch.setattr("kneurons.attribution.plan.probe", no_more)
    b = integrated_gradients(h, "paris is the capital of ___", "france", steps=2)
    assert b.params["partial_blocks"] is True


def test_out_of_memory_is_not_a_missing_capability():
    # the probe's one try/except catches what a model that cannot take a shortcut raises, by type: an
    # out-of-memory error propagates, a RuntimeError is never read for "out of memory"
    h = _handle("llama", partial_blocks="probe")
    enc = encode(h, PROMPT, "paris")
    for error in (torch.OutOfMemoryError("CUDA out of memory."),
                  RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        def raise_on_two_rows(mod, args, kwargs, _error=error):
            x = args[0] if args else kwargs["hidden_states"]
            if x.shape[0] == 2:  # only the partial-blocks trial runs two rows
                raise _error

        hook = h.arch.layers[0].register_forward_pre_hook(raise_on_two_rows, with_kwargs=True)
        try:
            if isinstance(error, torch.OutOfMemoryError):
                with pytest.raises(torch.OutOfMemoryError):
                    integrated_gradients(h, PROMPT, "paris", steps=2)
                assert "partial_blocks" not in h.capabilities  # nothing settled
            else:
                assert probe(h, enc, ["partial_blocks"])["partial_blocks"] is False
        finally:
            hook.remove()
    assert probe(h, enc, ["partial_blocks"])["partial_blocks"] is True


# ------------------------------------------------------------------------------------ every fallback, forced

@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_prefix_pass_instead_of_the_clean_runs_cache(model_type):
    # (was: _MergeFailed) the clean run's cache cannot serve the rows: the prefix runs once on its own
    h = _handle(model_type)
    got = integrated_gradients(h, PROMPT, "paris berlin", steps=4, prefix_from_clean_run=False)
    assert got.params["use_cache"] is True and got.params["prefix_from_clean_run"] is False
    _matches_naive(h, got)
    # the probe reaches the same plan for blocks returning their attention weights (GPT-Neo) by inspection
    h = _handle("gpt_neo", prefix_from_clean_run="probe")
    got = integrated_gradients(h, PROMPT, "paris berlin", steps=4)
    assert got.params["prefix_from_clean_run"] is False and "prefix_from_clean_run" in got.params["probed"]
    _matches_naive(h, got)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the subclass's forward(*args, **kwargs) hides `cache`
def test_causal_rows_run_the_whole_prompt_without_a_cache():
    # (was: unmerge without a usable cache) a causal model that returns no KV cache: every row runs the prompt
    from transformers import GPT2LMHeadModel

    class NoCache(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.past_key_values = None
            return out

    h0 = _handle("gpt2")
    model = NoCache(h0.model.config).double().eval()
    model.load_state_dict(h0.model.state_dict())
    h = ModelHandle.from_model(model, h0.tokenizer, name="no-cache")
    got = integrated_gradients(h, PROMPT, "paris berlin", steps=4, batch_size=1000)
    assert got.params["use_cache"] is False and got.params["cache_copy"] == "none"
    assert got.params["partial_blocks"] is True  # blocks still run on partial rows, without a cache to cut
    _matches_naive(h, got)
    # the same plan forced on a model that has a cache, with and without the head cut to the scored positions
    h = _handle("llama")
    for head_cut in (True, False):
        got = _forced(h, batch_size=1000, use_cache=False, prefix_from_clean_run=False, cache_copy="none",
                      head_on_scored_positions=head_cut)
        assert got.params["use_cache"] is False and got.params["head_on_scored_positions"] is head_cut
        _matches_naive(h, got)


def test_head_on_all_positions():
    # (was: head slicing off, and its retry after the model failed to cut) masked rows score the full sequence
    h = _handle("bert")
    got = integrated_gradients(h, MLM_PROMPT, "france", steps=4, head_on_scored_positions=False)
    assert got.params["head_on_scored_positions"] is False
    _matches_naive(h, got)
    with pytest.warns(DeprecationWarning, match="slice_head is now called head_on_scored_positions"):
        old_name = integrated_gradients(h, MLM_PROMPT, "france", steps=4, slice_head=False)
    assert old_name.params["head_on_scored_positions"] is False and torch.equal(old_name.scores, got.scores)
    # GPT-2 reshapes after its last block: the probe's trial finds the cut impossible
    h = _handle("gpt2", head_on_scored_positions="probe")
    got = integrated_gradients(h, PROMPT, "paris berlin", steps=4, use_cache=False)
    assert got.params["head_on_scored_positions"] is False and "head_on_scored_positions" in got.params["probed"]
    _matches_naive(h, got)
    # a model that can cut, probed
    h = _handle("bert", head_on_scored_positions="probe")
    got = integrated_gradients(h, MLM_PROMPT, "france", steps=4)
    assert got.params["head_on_scored_positions"] is True
    _matches_naive(h, got)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt_neo"])
@pytest.mark.parametrize("batch_size", [5, 1000])
def test_deep_copied_cache(model_type, batch_size):
    # cache layers of an unknown type get a deep copy per pass (and whole blocks: a deep copy is not cut to rows)
    h = _handle(model_type)
    got = _forced(h, batch_size=batch_size, cache_copy="deep", partial_blocks=False)
    assert got.params["cache_copy"] == "deep" and got.params["use_cache"] is True
    _matches_naive(h, got)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert", "gemma3_text"])
def test_whole_blocks_only(model_type):
    # (was: partial blocks off on entry) every block runs for all rows from the pass's lowest patched layer up
    h = _handle(model_type)
    prompt, target = _fact(h)
    for bs in (5, 1000):
        got = integrated_gradients(h, prompt, target, steps=4, batch_size=bs, partial_blocks=False)
        assert got.params["partial_blocks"] is False and got.params["replay"] is True
        _matches_naive(h, got)
    # BLOOM, probed: its ALiBi bias cannot be cut to some rows, the trial finds it
    h = _handle("bloom", partial_blocks="probe")
    got = integrated_gradients(h, PROMPT, "paris berlin", steps=4, batch_size=1000)
    assert got.params["partial_blocks"] is False and "partial_blocks" in got.params["probed"]
    _matches_naive(h, got)


def test_no_replay():
    h = _handle("gpt2")
    got = _forced(h, batch_size=1000, replay=False, partial_blocks=False)
    assert got.params["replay"] is False
    _matches_naive(h, got)


@pytest.mark.parametrize("model_type", ["gpt_neo", "falcon"])
def test_blocks_returning_attention_weights_never_share_passes(model_type):
    # (was: the _Ungroupable stacking paths) per-prompt attention weights cannot be stacked: even with the table
    # saying batch_prompts, the plan keeps these prompts apart, decided before any pass
    h = _handle(model_type, batch_prompts=True)
    got = attribute(h, CAUSAL_PARAPHRASES, "paris", steps=3, batch_size=1000, batch_prompts=True)
    assert [a.params["prompts_per_group"] for a in got] == [1, 1, 1]
    for prompt, a in zip(CAUSAL_PARAPHRASES, got):
        assert _rel_err(a.scores, naive_ig(h, prompt, "paris", steps=3)) <= 1e-6


def test_an_inconsistent_plan_is_refused():
    plan = ExecutionPlan(use_cache=True, prefix_from_clean_run=True, cache_copy="shallow", replay=True,
                         partial_blocks=True, head_on_scored_positions=False, fused_head=True)
    for changes, match in (({"cache_copy": "deep"}, "partial_blocks needs a cache"),
                           ({"use_cache": False}, "use_cache"),
                           ({"replay": False}, "partial_blocks needs replay"),
                           ({"head_on_scored_positions": True}, "without a KV cache")):
        with pytest.raises(KneuronsError, match=match):
            plan.replace(**changes)


def test_capability_values_are_checked():
    from kneurons.architectures import register_architecture

    with pytest.raises(KneuronsError, match="partial_blocks must be True, False or 'probe'"):
        _handle("gpt2", partial_blocks="yes")
    with pytest.raises(KneuronsError, match="unknown architecture field"):
        register_architecture("x_new", kind="causal", layers="h", ffn_out="mlp.c_proj", slice_everything=True)
