"""Suppress/amplify through the hook mechanism; weight edits that revert bit-exactly; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import handle_for
from kneurons.errors import KneuronsError
from kneurons.hooks import ffn_hooks
from kneurons.interventions import (Intervention, amplify, erase_relation, measure_intervention, perplexity, score,
                                    shared_neurons, suppress, update_fact, weights_digest, save_edited)

PROMPT = "the capital of france is ___ ."


def _manual(h, prompt, target, neurons, factor, position):
    """Reference: patch the activations by hand through ffn_hooks on a full forward."""
    from kneurons.prompts import encode

    e = encode(h, prompt, target)
    by = {}
    for l, i in neurons:
        by.setdefault(l, []).append(i)

    def fn(layer, x):
        if layer not in by:
            return None
        x = x.clone()
        sl = (slice(None), slice(None)) if position == "all" else (slice(None), e.blank)
        x[sl + (by[layer],)] = x[sl + (by[layer],)] * factor
        return x

    with torch.no_grad(), ffn_hooks(h.arch, fn):
        logits = h.model(input_ids=torch.tensor([e.input_ids])).logits
    lp = torch.log_softmax(logits[0, e.score_positions], -1)[range(len(e.target_ids)), e.target_ids].sum()
    return float(lp.exp())


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("factor, position", [(0.0, "blank"), (2.0, "blank"), (0.0, "all"), (-1.5, "all")])
def test_intervention_matches_manual_patch(model_type, factor, position):
    h = handle_for(model_type, dtype=torch.float64)
    prompt = "the capital of [MASK] is paris ." if h.is_masked else PROMPT
    target = "france" if h.is_masked else "paris berlin"
    neurons = [(0, 3), (0, 7), (1, 11)]
    got = score(h, [prompt], target, Intervention(h, neurons, factor, position))[0].prob
    assert got == pytest.approx(_manual(h, prompt, target, neurons, factor, position), rel=1e-10)
    assert got != pytest.approx(score(h, [prompt], target)[0].prob, rel=1e-6)  # it does change something


def test_blank_position_in_a_batch_of_different_lengths():
    h = handle_for("llama", dtype=torch.float64)
    prompts = [PROMPT, "a b c d e f g h was born in ___", "paris is the capital of ___"]
    targets = ["paris", "rome", "france"]
    iv = suppress(h, [(1, 5), (0, 2)])
    together = score(h, prompts, targets, iv)
    for p, t, a in zip(prompts, targets, together):
        # a padded batch vs one prompt: eager attention's float32 softmax rounds differently (~1e-8)
        assert a.prob == pytest.approx(_manual(h, p, t, [(1, 5), (0, 2)], 0.0, "blank"), rel=1e-7)


def test_blank_needs_kneurons_scoring():
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match="position='blank'"):
        with suppress(h, [(0, 1)]):
            h.model(input_ids=torch.tensor([[5, 6, 7]]))
    with amplify(h, [(0, 1)], position="all"):
        h.model(input_ids=torch.tensor([[5, 6, 7]]))  # fine
    assert all(not m._forward_pre_hooks for m in h.arch.ffn_out)  # hooks removed


@pytest.mark.parametrize("neurons, factor, match", [
    ([], 0.0, "empty neuron set"), ([(5, 0)], 0.0, "out of range"), ([(0, 10 ** 6)], 0.0, "out of range"),
    ([(0, 1)], float("nan"), "finite"), ([(0, 1)], float("inf"), "finite"),
])
def test_intervention_bad_input(neurons, factor, match):
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match=match):
        Intervention(h, neurons, factor)


def test_measure_intervention_groups():
    h = handle_for("llama", dtype=torch.float64)
    controls = [("same_relation", "the capital of italy is ___", "rome"),
                ("other_relation", "a b c was born in ___", "paris")]
    res = measure_intervention(h, [(0, 1), (1, 2)], [PROMPT, "france has its capital in ___"], "paris", 0.0, controls)
    df = res.to_dataframe()
    assert list(df.group) == ["fact", "fact", "same_relation", "other_relation"]
    r = df.iloc[0]
    assert r.rel_change == pytest.approx((r.after - r.before) / r.before)
    s = res.summary()
    assert s["fact"] == pytest.approx(df[df.group == "fact"].rel_change.mean())
    assert s["specificity"] == pytest.approx(abs(s["fact"]) / abs(df[df.group != "fact"].rel_change.mean()))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_update_changes_slots_by_the_rule_and_reverts_bit_exactly(model_type):
    h = handle_for(model_type)
    before = weights_digest(h.model)
    neurons = [(0, 4), (1, 9)]
    slots_before = {n: h.arch.value_slots(n[0])[n[1]].detach().clone() for n in neurons}
    U = h.arch.unembedding().detach()
    t_old = h.tokenizer("paris", add_special_tokens=False)["input_ids"][0]
    t_new = h.tokenizer("berlin", add_special_tokens=False)["input_ids"][0]
    prompt = "the capital of [MASK] is nice ." if h.is_masked else PROMPT
    edit = update_fact(h, neurons, "paris", "berlin", prompt=prompt)
    for (l, i), v in slots_before.items():
        v = v.double()
        e1, e2 = U[t_old].double(), U[t_new].double()
        expected = v - v.norm() / e1.norm() * e1 + 8 * v.norm() / e2.norm() * e2
        assert torch.allclose(h.arch.value_slots(l)[i].double(), expected, rtol=1e-6, atol=1e-6)
    # only those slots changed
    assert weights_digest(h.model) != before
    edit.revert()
    assert weights_digest(h.model) == before
    with pytest.raises(KneuronsError, match="already reverted"):
        edit.revert()


def test_edit_context_manager_and_erase(tmp_path):
    h = handle_for("llama")
    before = weights_digest(h.model)
    sets = [[(0, 1), (1, 2)], [(0, 1), (1, 3)], [(0, 1), (1, 2)]]
    assert shared_neurons(sets, min_facts=2) == [(0, 1), (1, 2)]
    assert shared_neurons(sets, top_k=1) == [(0, 1)]
    with erase_relation(h, sets, min_facts=2, mode="zero") as edit:
        assert torch.count_nonzero(h.arch.value_slots(0)[1]) == 0 and edit.kind == "erase"
        assert weights_digest(h.model) != before
    assert weights_digest(h.model) == before
    with erase_relation(h, sets, min_facts=3, mode="unk"):
        U = h.arch.unembedding()
        assert torch.equal(h.arch.value_slots(0)[1], U[h.tokenizer.unk_token_id])
    assert weights_digest(h.model) == before
    with pytest.raises(KneuronsError, match="no neuron is shared"):
        erase_relation(h, sets, min_facts=4)


def test_edited_model_saves_and_reloads(tmp_path):
    from kneurons import load_model

    h = handle_for("gpt2")
    edit = update_fact(h, [(0, 4)], "paris", "berlin", prompt=PROMPT)
    edited = weights_digest(h.model)
    d = save_edited(h, tmp_path / "edited")
    back = load_model(str(d))
    assert weights_digest(back.model) == edited  # the reloaded model is the edited one, bit for bit
    assert torch.equal(back.arch.value_slots(0)[4], h.arch.value_slots(0)[4])
    edit.revert()
    assert not torch.equal(back.arch.value_slots(0)[4], h.arch.value_slots(0)[4])
    with pytest.raises(KneuronsError, match="not empty"):
        save_edited(h, d)


@pytest.mark.parametrize("kwargs, match", [
    ({"neurons": [], "new": "berlin"}, "empty neuron set"), ({"neurons": [(0, 1)], "new": "paris"}, "equals the old"),
    ({"neurons": [(0, 99)], "new": "berlin"}, "out of range"),
])
def test_update_bad_input(kwargs, match):
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match=match):
        update_fact(h, kwargs["neurons"], "paris", kwargs["new"], prompt=PROMPT)


def test_cannot_edit_integer_weights():
    h = handle_for("gpt2")
    for m in h.arch.ffn_out:  # what an int8-quantized checkpoint looks like to us
        m.weight = torch.nn.Parameter(m.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(KneuronsError, match="quantized/integer"):
        update_fact(h, [(0, 1)], "paris", "berlin", prompt=PROMPT)


def test_perplexity_is_exp_mean_nll():
    h = handle_for("llama", dtype=torch.float64)
    prompts, targets = [PROMPT, "paris is the capital of ___"], ["paris", "france"]
    lps = [a.logprob for a in score(h, prompts, targets)]
    assert perplexity(h, prompts, targets) == pytest.approx(math.exp(-sum(lps) / 2))


def test_assess_inside_an_intervention_and_no_reentry():
    from kneurons import assess

    h = handle_for("llama", dtype=torch.float64)
    iv = amplify(h, [(0, 3), (1, 4)], factor=2.0)
    with iv:
        inside = assess(h, [PROMPT], "paris")[0].prob  # assess publishes the blank position itself
        assert score(h, [PROMPT], "paris", iv)[0].prob == inside  # already active: not entered twice
        with pytest.raises(KneuronsError, match="already active"):
            iv.__enter__()
    assert inside == pytest.approx(_manual(h, PROMPT, "paris", [(0, 3), (1, 4)], 2.0, "blank"), rel=1e-10)
    assert all(not m._forward_pre_hooks for m in h.arch.ffn_out)


def test_overlapping_edits_must_be_reverted_last_first():
    h = handle_for("llama")
    before = weights_digest(h.model)
    e1 = update_fact(h, [(0, 4)], "paris", "berlin", prompt=PROMPT)
    e2 = erase_relation(h, [[(0, 4)]], min_facts=1)
    with pytest.raises(KneuronsError, match="reverse order"):
        e1.revert()
    e2.revert()
    e1.revert()
    assert weights_digest(h.model) == before


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_gradient_space_vector_raises_the_logit_to_first_order(model_type):
    """space="gradient": pushing the last block's output at the blank along the vector raises the target's logit
    by eps * |g|^2 to first order (BERT: through its MLM-head transform; GPT-2/Llama: through the final norm)."""
    from kneurons.interventions import target_vector
    from kneurons.prompts import encode

    h = handle_for(model_type, dtype=torch.float64)
    prompt = "the capital of [MASK] is paris ." if h.is_masked else "the capital of france is ___ ."
    target = "france" if h.is_masked else "paris"
    g = target_vector(h, target, prompt, space="gradient")
    enc = encode(h, prompt, target)
    eps = 1e-5

    def logit(shift):
        def hook(mod, args, out):
            hs = out[0] if isinstance(out, tuple) else out
            hs = hs.clone()
            hs[0, enc.blank] += shift
            return (hs,) + tuple(out[1:]) if isinstance(out, tuple) else hs
        hd = h.arch.layers[h.n_layers - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(h.model(input_ids=torch.tensor([enc.input_ids])).logits[0, enc.score_positions[0],
                                                                                      enc.target_ids[0]])
        finally:
            hd.remove()

    gain = logit(eps * g) - logit(torch.zeros_like(g))
    assert gain == pytest.approx(eps * float(g @ g), rel=1e-3)
    with pytest.raises(KneuronsError, match="space"):
        target_vector(h, target, prompt, space="sideways")


@pytest.mark.parametrize("model_type", ["bert", "electra", "gpt2", "llama", "gemma2"])
def test_head_space_vector_is_what_the_head_maps_to_the_target(model_type):
    """space="head": the model's own head, fed norm·u as the last block's output at the blank (BERT: through its
    MLM-head transform; ELECTRA: through its narrower generator head; Gemma-2: through final soft-capping), ranks
    the target first, and gives it at least the log-probability of the unembedding row the search starts from and
    of 20 random directions; one joint search for two targets equals two separate ones."""
    from kneurons.interventions import _blank_norm, _head_directions, target_vector
    from kneurons.prompts import encode

    h = handle_for(model_type, dtype=torch.float64)
    prompt = "the capital of [MASK] is paris ." if h.is_masked else "the capital of france is ___ ."
    pairs = [("france", "italy"), ("paris", "berlin")] if h.is_masked else [("paris", "berlin"), ("rome", "madrid")]
    enc = encode(h, prompt, pairs[0][0])
    norm = _blank_norm(h, prompt, pairs[0][0])
    if model_type == "bert":  # BERT has no final norm: the last block's output is the last hidden state
        with torch.no_grad():
            hs = h.model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states[-1]
        assert norm == pytest.approx(float(hs[0, enc.blank].norm()), rel=1e-12)

    def head_logprobs(vec):  # log-probabilities at the blank with the last block's output there = norm·vec
        def hook(mod, args, out):
            hs = (out[0] if isinstance(out, tuple) else out).clone()
            hs[0, enc.blank] = norm * vec / vec.norm()
            return (hs,) + tuple(out[1:]) if isinstance(out, tuple) else hs
        hd = h.arch.layers[h.n_layers - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = h.model(input_ids=torch.tensor([enc.input_ids])).logits[0, enc.score_positions[0]]
            return torch.log_softmax(logits, -1)
        finally:
            hd.remove()

    gen = torch.Generator().manual_seed(0)
    U = h.arch.unembedding()
    for target in [t for pair in pairs for t in pair]:
        tid = encode(h, prompt, target).target_ids[0]
        u = target_vector(h, target, prompt, space="head")
        assert u.shape == (h.arch.d_model,) and float(u.norm()) == pytest.approx(1.0, abs=1e-12)
        lp = head_logprobs(u)
        assert int(lp.argmax()) == tid
        rivals = [head_logprobs(torch.randn(u.shape[0], generator=gen, dtype=torch.float64))[tid] for _ in range(20)]
        if U.shape[1] == h.arch.d_model:
            rivals.append(head_logprobs(U[tid].detach().double())[tid])
        assert float(lp[tid]) >= max(map(float, rivals))
    ids = [encode(h, prompt, t).target_ids[0] for t in pairs[0]]
    joint = _head_directions(h, ids, norm, steps=20)
    alone = torch.cat([_head_directions(h, [i], norm, steps=20) for i in ids])
    torch.testing.assert_close(joint, alone, rtol=0, atol=1e-9)


def test_head_and_gradient_spaces_work_inside_inference_mode():
    h = handle_for("bert")
    before = weights_digest(h.model)
    with torch.inference_mode():
        for space in ("head", "gradient"):
            with update_fact(h, [(1, 2)], "france", "italy", prompt="the capital of [MASK] is paris .", space=space):
                pass
    assert weights_digest(h.model) == before


def test_head_space_refuses_unpadded_hidden_states():
    """A last block whose output is not [batch, positions, width] (unpadded attention) is a one-line error."""
    h = handle_for("llama")
    flatten = h.arch.layers[-1].register_forward_hook(
        lambda mod, args, out: (out[0] if isinstance(out, tuple) else out).flatten(0, 1))
    try:
        with pytest.raises(KneuronsError, match=r"not \[batch, positions, width\]"):
            update_fact(h, [(0, 1)], "paris", "berlin", prompt=PROMPT, space="head")
    finally:
        flatten.remove()


def test_electra_updates_only_in_head_space():
    """ELECTRA's generator head projects to a narrower embedding: the paper's e (an unembedding row) is not in the
    residual stream and the update is refused; the head space's vectors are (model width), the slots change by the
    paper's rule with them, and the edit reverts bit-exactly."""
    from kneurons.interventions import target_vectors

    h = handle_for("electra", dtype=torch.float64)
    prompt = "the capital of [MASK] is paris ."
    before = weights_digest(h.model)
    with pytest.raises(KneuronsError, match="not in the model width"):
        update_fact(h, [(0, 3), (1, 5)], "france", "italy", prompt=prompt)
    e_old, e_new = target_vectors(h, ["france", "italy"], prompt, "head")
    assert e_old.shape == e_new.shape == (h.arch.d_model,)
    slots = {n: h.arch.value_slots(n[0])[n[1]].clone() for n in [(0, 3), (1, 5)]}
    with update_fact(h, list(slots), "france", "italy", prompt=prompt, space="head", lambda1=1.0, lambda2=8.0):
        for (l, i), v in slots.items():
            want = v + v.norm() * (8.0 * e_new / e_new.norm() - e_old / e_old.norm())
            torch.testing.assert_close(h.arch.value_slots(l)[i], want, rtol=1e-12, atol=1e-12)
    assert weights_digest(h.model) == before


def _tokenizer_with(**specials):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    names = list(dict.fromkeys(specials.values())) + ["the", "capital", "of", "france", "is", "paris"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(names)}, unk_token=specials["unk_token"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.mark.parametrize("specials, genuine", [
    (dict(unk_token="[UNK]", pad_token="[PAD]"), True),                                         # BERT-style
    (dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"), True),                         # Llama/Gemma-style
    (dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"), True),      # ... padding with it
    (dict(unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>"), False),  # GPT-2
    (dict(unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>"), False),      # SmolLM2
    (dict(unk_token="</s>", bos_token="</s>", eos_token="</s>", pad_token="<pad>"), False),          # OPT
])
def test_erase_with_unk_needs_a_real_unknown_token(specials, genuine):
    from kneurons.interventions import unknown_token

    tok = _tokenizer_with(**specials)
    unk, why = unknown_token(tok)
    assert (unk == tok.convert_tokens_to_ids(specials["unk_token"])) if genuine else (unk is None and why)
    h = handle_for("gpt2")
    h.tokenizer = tok
    before = weights_digest(h.model)
    U = h.arch.unembedding()
    if genuine:
        with erase_relation(h, [[(0, 1)]], min_facts=1, mode="unk") as edit:
            assert torch.equal(h.arch.value_slots(0)[1], U[unk]) and edit.info["mode"] == "unk"
    else:
        with pytest.warns(UserWarning, match="sequence marker"):
            edit = erase_relation(h, [[(0, 1)]], min_facts=1, mode="unk")
        with edit:
            assert edit.info["mode"] == "zero" and not h.arch.value_slots(0)[1].any()
    assert weights_digest(h.model) == before


def test_update_with_precomputed_vectors():
    """vectors=(e_old, e_new) from target_vectors gives the same edit as computing them inside; wrong shapes are a
    one-line error."""
    from kneurons.interventions import target_vectors

    h = handle_for("llama")
    vecs = target_vectors(h, ["paris", "berlin"], PROMPT, "head")
    with update_fact(h, [(0, 4), (1, 2)], "paris", "berlin", prompt=PROMPT, space="head"):
        inside = [h.arch.value_slots(l)[i].clone() for l, i in [(0, 4), (1, 2)]]
    with update_fact(h, [(0, 4), (1, 2)], "paris", "berlin", prompt=PROMPT, space="head", vectors=vecs):
        given = [h.arch.value_slots(l)[i].clone() for l, i in [(0, 4), (1, 2)]]
    assert all(torch.equal(a, b) for a, b in zip(inside, given))
    with pytest.raises(KneuronsError, match="model width"):
        update_fact(h, [(0, 4)], "paris", "berlin", prompt=PROMPT, vectors=(vecs[0][:3], vecs[1]))


@pytest.mark.parametrize("tol", [4.8, 4.95, 5.1])
def test_head_search_rows_stop_independently(monkeypatch, tol):
    """With the early stop (a row is done once -log p < HEAD_TOL) a joint search still equals separate ones. On
    this tiny BERT -log p goes from 5.50 to 4.78-5.02 in 60 steps: these tolerances stop rows at different steps."""
    from kneurons import interventions
    from kneurons.interventions import _blank_norm, _head_directions
    from kneurons.prompts import encode

    h = handle_for("bert", dtype=torch.float64)
    prompt = "the capital of [MASK] is paris ."
    ids = [encode(h, prompt, t).target_ids[0] for t in ("france", "italy", "spain")]
    norm = _blank_norm(h, prompt, "france")
    monkeypatch.setattr(interventions, "HEAD_TOL", -1.0)  # never done: all 60 steps
    full = _head_directions(h, ids, norm, steps=60)
    monkeypatch.setattr(interventions, "HEAD_TOL", tol)
    joint = _head_directions(h, ids, norm, steps=60)
    alone = torch.cat([_head_directions(h, [i], norm, steps=60) for i in ids])
    torch.testing.assert_close(joint, alone, rtol=0, atol=1e-9)
    assert not torch.allclose(joint, full, rtol=0, atol=1e-9)  # some row did stop early


def test_two_handles_on_one_model_share_the_edit_stack():
    from kneurons import ModelHandle

    h1 = handle_for("llama")
    h2 = ModelHandle.from_model(h1.model, h1.tokenizer, name="second")
    before = weights_digest(h1.model)
    e1 = update_fact(h1, [(0, 4), (1, 2)], "paris", "berlin", prompt=PROMPT)
    e2 = erase_relation(h2, [[(0, 4)]], min_facts=1)  # the same slot (0, 4), through the other handle
    with pytest.raises(KneuronsError, match="reverse order"):
        e1.revert()
    e2.revert()
    e1.revert()
    assert weights_digest(h1.model) == before


def test_disjoint_edits_revert_in_any_order():
    h = handle_for("llama")
    before = weights_digest(h.model)
    e1 = update_fact(h, [(0, 4)], "paris", "berlin", prompt=PROMPT)
    e2 = erase_relation(h, [[(1, 7)]], min_facts=1)
    e1.revert()  # no slot in common with e2
    e2.revert()
    assert weights_digest(h.model) == before


def test_exception_inside_an_edit_block_surfaces_and_everything_reverts():
    from kneurons.interventions import applied_edits

    h = handle_for("llama")
    before = weights_digest(h.model)
    with pytest.raises(ZeroDivisionError) as exc:
        with update_fact(h, [(0, 4)], "paris", "berlin", prompt=PROMPT):
            erase_relation(h, [[(0, 4), (1, 1)]], min_facts=1)  # an inner edit of the same slot, left applied
            1 / 0
    assert weights_digest(h.model) == before and applied_edits(h) == []
    assert any("also reverted" in note for note in getattr(exc.value, "__notes__", []))
    outer = update_fact(h, [(0, 4)], "paris", "berlin", prompt=PROMPT)
    inner = erase_relation(h, [[(0, 4)]], min_facts=1)
    with pytest.raises(KneuronsError, match="reverse order"):  # a block ending normally, its inner edit applied
        outer.__exit__(None, None, None)
    assert applied_edits(h) == [outer, inner]  # said, and nothing changed
    inner.revert()
    outer.revert()
    assert weights_digest(h.model) == before


def test_an_edit_that_fails_half_way_leaves_nothing_applied(monkeypatch):
    from kneurons.interventions import applied_edits

    h = handle_for("llama")
    before = weights_digest(h.model)
    calls = {"n": 0}
    original = torch.Tensor.copy_

    def failing_copy(self, src, *a, **kw):  # the second slot write fails (e.g. a device error)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure while writing a value slot")
        return original(self, src, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        erase_relation(h, [[(0, 4), (1, 2), (1, 3)]], min_facts=1)
    monkeypatch.undo()
    assert weights_digest(h.model) == before and applied_edits(h) == []
