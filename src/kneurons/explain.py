"""What a neuron writes: the tokens its value slot promotes and demotes, how active it is on a prompt, and on which
facts it is most active.

**Vocabulary projection.** A neuron's value slot ``v`` (the FFN output projection's weight column, see
:mod:`kneurons.hooks`) is what the neuron adds to the residual stream per unit of activation. Read through the
model's own output head — everything between the last block and the logits: the final norm, the unembedding (and,
for BERT-type models, the MLM head's transform) — it gives one logit per vocabulary token; the highest are the
tokens the neuron *promotes*, the lowest those it *demotes* (the standard vocabulary projection of FFN values,
Geva et al. 2022, as in LM-Debugger). The head is run by the model itself: a one-token forward pass whose last
block's output is replaced by ``v`` (the same device as ``update_fact(space="head")``), so nothing of the head is
written again here.

**Activation** on a prompt: the neuron's activation at the blank (:func:`kneurons.neurons.blank_activations`).
**Most active facts**: the neuron's blank activation on the first usable prompt of every fact (by default the
built-in facts of :func:`kneurons.data.load_facts`; facts a tokenizer cannot spell are skipped), highest first.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .errors import KneuronsError
from .hooks import capture
from .interventions import _block_states, _last_block
from .neurons import blank_activations, check_neurons
from .prompts import encode, pad_batch, pad_id

__all__ = ["explain_neurons", "vocabulary_projection", "fact_prompts", "fact_activations"]

MAX_TOP_K = 1000


def _check_top_k(top_k, name: str = "top_k") -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= int(top_k) <= MAX_TOP_K:
        raise KneuronsError(f"{name} must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return int(top_k)


def vocabulary_projection(handle, neurons, batch_size: int = 64) -> torch.Tensor:
    """Logits ``[len(neurons), vocab]`` of each neuron's value slot read through the model's output head.

    ``neurons``: ``(layer, index)`` pairs (or a :class:`~kneurons.neurons.KnowledgeNeurons`), checked against the
    model's shape; rows follow their sorted, distinct order (as :func:`kneurons.neurons.check_neurons` gives).
    """
    nrns = check_neurons(handle, neurons)
    slots = torch.stack([handle.arch.value_slots(l)[i].detach() for l, i in nrns])  # [n, d_model]
    out = []
    first_id = torch.zeros(1, dtype=torch.long, device=handle.device)

    for start in range(0, len(nrns), batch_size):
        chunk = slots[start: start + batch_size]

        def replace(mod, args, o, chunk=chunk):  # the last block's output := the value slots, one row each
            h = _block_states(o)
            x = chunk.to(h.device, h.dtype)[:, None, :].expand_as(h)
            return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x

        hook = _last_block(handle).register_forward_hook(replace)
        try:
            with torch.inference_mode():
                ids = first_id.expand(len(chunk), 1)
                logits = handle.model(input_ids=ids).logits[:, -1]
        finally:
            hook.remove()
        out.append(logits.float().cpu())
    return torch.cat(out)


def fact_prompts(handle, facts=None) -> list[tuple[str, str, str]]:
    """``(label, prompt, target)`` of every fact of ``facts`` (a :class:`kneurons.data.FactSet`; default the
    built-in set) that the model can be asked: its first template usable by the model kind whose target the
    tokenizer can spell. The label is ``"relation: subject → object"``."""
    from .data import FactSet, load_facts

    facts = load_facts() if facts is None else facts
    if not isinstance(facts, FactSet):
        raise KneuronsError(f"facts must be a FactSet (kneurons.data.load_facts), got {type(facts).__name__}")
    out = []
    for rel in facts.relations:
        for f in rel.facts:
            for prompt in rel.prompts(f, causal=handle.is_causal):
                try:
                    encode(handle, prompt, f.object)
                except KneuronsError:
                    continue
                out.append((f"{rel.id}: {f.subject} → {f.object}", prompt, f.object))
                break
    return out


def fact_activations(handle, items: Sequence[tuple[str, str, str]], batch_size: int = 32) -> torch.Tensor:
    """Blank activations ``[len(items), n_layers, d_ff]`` of ``(label, prompt, target)`` items (right-padded
    batches: the blank's activation does not see the padding)."""
    encs = [encode(handle, p, t) for _, p, t in items]
    if not encs:
        return torch.zeros(0, handle.n_layers, handle.d_ff)
    out = []
    for start in range(0, len(encs), batch_size):
        chunk = encs[start: start + batch_size]
        ids, mask = pad_batch(chunk, pad_id(handle.tokenizer), handle.device)
        blanks = torch.tensor([e.blank for e in chunk], device=handle.device)
        with torch.inference_mode(), capture(handle.arch, blanks) as cap:
            handle.model(input_ids=ids, attention_mask=mask)
        out.append(cap.stacked().transpose(0, 1).float().cpu())  # [batch, n_layers, d_ff]
    return torch.cat(out)


def _token(tokenizer, i: int) -> str:
    """The token's text, or ``<id N>`` where it decodes to nothing (ids beyond a small tokenizer's vocabulary)."""
    text = tokenizer.decode([int(i)])
    return text if text else f"<id {int(i)}>"


def explain_neurons(handle, neurons, top_k: int = 10, prompt: str | None = None, target: str | None = None,
                    facts=None, top_facts: int = 3, fact_acts: tuple[list, torch.Tensor] | None = None):
    """What each neuron writes, as a DataFrame with one row per neuron (sorted, distinct):

    ``layer, neuron``; ``promotes`` / ``demotes``: the ``top_k`` tokens with the highest / lowest logits of the
    neuron's value slot read through the output head, and their logits (``promote_logits``, ``demote_logits``);
    ``slot_norm``: the value slot's norm; ``activation``: its blank activation on ``prompt`` (with ``target``;
    default the first prompt and target of a :class:`~kneurons.neurons.KnowledgeNeurons`; NaN without a prompt);
    ``top_facts`` / ``top_fact_activations``: the ``top_facts`` facts it is most active on (``facts``: a
    :class:`~kneurons.data.FactSet`, default the built-in set; ``top_facts=0`` skips them). ``fact_acts``: the
    ``(items, activations)`` of :func:`fact_prompts` / :func:`fact_activations`, computed once by a caller that
    explains many sets (the explorer)."""
    import pandas as pd

    top_k = _check_top_k(top_k)
    if isinstance(top_facts, bool) or not isinstance(top_facts, numbers.Integral) or not 0 <= top_facts <= MAX_TOP_K:
        raise KneuronsError(f"top_facts must be an integer from 0 to {MAX_TOP_K}, got {top_facts!r}")
    if prompt is None and getattr(neurons, "prompts", None):
        prompt = neurons.prompts[0]
        target = target if target is not None else neurons.target
    if prompt is not None and target is None:
        raise KneuronsError("explaining activations on a prompt needs its target")
    nrns = check_neurons(handle, neurons)
    acts = blank_activations(handle, prompt, target) if prompt is not None else None
    logits = vocabulary_projection(handle, nrns)
    k = min(top_k, logits.shape[1])
    hi, lo = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    if top_facts and fact_acts is None:
        items = fact_prompts(handle, facts)
        fact_acts = (items, fact_activations(handle, items))
    tok = handle.tokenizer
    rows = []
    for r, (l, i) in enumerate(nrns):
        row = {"layer": l, "neuron": i,
               "promotes": [_token(tok, t) for t in hi.indices[r].tolist()],
               "promote_logits": [float(v) for v in hi.values[r]],
               "demotes": [_token(tok, t) for t in lo.indices[r].tolist()],
               "demote_logits": [float(v) for v in lo.values[r]],
               "slot_norm": float(handle.arch.value_slots(l)[i].detach().double().norm()),
               "activation": float(acts[l, i]) if acts is not None else float("nan")}
        if top_facts:
            items, fa = fact_acts
            col = fa[:, l, i] if len(items) else torch.zeros(0)
            order = col.argsort(descending=True)[:top_facts].tolist()
            row["top_facts"] = [items[j][0] for j in order]
            row["top_fact_activations"] = [float(col[j]) for j in order]
        rows.append(row)
    return pd.DataFrame(rows)

