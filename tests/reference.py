"""A deliberately naive integrated-gradients reference: per layer, per step, full recompute, no tricks."""

import torch
from kneurons.prompts import encode
from kneurons.hooks import ffn_hooks

def _naive_score(handle, prompt, enc, logits, pos, tgt, score, foils):
    """The score from one run's logits, as its definition reads: P or log P of the target (joint over its
    tokens); the contrastive score as log p(t_1) - log mean_f p(f_1) at the first scored position, over the
    distinct foil first tokens other than the target's (kneurons.attribution.methods)."""
    if score == "contrastive":
        lsm = torch.log_softmax(logits[0, pos[0]], -1)
        firsts = []
        for f in foils:
            fid = encode(handle, prompt, f).target_ids[0]
            if fid != enc.target_ids[0] and fid not in firsts:
                firsts.append(fid)
        lf = lsm[torch.tensor(firsts, device=lsm.device)]
        return lsm[tgt[0]] - torch.log(torch.exp(lf).mean())
    lp = torch.log_softmax(logits[0, pos], -1)[torch.arange(len(tgt)), tgt].sum()
    return lp.exp() if score == "prob" else lp


def naive_ig(handle, prompt, target, steps=20, score="prob", foils=()):
    """Dai et al. eq. 3 written out literally: one full forward+backward per (layer, step)."""
    enc = encode(handle, prompt, target)
    model, arch = handle.model, handle.arch
    dev = next(model.parameters()).device
    ids = torch.tensor([enc.input_ids], device=dev)
    pos = torch.tensor(enc.score_positions, device=dev); tgt = torch.tensor(enc.target_ids, device=dev)
    acts = {}
    def grab(l, x): acts[l] = x[0, enc.blank].detach().clone()
    with torch.no_grad(), ffn_hooks(arch, grab):
        model(input_ids=ids)
    out = []
    for l in range(arch.n_layers):
        w = acts[l]
        total = torch.zeros_like(w)
        for k in range(1, steps + 1):
            v = (k / steps * w).clone().requires_grad_(True)
            def patch(layer, x):
                x = x.clone(); x[0, enc.blank] = v; return x
            with ffn_hooks(arch, patch, [l]):
                logits = model(input_ids=ids).logits
            s = _naive_score(handle, prompt, enc, logits, pos, tgt, score, foils)
            g, = torch.autograd.grad(s, v)
            total += g
        out.append(w * total / steps)
    return torch.stack(out)


def naive_path(handle, prompt, target, alphas, weights, baseline=None, score="prob"):
    """Any integration path written out literally: the blank activation of one layer at a time set to
    b + alpha (w - b), one full forward+backward per (layer, point); (w - b) * sum_k weight_k grad_k."""
    enc = encode(handle, prompt, target)
    model, arch = handle.model, handle.arch
    dev = next(model.parameters()).device
    ids = torch.tensor([enc.input_ids], device=dev)
    pos = torch.tensor(enc.score_positions, device=dev); tgt = torch.tensor(enc.target_ids, device=dev)
    acts = {}
    def grab(l, x): acts[l] = x[0, enc.blank].detach().clone()
    with torch.no_grad(), ffn_hooks(arch, grab):
        model(input_ids=ids)
    out = []
    for l in range(arch.n_layers):
        w = acts[l]
        b = torch.zeros_like(w) if baseline is None else baseline[l].to(w)
        total = torch.zeros_like(w)
        for a, wt in zip(alphas, weights):
            v = (b + a * (w - b)).clone().requires_grad_(True)
            def patch(layer, x):
                x = x.clone(); x[0, enc.blank] = v; return x
            with ffn_hooks(arch, patch, [l]):
                logits = model(input_ids=ids).logits
            lp = torch.log_softmax(logits[0, pos], -1)[torch.arange(len(tgt)), tgt].sum()
            s = lp.exp() if score == "prob" else lp
            g, = torch.autograd.grad(s, v)
            total += wt * g
        out.append((w - b) * total)
    return torch.stack(out)
