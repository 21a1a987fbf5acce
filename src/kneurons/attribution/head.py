"""The LM head as the engine scores it: log-probabilities of target tokens at the scored positions.

Two ways, same numbers (tests): from the model's own logits (:func:`logprob_from_logits`), or by the fused head
(:func:`fused_logprob`), which takes the LM head's *input* and streams over the unembedding matrix in vocabulary
chunks. Each chunk is read once for the logits, the running log-sum-exp and the softmax-weighted sum of
unembedding rows that the gradient needs (``dlogp/dh = e_t - E_p[e]``); no ``[rows, vocab]`` logits tensor is
kept. The fused head may replace the model's head only where the model returns its plain ``nn.Linear`` head's
output unchanged (a capability of the execution plan, see :mod:`kneurons.attribution.plan`).

Targets are ``[n_sequences, n_positions]`` token ids: sequence 0 is the answer; further sequences scored at the
same positions (e.g. foil answers of a contrastive score) cost one dot product per position and sequence.
"""

from __future__ import annotations

import math

import torch

HEAD_CHUNK_BYTES = 8 << 20  # vocabulary chunk of the fused head: this many bytes of the unembedding matrix


def chunk_rows(d_model: int, itemsize: int) -> int:
    """Vocabulary rows per chunk of the fused head: :data:`HEAD_CHUNK_BYTES` of the unembedding matrix."""
    return max(16, HEAD_CHUNK_BYTES // (d_model * itemsize))


def plain_linear_head(model) -> torch.nn.Linear | None:
    """The model's output embedding if it is a plain ``nn.Linear`` (its forward not overridden), else ``None``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            and head.weight.dim() == 2):
        return head
    return None


class HeadLogProb(torch.autograd.Function):
    """``log softmax(x W^T + b)[target]`` per row of ``x`` ``[N, d]``, streamed over vocabulary chunks:
    ``target`` ``[N]`` gives ``[N]``, ``target`` ``[N, K]`` (K tokens scored per row) gives ``[N, K]``.

    Forward keeps a running max and sum of exponentials (online log-sum-exp) and, when a gradient is wanted,
    the running softmax-weighted sum of unembedding rows ``A = sum_v p_v W_v``; backward is then
    ``dlogp_k/dx = W_target_k - A`` with no further pass over the vocabulary. ``weight``/``bias`` get no gradient
    (the engine freezes parameters).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, chunk: int, need_grad: bool):
        ctx.one = target.dim() == 1
        if ctx.one:
            target = target[:, None]
        n, d = x.shape
        m = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
        s = torch.zeros(n, dtype=x.dtype, device=x.device)
        acc = torch.zeros(n, d, dtype=x.dtype, device=x.device) if need_grad else None
        for a in range(0, weight.shape[0], chunk):
            w = weight[a:a + chunk]
            z = x @ w.t() if bias is None else torch.addmm(bias[a:a + chunk], x, w.t())
            new_m = torch.maximum(m, z.amax(1))
            rescale = torch.exp(m - new_m)
            z.sub_(new_m[:, None]).exp_()
            s = s * rescale + z.sum(1)
            if acc is not None:
                acc.mul_(rescale[:, None]).addmm_(z, w)
            m = new_m
        w_t = weight[target]  # [N, K, d]
        z_t = (x[:, None, :] * w_t).sum(-1) + (bias[target] if bias is not None else 0)
        if acc is not None:
            acc.div_(s[:, None])
            ctx.save_for_backward(w_t, acc)
        lp = z_t - (m + s.log())[:, None]
        return lp[:, 0] if ctx.one else lp

    @staticmethod
    def backward(ctx, grad):
        w_t, acc = ctx.saved_tensors
        if ctx.one:
            grad = grad[:, None]
        return (grad[:, :, None] * (w_t - acc[:, None, :])).sum(1), None, None, None, None, None


def fused_logprob(head: torch.nn.Linear, x: torch.Tensor, targets: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """``sum_j log p(targets[k, j])`` ``[rows, K]`` from the LM head's input at the scored positions ``x``
    ``[rows, n, d]`` (``targets`` ``[K, n]``)."""
    rows, n, d = x.shape
    w = head.weight
    chunk = chunk_rows(w.shape[1], w.element_size())
    tgt = targets.t().repeat(rows, 1)  # [rows * n, K]
    lp = HeadLogProb.apply(x.reshape(rows * n, d).to(w.dtype), w, head.bias, tgt, chunk, need_grad)
    lp = lp.view(rows, n, -1)
    return torch.stack([lp[:, :, k].sum(-1) for k in range(lp.shape[2])], 1)


def logprob_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_j log p(targets[k, j])`` ``[rows, K]`` from logits at the scored positions ``[rows, n, vocab]``, as
    ``z_t - logsumexp(z)`` (no full log-softmax tensor)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    rows, n = logits.shape[:2]
    lse = torch.logsumexp(logits, dim=-1)
    out = []
    for k in range(targets.shape[0]):
        tgt = targets[k].view(1, n, 1).expand(rows, n, 1)
        out.append((logits.gather(-1, tgt)[..., 0] - lse).sum(-1))
    return torch.stack(out, 1)
