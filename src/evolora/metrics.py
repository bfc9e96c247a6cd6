"""Continual-learning metrics over the accuracy matrix.

R[i][j] is the accuracy (0-100) on task j after training stage i; R0[j] is the zero-shot accuracy.
With T tasks trained one per stage:
  AP          = (1/T) sum_j R[T-1][j]                           final average accuracy
  Avg         = (1/T) sum_i (1/(i+1)) sum_{j<=i} R[i][j]        mean over steps of the seen-task mean
  BWT         = (1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j])     backward transfer (< 0: forgetting)
  FWT         = (1/(T-1)) sum_{j>0} (R[j-1][j] - R0[j])         forward transfer vs zero-shot
  forgetting  = (1/(T-1)) sum_{j<T-1} max_{j<=l<T-1} R[l][j] - R[T-1][j]
Entries that were not evaluated are None; a metric that needs them is None."""

from __future__ import annotations

from typing import Optional

Matrix = list[list[Optional[float]]]


def _mean(values: list[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def average_performance(R: Matrix) -> Optional[float]:
    return _mean(R[-1])


def average_incremental(R: Matrix) -> Optional[float]:
    return _mean([_mean(R[i][: i + 1]) for i in range(len(R))])


def backward_transfer(R: Matrix) -> Optional[float]:
    T = len(R)
    if T < 2:
        return None
    return _mean([None if R[-1][j] is None or R[j][j] is None else R[-1][j] - R[j][j] for j in range(T - 1)])


def forward_transfer(R: Matrix, zero_shot: Optional[list[Optional[float]]]) -> Optional[float]:
    T = len(R)
    if T < 2 or zero_shot is None:
        return None
    return _mean([None if R[j - 1][j] is None or zero_shot[j] is None else R[j - 1][j] - zero_shot[j]
                  for j in range(1, T)])


def forgetting_per_task(R: Matrix) -> list[Optional[float]]:
    T = len(R)
    out: list[Optional[float]] = []
    for j in range(T - 1):
        history = [R[stage][j] for stage in range(j, T - 1)]
        if any(v is None for v in history) or R[-1][j] is None:
            out.append(None)
        else:
            out.append(max(history) - R[-1][j])
    return out


def compute_metrics(R: Matrix, zero_shot: Optional[list[Optional[float]]], continual: bool = True) -> dict:
    """`continual` is False for a joint (multitask) run: R has one row and only AP applies."""
    if not R:
        return {}
    metrics = {"AP": average_performance(R)}
    if continual and len(R) == len(R[0]):
        forgetting = forgetting_per_task(R)
        metrics.update({
            "Avg": average_incremental(R),
            "BWT": backward_transfer(R),
            "FWT": forward_transfer(R, zero_shot),
            "forgetting": _mean(forgetting),
            "forgetting_per_task": forgetting,
        })
    if zero_shot is not None:
        metrics["zero_shot_mean"] = _mean(zero_shot)
    return metrics


def paired_ap_bootstrap(reference: dict[str, list[bool]], other: dict[str, list[bool]], samples: int = 2000,
                        seed: int = 0) -> dict:
    """How sure is a difference in AP between two runs evaluated on the same test examples? Each task's test
    set is resampled with replacement `samples` times, the same draw for both runs (a paired bootstrap: the
    examples both get right or wrong cancel out), and AP (the mean of per-task accuracy) recomputed.
    `reference` and `other` map task -> per-example correctness, in the same example order. Returns the
    observed AP difference other - reference (points), its 95 % interval, and the share of resamples in
    which `other` is ahead."""
    import numpy as np

    if reference.keys() != other.keys() or any(len(reference[t]) != len(other[t]) for t in reference):
        raise ValueError("paired bootstrap needs both runs' predictions on the same tasks and examples")
    rng = np.random.default_rng(seed)
    deltas = np.zeros(samples)
    observed = 0.0
    for task, ref in reference.items():
        diff = np.asarray(other[task], dtype=float) - np.asarray(ref, dtype=float)
        observed += diff.mean()
        deltas += diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    scale = 100.0 / len(reference)
    deltas *= scale
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"delta_AP": observed * scale, "low": float(low), "high": float(high),
            "ahead": float((deltas > 0).mean()), "samples": samples}


def ap_bootstrap(correct: dict[str, list[bool]], samples: int = 2000, seed: int = 0) -> dict:
    """AP of the final model (mean of per-task accuracy, points) and its 95 % bootstrap interval: each task's
    test set resampled with replacement `samples` times. `correct` maps task -> per-example correctness."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = np.zeros(samples)
    observed = 0.0
    for values in correct.values():
        x = np.asarray(values, dtype=float)
        observed += x.mean()
        draws += x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    scale = 100.0 / len(correct)
    low, high = np.percentile(draws * scale, [2.5, 97.5])
    return {"AP": observed * scale, "low": float(low), "high": float(high), "samples": samples,
            "n": {task: len(values) for task, values in correct.items()}}


DEFINITIONS = {
    "AP": "average performance: mean accuracy over all tasks after the last stage, (1/T) Σ_j R[T,j]",
    "Avg": "average incremental accuracy: mean over stages i of the mean accuracy on tasks seen so far",
    "BWT": "backward transfer: (1/(T-1)) Σ_{j<T} (R[T,j] - R[j,j]); negative means forgetting",
    "FWT": "forward transfer: (1/(T-1)) Σ_{j>1} (R[j-1,j] - zero-shot_j), accuracy on a task before training on it",
    "forgetting": "mean over old tasks of (best accuracy at any earlier stage - final accuracy)",
    "drift": "held-out general-text perplexity change after the last stage vs the base model (%)",
    "knowledge": "general-knowledge multiple-choice accuracy change after the last stage vs the base model (points)",
}
"""What each figure means; R[i,j] is task j's accuracy (points) after stage i."""
