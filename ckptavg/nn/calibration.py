"""How well predicted probabilities are calibrated: NLL, expected calibration error (ECE) and
the reliability diagram's bins (Guo et al. 2017; the SWAG paper reports them with 15 bins)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptavg.results import Result

BINS = 15


@dataclass
class ReliabilityBin(Result):
    """One bin of a reliability diagram: confidences in (lower, upper], the samples in it,
    their mean confidence (the top class's probability) and accuracy (a fraction; both
    None for an empty bin)."""

    lower: float
    upper: float
    count: int
    confidence: float | None
    accuracy: float | None


def reliability(probs: torch.Tensor, labels: torch.Tensor,
                bins: int = BINS) -> list[ReliabilityBin]:
    """Per confidence bin (i/bins, (i+1)/bins]: sample count, mean confidence and accuracy
    (confidence = the top class's probability; a bin with no sample has None for both)."""
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of 0 goes to bin 0.
    index = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    out = []
    for i in range(bins):
        mask = index == i
        n = int(mask.sum())
        out.append(ReliabilityBin(i / bins, (i + 1) / bins, n,
                                  float(conf[mask].mean()) if n else None,
                                  float(correct[mask].mean()) if n else None))
    return out


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) x |accuracy - confidence|."""
    n = labels.numel()
    return sum(b.count / n * abs(b.accuracy - b.confidence)
               for b in reliability(probs, labels, bins) if b.count)


def nll_per_sample(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(label) of each sample, in float64 (probabilities floored at 1e-12): the one
    cross-entropy every score (evaluation loss, SWAG's NLL) is made of."""
    picked = probs.double().gather(1, labels.view(-1, 1)).clamp_min(1e-12)
    return -picked.log().view(-1)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels."""
    return float(nll_per_sample(probs, labels).mean())


@dataclass
class CalibrationScores(Result):
    """Accuracy (%), NLL, expected calibration error, samples and the reliability bins."""

    accuracy: float
    nll: float
    ece: float
    samples: int
    reliability: list[ReliabilityBin]


def calibration_scores(probs: torch.Tensor, labels: torch.Tensor,
                       bins: int = BINS) -> CalibrationScores:
    """Accuracy, NLL, ECE and the reliability bins of class probabilities against labels."""
    acc = float((probs.argmax(1) == labels).double().mean() * 100)
    return CalibrationScores(acc, nll(probs, labels), ece(probs, labels, bins), labels.numel(),
                             reliability(probs, labels, bins))
