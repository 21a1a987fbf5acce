"""The pass size: a budget of row-positions splits a long prompt's layers over several passes (same scores as
unsplit passes), the available memory bounds the default pass, and a plan estimated beyond the available memory
is refused with one line before the clean run (the available memory is injected: ``plan.available_memory``)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from helpers import handle_for
from kneurons.attribution import executor, integrated_gradients, plan, riemann_right, rows
from kneurons.attribution.plan import Options, capabilities, decide, pass_shape
from kneurons.attribution.rows import (MEMORY_SHARE, PassShape, pass_memory, plan_passes, rows_per_layer,
                                       rows_that_fit)
from kneurons.errors import KneuronsError
from kneurons.prompts import encode

PROMPT = "the capital of france is ___"
MLM_PROMPT = "the capital of [MASK] is paris ."
LONG = "the capital of france is " + "a " * 50 + "___"  # 56 tokens: the tiny models take 64 positions
STEPS = 7  # rows per layer: alpha = 0 and the 6 points below 1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _memory(monkeypatch, available):
    """The machine's available memory as the engine reads it."""
    monkeypatch.setattr(plan, "available_memory", lambda device: available)


def _shape(h, prompt, target, **options):
    enc = encode(h, prompt, target)
    return pass_shape(h, decide(h, capabilities(h, enc), Options.build(h, steps=STEPS, **options), enc), [enc])


def _shape_by_hand(**changes) -> PassShape:
    s = dict(tokens=10, positions=10, prefix=0, prompts=1, n_layers=4, d_model=64, d_ff=256, heads=4, kv_width=128,
             vocab=1000, itemsize=4, eager_attention=False, logit_positions=0, scored=1, head_chunk=1000)
    return PassShape(**{**s, **changes})


# ------------------------------------------------------------------------------------------- the rule (pure)

def test_default_pass_size_is_a_budget_of_row_positions():
    path = riemann_right(20)  # 21 rows per layer (alpha = 0 and 19 points below 1) and one clean row
    per_layer = rows_per_layer(path) - 1
    for positions, gpu, rows_per_pass in [(10, False, 204), (100, False, 20), (1000, False, 2), (5000, False, 1),
                                          (5000, True, 3)]:
        shape = _shape_by_hand(tokens=positions, positions=positions)
        got = plan_passes(1, [0, 1, 2, 3], path, shape, None, None, gpu, True, True)
        assert (got.rows_per_pass, got.bound) == (rows_per_pass, "row_positions")
        sizes = [b - a for a, b in got.passes]
        assert max(sizes) <= rows_per_pass and sum(sizes) == 1 + 4 * per_layer
        assert [a for a, _ in got.passes] == [0] + [b for _, b in got.passes[:-1]]  # consecutive, in row order
        if rows_per_pass < per_layer:  # a layer's rows split over several passes
            assert len(got.passes) >= 4 * -(-per_layer // rows_per_pass)


def test_default_pass_size_bounded_by_logits_and_memory():
    path = riemann_right(20)
    own_head = _shape_by_hand(logit_positions=10, scored=0, vocab=50_000)  # 500k logits per row
    got = plan_passes(1, [0, 1], path, own_head, None, None, False, True, True)
    assert (got.rows_per_pass, got.bound) == ((1 << 22) // 500_000, "logits")
    shape = _shape_by_hand(positions=100, tokens=100)  # 20 rows by the row-positions
    three = pass_memory(shape, 3, 3 * shape.n_layers)  # three rows that run every block
    got = plan_passes(1, [0, 1], path, shape, None, int(three / MEMORY_SHARE), False, True, True)
    assert (got.rows_per_pass, got.bound) == (3, "memory")
    assert got.estimate <= three


def test_estimate_grows_with_rows_positions_and_attention():
    s = _shape_by_hand(positions=100, tokens=100)
    assert pass_memory(s, 2, 8) > pass_memory(s, 1, 4)
    assert pass_memory(_shape_by_hand(positions=200, tokens=200), 2, 8) > pass_memory(s, 2, 8)
    assert pass_memory(_shape_by_hand(positions=100, tokens=100, eager_attention=True), 2, 8) > pass_memory(s, 2, 8)
    cached = _shape_by_hand(positions=1, tokens=1001, prefix=1000)
    assert pass_memory(cached, 8, 32) - pass_memory(cached, 4, 16) >= 4 * 4 * 1000 * 128 * 4  # the cache per row
    assert rows_that_fit(s, pass_memory(s, 5, 5 * s.n_layers)) == 5
    assert rows_that_fit(s, pass_memory(s, 1, s.n_layers) - 1) == 0


# ------------------------------------------------------------------------------------------- the engine

@pytest.mark.parametrize("model_type", ["llama", "bert", "gpt2"])
def test_split_passes_give_the_same_scores(model_type, monkeypatch):
    """A tiny budget of row-positions cuts every layer's rows into passes of 2 or 3 rows: the scores are those of
    one pass holding all rows."""
    h = handle_for(model_type, dtype=torch.float64)
    prompt, target = (MLM_PROMPT, "france") if h.is_masked else (PROMPT, "paris berlin")
    _memory(monkeypatch, 1 << 40)
    whole = integrated_gradients(h, prompt, target, steps=STEPS, batch_size=1000)
    assert whole.params["pass_size_bound"] == "batch_size"
    positions = _shape(h, prompt, target).positions
    for rows_per_pass in (2, 3):
        monkeypatch.setattr(rows, "DEFAULT_TOKENS_PER_PASS", rows_per_pass * positions)
        split = integrated_gradients(h, prompt, target, steps=STEPS)
        assert (split.params["rows_per_pass"], split.params["pass_size_bound"]) == (rows_per_pass, "row_positions")
        assert float((split.scores - whole.scores).abs().max()) <= 1e-12 * float(whole.scores.abs().max())
        assert torch.allclose(split.baseline_scores, whole.baseline_scores, rtol=1e-12, atol=0)
        assert split.base_score == whole.base_score


def test_memory_bounds_the_default_pass(monkeypatch):
    h = handle_for("llama", dtype=torch.float64)
    shape = _shape(h, LONG, "paris", use_cache=False)
    available = int(pass_memory(shape, 3, 3 * shape.n_layers) / MEMORY_SHARE)  # about three rows in its share
    fit = rows_that_fit(shape, MEMORY_SHARE * available)
    assert 1 <= fit < STEPS < 2048 // shape.positions  # the memory, not the row-positions, bounds the pass
    _memory(monkeypatch, available)
    got = integrated_gradients(h, LONG, "paris", steps=STEPS, use_cache=False)
    assert (got.params["rows_per_pass"], got.params["pass_size_bound"]) == (fit, "memory")
    assert 0 < got.params["pass_memory_estimate"] <= available
    _memory(monkeypatch, 1 << 40)
    whole = integrated_gradients(h, LONG, "paris", steps=STEPS, use_cache=False, batch_size=1000)
    assert float((got.scores - whole.scores).abs().max()) <= 1e-12 * float(whole.scores.abs().max())


def _no_clean_run(monkeypatch):
    calls = []
    real = executor.prepare
    monkeypatch.setattr(executor, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_a_prompt_too_long_for_one_row_is_refused(model_type, monkeypatch):
    """Memory for one row of the short prompt but not of the long one: the long one is refused."""
    h = handle_for(model_type, dtype=torch.float64)
    short, long, target = ((MLM_PROMPT, LONG.replace("___", "[MASK] ."), "france") if h.is_masked
                           else (PROMPT, LONG, "paris"))
    one_row = [pass_memory(s, 1, s.n_layers) for s in (_shape(h, short, target), _shape(h, long, target))]
    assert one_row[0] < one_row[1]
    available = (one_row[0] + one_row[1]) // 2
    _memory(monkeypatch, available)
    assert integrated_gradients(h, short, target, steps=STEPS).params["pass_memory_estimate"] <= available
    calls = _no_clean_run(monkeypatch)
    with pytest.raises(KneuronsError) as exc:
        integrated_gradients(h, long, target, steps=STEPS)
    msg = str(exc.value)
    tokens = len(encode(h, long, target).input_ids)
    assert "\n" not in msg and msg.startswith(f"a {tokens}-token prompt needs about")
    assert "even at batch_size=1" in msg and "of memory available" in msg and "shorter prompt" in msg
    assert not calls  # refused before the clean run


def test_a_batch_size_beyond_memory_is_refused(monkeypatch):
    h = handle_for("llama", dtype=torch.float64)
    shape = _shape(h, LONG, "paris", use_cache=False)
    available = pass_memory(shape, 3, 3 * shape.n_layers)  # about three rows fit, not all 15
    fit = rows_that_fit(shape, available)
    assert 1 <= fit < 15
    _memory(monkeypatch, available)
    calls = _no_clean_run(monkeypatch)
    with pytest.raises(KneuronsError) as exc:
        integrated_gradients(h, LONG, "paris", steps=STEPS, use_cache=False, batch_size=64)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"batch_size=64 plans passes of 15 rows of a {shape.tokens}-token")
    assert f"lower --batch-size / batch_size= (about {fit} rows fit)" in msg and "fewer --steps" in msg
    assert not calls
    got = integrated_gradients(h, LONG, "paris", steps=STEPS, use_cache=False, batch_size=3)  # what fits runs
    assert got.params["rows_per_pass"] == 3 and got.params["pass_memory_estimate"] <= available


def test_unknown_memory_refuses_nothing(monkeypatch):
    h = handle_for("bert", dtype=torch.float64)
    _memory(monkeypatch, None)
    got = integrated_gradients(h, MLM_PROMPT, "france", steps=3)
    assert got.params["pass_size_bound"] == "row_positions"


@pytest.mark.parametrize("model_type, attn, kept", [("llama", "sdpa", False), ("llama", "eager", True),
                                                     ("falcon", "sdpa", True), ("bert", "sdpa", False)])
def test_attention_weights_counted_where_kept(model_type, attn, kept):
    """Eager attention keeps its weights, sdpa not — except Falcon's (declared in the table)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from helpers import word_tokenizer
    from kneurons import ModelHandle
    from kneurons.architectures import ARCHITECTURES
    from tiny import tiny_config

    kind = ARCHITECTURES[model_type].kind
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    model = auto.from_config(tiny_config(model_type), attn_implementation=attn)
    h = ModelHandle.from_model(model, word_tokenizer(kind))
    prompt, target = (MLM_PROMPT, "france") if h.is_masked else (PROMPT, "paris")
    shape = _shape(h, prompt, target, use_cache=False)
    assert shape.eager_attention is kept
    weights = rows.block_bytes(shape) - rows.block_bytes(dataclasses.replace(shape, eager_attention=False))
    assert weights == (int(rows.ATTN_PER_HEAD * shape.heads * shape.positions ** 2 * shape.itemsize) if kept else 0)


def test_available_memory_reads_the_machine():
    got = plan.available_memory("cpu")
    if os.path.exists("/proc/meminfo"):
        total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
        assert 0 < got <= total
    assert plan.available_memory("meta") is None
