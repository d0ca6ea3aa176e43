"""Membership inference with power: the offline likelihood-ratio attack (LiRA, Carlini et al., 2022).

A loss threshold (Yeom et al., 2018) compares every example against one global
cut, so it cannot tell a hard example the model saw from an easy one it did
not. LiRA calibrates per example: shadow models trained *without* the
examples (here: federations of the same code without the target client, on
other seeds) give each example's distribution of confidences when it is not a
member; the attacked model's confidence is scored against it. The offline
variant needs only these OUT models. With few shadows the per-example spread
is unreliable, so (as the paper recommends) a global standard deviation is
used: the score of example x is ``(phi(x) - mean_out(x)) / sd_out``, where
``phi = log(p_y / (1 - p_y))`` is the logit-scaled confidence in the true label.

Reported: ROC AUC and the true-positive rate at 1% false positives (the
regime where an attack is a real privacy threat).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from components.data.datasets import Split
from components.learning.train import predict_logits


def scaled_confidence(model: nn.Module, data: Split) -> np.ndarray:
    """``log(p_y) - log(1 - p_y)`` per example, computed stably from the logits."""
    logits = predict_logits(model, data.inputs()).double()
    log_p = F.log_softmax(logits, dim=1)
    true = log_p.gather(1, data.labels.view(-1, 1)).squeeze(1)
    others = log_p.clone()
    others.scatter_(1, data.labels.view(-1, 1), float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def lira_scores(target: np.ndarray, shadows_out: np.ndarray, spread: float) -> np.ndarray:
    """Offline LiRA scores: how many (global) sds above its OUT mean each example's confidence lies.

    ``shadows_out`` is shadows x examples; ``spread`` the global OUT standard deviation.
    """
    return (target - shadows_out.mean(axis=0)) / max(spread, 1e-6)


def attack_metrics(
    scores_members: np.ndarray, scores_non_members: np.ndarray, fpr_at: float = 0.01
) -> dict[str, float]:
    """ROC AUC and the TPR at ``fpr_at`` of a membership score (higher = member)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.concatenate([scores_members, scores_non_members])
    truth = np.concatenate([np.ones(len(scores_members)), np.zeros(len(scores_non_members))])
    fpr, tpr, _ = roc_curve(truth, scores)
    return {"auc": float(roc_auc_score(truth, scores)), "tpr_at_1fpr": float(np.interp(fpr_at, fpr, tpr))}


def lira(model: nn.Module, shadows: Sequence[nn.Module], members: Split, non_members: Split) -> dict[str, float]:
    """The offline LiRA attack on ``model``: AUC and TPR at 1% FPR (0.5 and 0.01 mean no signal)."""
    member_out = np.stack([scaled_confidence(s, members) for s in shadows])
    non_member_out = np.stack([scaled_confidence(s, non_members) for s in shadows])
    # Global spread of the OUT confidences around their per-example means (few shadows: no per-example sd).
    centred = np.concatenate([member_out - member_out.mean(0), non_member_out - non_member_out.mean(0)], axis=1)
    spread = float(np.sqrt((centred**2).sum() / max(centred.size - centred.shape[1], 1)))
    return attack_metrics(
        lira_scores(scaled_confidence(model, members), member_out, spread),
        lira_scores(scaled_confidence(model, non_members), non_member_out, spread),
    )
