"""Experiment 4 — activating prompts (BingRel): are a fact's knowledge neurons active where the fact is said?

For each known fact with knowledge neurons, three bags of web sentences: ``head_tail`` (sentences that mention
the subject and the answer — they tend to express the fact), ``head_only`` (the subject without the answer) and
``random`` (``head_tail`` sentences of other facts of the relation, seeded). Each sentence runs through the
model once (no blank, truncated to ``max_tokens``); a neuron's activation on a sentence is the **mean over its
token positions** (padding and special tokens excluded) of the FFN activation that enters the output projection
(``mean_activation``), and also the **maximum over positions** (``max_activation``: a causal model's knowledge
neuron fires where the answer is about to be predicted, one position of the sentence, which a mean dilutes); the
bag's score is the mean over the fact's neurons and the bag's sentences. Paper (BERT-base): 0.485 / 0.019 /
−0.018 (its position rule is not published).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import KneuronsError
from ..hooks import ffn_hooks
from ..prompts import pad_id
from .common import FactItem, rng_for
from ..data.bingrel import bingrel_filename, load_bingrel
from .common import Experiment
from .units import task

BAGS = ("head_tail", "head_only", "random")


def neuron_activations(handle, texts: Sequence[str], neurons, max_tokens: int = 128, batch_size: int = 16,
                       reduce: str = "mean") -> torch.Tensor:
    """``[len(texts), len(neurons)]``: each neuron's activation averaged (``reduce="mean"``) or maximized
    (``"max"``) over the positions of each text (padding and special tokens excluded)."""
    if reduce not in ("mean", "max"):
        raise KneuronsError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    return _position_stats(handle, texts, neurons, max_tokens, batch_size)[reduce]


def _position_stats(handle, texts, neurons, max_tokens: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Both reductions from one forward pass per batch."""
    neurons = [tuple(n) for n in neurons]
    layers = sorted({l for l, _ in neurons})
    tok = handle.tokenizer
    out = {"mean": [], "max": []}
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start: start + batch_size])
        encs = [tok(t, truncation=True, max_length=max_tokens, return_special_tokens_mask=True) for t in chunk]
        n = max(len(e["input_ids"]) for e in encs)
        ids = torch.full((len(encs), n), pad_id(tok), dtype=torch.long)
        mask = torch.zeros(len(encs), n, dtype=torch.long)
        words = torch.zeros(len(encs), n)  # positions averaged over: not padding, not special tokens
        for r, e in enumerate(encs):
            k = len(e["input_ids"])
            ids[r, :k] = torch.tensor(e["input_ids"])
            mask[r, :k] = 1
            special = torch.tensor(e.get("special_tokens_mask") or [0] * k, dtype=torch.bool)
            words[r, :k] = (~special).float() if (~special).any() else 1.0
        got = {}

        def grab(layer, x):
            if layer in layers:
                idx = torch.tensor([i for l, i in neurons if l == layer], device=x.device)
                got[layer] = x[..., idx].detach().double()

        with torch.inference_mode(), ffn_hooks(handle.arch, grab, layers=layers):
            handle.model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device))
        m = words.double()[..., None]
        for reduce in ("mean", "max"):
            by_layer = {}
            for l in layers:
                a = got[l].cpu()  # [batch, positions, neurons of layer l]
                # masked, not multiplied: a model may leave NaN/inf at padded positions, and NaN * 0 is NaN
                stat = (a.masked_fill(m == 0, 0.0).sum(1) / m.sum(1) if reduce == "mean"
                        else a.masked_fill(m == 0, float("-inf")).amax(1))
                by_layer[l] = stat.masked_fill(m.sum(1) == 0, float("nan"))  # a text of no tokens: NaN
            pos = {l: 0 for l in layers}
            cols = []
            for l, _ in neurons:  # back to the caller's neuron order
                cols.append(by_layer[l][:, pos[l]])
                pos[l] += 1
            out[reduce].append(torch.stack(cols, 1))
    return {k: torch.cat(v) if v else torch.zeros(0, len(neurons), dtype=torch.float64) for k, v in out.items()}


def bag_activations(handle, item: FactItem, neurons, bags, all_bags: list, fact_index: int, seed: int = 0,
                    n_sentences: int = 10, max_tokens: int = 128) -> list[dict]:
    """Rows per bag for one fact. ``bags``: this fact's :class:`~kneurons.data.bingrel.BingRelBags`;
    ``all_bags``: the relation's (for the random bag); ``fact_index``: this fact's index in it."""
    return texts_activations(handle, bag_texts(item, bags, all_bags, fact_index, seed, n_sentences), neurons,
                             max_tokens)


def bag_texts(item: FactItem, bags, all_bags: list, fact_index: int, seed: int = 0,
              n_sentences: int = 10) -> dict[str, list[str]]:
    """The sentences of each bag for one fact (the random bag drawn from the relation's other facts, seeded)."""
    rng = rng_for(seed, "bingrel", item.fact_id)
    others = [s for j, b in enumerate(all_bags) if j != fact_index for s in b.th_bags]
    return {"head_tail": bags.th_bags[:n_sentences], "head_only": bags.h_bags[:n_sentences],
            "random": rng.sample(others, min(n_sentences, len(others)))}


def texts_activations(handle, texts: dict[str, list[str]], neurons, max_tokens: int = 128) -> list[dict]:
    """Rows per bag (:data:`BAGS`) of ``texts`` (as :func:`bag_texts` gives them) for ``neurons``."""
    rows = []
    for bag in BAGS:
        sents = [s for s in texts[bag] if s.strip()]
        if not sents or not neurons:
            rows.append({"bag": bag, "n_sentences": len(sents), "n_neurons": len(neurons),
                         "mean_activation": float("nan"), "max_activation": float("nan")})
            continue
        stats = _position_stats(handle, sents, neurons, max_tokens, 16)
        rows.append({"bag": bag, "n_sentences": len(sents), "n_neurons": len(neurons),
                     "mean_activation": float(stats["mean"].mean()), "max_activation": float(stats["max"].mean())})
    return rows


def run_activations(runner) -> None:
    cfg, store = runner.cfg, runner.store
    if runner.bingrel_dir is None:
        store.set_meta("activations_skipped", "no bingrel/ directory next to the PARAREL data")
        return
    missing, bad = [], {}
    bar = runner.bar(len(runner.all_known()), "activations (BingRel)")
    for rid, items in runner.known.items():
        if not (runner.bingrel_dir / bingrel_filename(rid)).is_file():
            missing.append(rid)
            bar.update(len(items))
            continue
        if all(store.has("activations", it.fact_id) for it in items):
            bar.update(len(items))
            continue
        try:
            bags = load_bingrel(runner.bingrel_dir, rid, n_facts=len(runner.data.relation(rid).facts))
        except KneuronsError as exc:  # a bad file: recorded (and reported), the run goes on (resumable)
            bad[rid] = str(exc)
            bar.update(len(items))
            continue
        for it in items:
            idx = int(it.fact_id.rsplit(":", 1)[1])
            kn = runner.sets.get(it.fact_id, {}).get("kn", [])
            texts = bag_texts(it, bags[idx], bags, idx, seed=cfg.seed, n_sentences=cfg.bingrel_sentences)
            runner.unit("activations", it.fact_id, rid, task(texts_activations, texts, kn, cfg.max_tokens), bar)
    runner.join()
    bar.close()
    store.set_meta("activations_missing_relations", missing)
    store.set_meta("activations_bad_files", bad)


EXPERIMENT = Experiment(
    "activations", "activations (BingRel)", "fact", run_activations, needs=("locate",),
    fields=("bingrel_sentences", "max_tokens"),
    section="activations", summarize="kneurons.report.numbers:activations_section",
    render="kneurons.report.render:activations_html", figures=(("activations", "kneurons.report.figures:activations"),))
