"""What an averaging run did (or, for a dry run, would do)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ckptavg.engine import profiles
from ckptavg.engine.plan import Plan
from ckptavg.engine.select import Candidate
from ckptavg.options import Method
from ckptavg.results import Result, peak_rss_bytes


@dataclass
class AverageResult(Result):
    """What a run did (or, for a dry run, would do). `inputs` and `weights` are what was
    applied, in order: with `into`, the running average comes first, weighted by its n."""

    inputs: list[str]
    weights: list[float]
    method: Method
    output: str | None
    n: int
    tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    dry_run: bool = False
    epochs: list[int | None] = field(default_factory=list)
    epoch_sources: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    step_sources: list[str] = field(default_factory=list)
    tokens: list[int | None] = field(default_factory=list)  # tokens seen, where recorded
    token_sources: list[str] = field(default_factory=list)
    into: str | None = None
    skipped: list[str] = field(default_factory=list)  # already in the running average
    warnings: list[str] = field(default_factory=list)
    ranks: int = 1  # torch.distributed ranks that shared the work (torchrun)
    rank: int = 0
    profile: str | None = None  # the --profile spec the weights come from
    effective_n: float = 0.0  # 1 / sum(w^2) of the weights applied
    # each new input's content hash (engine/content.py, taken in the read pass; a local
    # output records them in average.inputs); empty where none was taken
    content: list[str] = field(default_factory=list)
    # what ordered the inputs (select.order_basis): "tokens", "step", "epoch", "name" or
    # "given"; a profile weights by the same positions (tokens, else steps, else epochs)
    order: str = ""
    # a sweep (`sweep`: its spec): one result per window, oldest first; this result is the
    # whole read (every selected input once) and `output` the folder or name template
    sweep: str | None = None
    windows: list[AverageResult] = field(default_factory=list)


def make_result(plan: Plan, chosen: list[Candidate], into: str | None, output: str | None,
            method: str, n_total: int, dry_run: bool,
            profile: str | None = None, order: str = "") -> AverageResult:
    total = plan.total_weight
    pos = [c.position for c in chosen]
    head = [into] if into is not None else []
    applied = [w / total for w in plan.weights]
    return AverageResult(
        inputs=head + [c.path for c in chosen],
        weights=applied,
        method=method, output=output, n=n_total, tensors=len(plan.specs),
        bytes_in=plan.bytes_in, bytes_out=plan.bytes_out, dry_run=dry_run,
        epochs=[None] * len(head) + [p.epoch for p in pos],
        epoch_sources=["running average"] * len(head) + [p.epoch_from for p in pos],
        steps=[None] * len(head) + [p.step for p in pos],
        step_sources=["running average"] * len(head) + [p.step_from for p in pos],
        tokens=[None] * len(head) + [p.tokens for p in pos],
        token_sources=["running average"] * len(head) + [p.tokens_from for p in pos],
        into=into, profile=profile, effective_n=profiles.effective_n(applied), order=order,
    )


def nothing_to_fold(into: str, n0: int, skipped: list[str], dry_run: bool,
                     t0: float) -> AverageResult:
    return AverageResult(
        inputs=[], weights=[], method="uniform", output=into, n=n0, tensors=0, bytes_in=0,
        bytes_out=0, seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
        dry_run=dry_run, into=into, skipped=skipped,
        warnings=[f"every input is already folded into {into}; nothing was written"])
