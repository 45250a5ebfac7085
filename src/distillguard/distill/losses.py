"""Distillation losses as pure functions (tested on tiny tensors with known answers)."""

from __future__ import annotations

import torch


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) from a sparse teacher: its top-k log-probabilities plus the tail.

    The API gives the teacher's k most likely tokens; everything else is lumped into one "tail"
    bucket with the remaining mass, on both sides, so the KL is over k+1 outcomes and is exactly
    0 when the student matches the teacher on the top-k (DistillKit-style sparse KD).

    student_logits (N, V); topk_ids (N, K) (pad with any id and -inf logprob); topk_logprobs
    (N, K); mask (N,) selects the positions that count. Returns the mean KL over those positions.
    """
    logp = student_logits.float().log_softmax(dim=-1)  # (N, V)
    s_top = logp.gather(1, topk_ids)  # (N, K)
    valid = topk_logprobs > float("-inf")  # (N, K) padded alternatives are not part of the top-k
    q_top = topk_logprobs.float().exp()  # (N, K), 0 where padded
    q_tail = (1 - q_top.sum(dim=-1)).clamp(min=0)  # (N,)
    p_tail = (1 - (s_top.exp() * valid).sum(dim=-1)).clamp(min=1e-12)  # (N,)
    safe_q = torch.where(valid, topk_logprobs.float(), torch.zeros_like(q_top))
    kl_top = (q_top * (safe_q - s_top)).sum(dim=-1)  # (N,)
    kl_tail = torch.where(
        q_tail > 1e-9,
        q_tail * (q_tail.clamp(min=1e-12).log() - p_tail.log()),
        torch.zeros_like(q_tail),
    )
    kl = kl_top + kl_tail
    if mask is not None:
        kl = kl[mask]
    return kl.mean() if kl.numel() else student_logits.sum() * 0.0


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence between full next-token distributions.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD), Eq. (1), in TRL's
    convention (``GKDTrainer.generalized_jsd_loss``, against which the tests check it), with
    teacher P, student Q and the mixture M = beta * P + (1 - beta) * Q::

        JSD(beta) = beta * KL(P || M) + (1 - beta) * KL(Q || M)

    The ends are the two KLs themselves: ``beta=0`` is forward KL(P || Q) (classic
    full-logit KD, mass-covering) and ``beta=1`` reverse KL(Q || P) (mode-seeking).

    student_logits, teacher_logits (..., V) over the same vocabulary; mask (...) selects the
    positions that count. Returns the mean divergence per selected position (nats).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1]")
    s = (student_logits.float() / temperature).log_softmax(dim=-1)  # (..., V)
    t = (teacher_logits.float() / temperature).log_softmax(dim=-1)  # (..., V)
    if mask is not None:
        s, t = s[mask], t[mask]  # (N, V)
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    if beta == 0.0:
        div = (t.exp() * (t - s)).sum(-1)  # KL(P || Q)
    elif beta == 1.0:
        div = (s.exp() * (s - t)).sum(-1)  # KL(Q || P)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        m = torch.logsumexp(torch.stack([t + b.log(), s + torch.log1p(-b)]), dim=0)  # log M, (N, V)
        div = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return div.mean()


def previous_token_candidates(answers: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """Token-level unlikelihood's negative candidates (Welleck et al. 2019, "Neural Text Generation
    with Unlikelihood Training", Eq. 4): at each answer position, the tokens the answer already
    wrote before it, less the one it writes there.

    answers: per answer, the token written at each of its positions, (n_i,) each. Returns (N, V)
    bool with N = sum(n_i), rows in the answers' order (the order of the positions' logits).
    """
    device = answers[0].device if answers else None
    seen = torch.zeros((sum(a.numel() for a in answers), vocab), dtype=torch.bool, device=device)
    start = 0
    for a in answers:
        n = a.numel()
        j, i = torch.tril_indices(n, n, offset=-1, device=a.device)  # every pair of positions i < j
        seen[start + j, a[i]] = True  # position j has seen token a[i]
        seen[start + torch.arange(n, device=a.device), a] = (
            False  # the position's own token is not a negative
        )
        start += n
    return seen


def unlikelihood_loss(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Token-level unlikelihood: mean over positions of -sum_c log(1 - p(c)) over the candidates c.

    A model that loops puts its mass on what it already wrote; this term pushes that mass down
    where the training answer did not repeat. No library we use implements it (TRL has none), so
    it is written here, as a pure function like the others. logits (N, V), candidates (N, V) bool.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    p = logits.float().softmax(dim=-1)
    return -(torch.log1p(-p.clamp(max=1 - 1e-6)) * candidates).sum(dim=-1).mean()
