"""Beyond SWA, on the runs `replicate` made: held-out selection (soups, window search) and
SWAG, per seed, against the final SGD weights and the paper's SWA average.

Per seed, from OUT/seed-S/{sgd,swa}/: the candidate pool is the SWA run's snapshots from
epoch swa_start // 2 to the end (1.5 B). Held-out figures are on the held-out part of the
training set that the runs left out (`--holdout` of the preset); the test split is read once
per row, for the chosen weights. SWAG is fitted on the SWA phase's snapshots (swa_start to
1.5 B) and scored on the test split beside the SWA average and the SGD weights.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptavg import options
from ckptavg.engine.select import close_all, open_candidates
from ckptavg.errors import CkptavgError
from ckptavg.io.atomic import atomic_text
from ckptavg.options import DataOptions, HeldOutOptions, LoaderOptions, ModelOptions, Selection
from ckptavg.results import MeanStd, Result, mean_std
from ckptavg.selection.heldout import HeldOut, RunningSum
from ckptavg.selection.search import search
from ckptavg.selection.soup import soup
from ckptavg.selection.swag import evaluate_swag, plot_reliability, swag

ROWS = {"sgd": "SGD, final weights (budget B)",
        "best_single": "best single snapshot by held-out accuracy",
        "swa": "SWA from the paper's start, 1.5 B",
        "search": "SWA, best window by held-out search",
        "uniform_soup": "uniform soup of the pool",
        "greedy_soup": "greedy soup of the pool"}
MIN_BIN = 20  # reliability bins with fewer test images are not drawn (too noisy to read)
CAL_ROWS = {"sgd": "SGD, final weights", "swa": "SWA (1.5 B)", "swag_diag": "SWAG-diagonal",
            "swag": "SWAG"}


@dataclass
class SelectionRow(Result):
    """One selection method over seeds: held-out and test accuracy (%)."""

    holdout: MeanStd
    test: MeanStd


@dataclass
class CalibrationSummary(Result):
    """One predictor over seeds, on the test split: accuracy (%), NLL and ECE."""

    accuracy: MeanStd
    nll: MeanStd
    ece: MeanStd


@dataclass
class BeyondResult(Result):
    """Held-out and test accuracy per selection method, and accuracy/NLL/ECE of SGD, SWA and
    SWAG, per seed and as mean/std over seeds."""

    out: str
    seeds: list[int]
    selection: dict[str, SelectionRow]  # method -> over seeds
    calibration: dict[str, CalibrationSummary]  # predictor -> over seeds
    per_seed: list[dict[str, Any]]  # each seed's figures, as cached in seed-N/beyond.json
    settings: dict[str, Any]  # SWAG's draws and scale, the pools, the replicate config
    seconds: float
    files: list[str] = field(default_factory=list)


def beyond_seed(folder: str, config: dict, seed: int, *, data_dir: str | None, device: str,
                samples: int, scale: float, bn_batches: int | None,
                threads: int | None) -> dict:
    """Every figure of one seed (see the module docstring). Kept in FOLDER/beyond.json and
    reused by a later call with the same settings (as `replicate` resumes its runs)."""
    cache = os.path.join(folder, "beyond.json")
    settings = {"samples": samples, "scale": scale, "bn_batches": bn_batches,
                "threads": threads, "config": config}
    if os.path.exists(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("settings") == json.loads(json.dumps(settings)):
            return saved["result"]
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = _beyond_seed(folder, config, seed, data_dir, device, samples, scale,
                              bn_batches)
    finally:
        torch.set_num_threads(before)
    with atomic_text(cache) as f:
        json.dump({"settings": settings, "result": result}, f, indent=2)
    return result


def _beyond_seed(folder, config, seed, data_dir, device, samples, scale, bn_batches):
    t0 = time.perf_counter()
    budget, start = config["budget"], config["swa_start"]
    snaps = sorted(glob.glob(os.path.join(folder, "swa", "epoch-*.safetensors")))
    sgd_last = os.path.join(folder, "sgd", f"epoch-{budget:04d}.safetensors")
    if not snaps or not os.path.exists(sgd_last):
        raise CkptavgError(f"{folder}: no replicate runs there (swa/epoch-*.safetensors and "
                           f"sgd/epoch-{budget:04d}.safetensors); run ckptavg replicate first")
    pool_from = max(1, start // 2)
    # The model is the one the protocol names (trusted), never one read from a file.
    model = ModelOptions(config["model"], dict(config.get("model_kwargs") or {}))
    data, loader = DataOptions(data_dir=data_dir), LoaderOptions(device=device)
    common = dict(model=model, data=data, loader=loader,
                  heldout=HeldOutOptions(seed=seed, bn_batches=bn_batches))
    out: dict = {"seed": seed}

    found = search(snaps, selection=Selection(from_epoch=pool_from), test=True, **common)
    out["search"] = {"holdout": found.best.holdout_accuracy, "test": found.test_accuracy,
                     "start_epoch": found.best.start_epoch, "n": found.best.n}
    out["windows"] = [{"start_epoch": w.start_epoch, "holdout": w.holdout_accuracy}
                      for w in found.windows]
    pool = snaps[pool_from - 1:]
    greedy = soup(pool, test=True, **common)
    out["greedy_soup"] = {"holdout": greedy.holdout_accuracy, "test": greedy.test_accuracy,
                          "chosen": [os.path.basename(p) for p in greedy.chosen]}
    uniform = [w for w in found.windows if w.start_epoch == pool_from][0]
    out["uniform_soup"] = {"holdout": uniform.holdout_accuracy}

    cands = open_candidates([sgd_last] + snaps)
    try:
        held = HeldOut(cands[1], **common)

        def scored(paths: list[str], recalibrate: bool = True) -> dict:
            total = RunningSum()
            for i, c in enumerate(cands):
                if c.path in paths:
                    total.add(RunningSum.read(c.reader), i)
            mean = total.mean()
            h = held.score(mean, paths[0], recalibrate)
            return {"holdout": h.accuracy, "test": held.test(held.fixed(mean)).accuracy}

        out["sgd"] = scored([sgd_last], recalibrate=False)  # its own BatchNorm statistics
        out["swa"] = scored(snaps[start - 1:])
        out["uniform_soup"]["test"] = scored(snaps[pool_from - 1:])["test"]
        best = greedy.ingredients[0]
        out["best_single"] = {"holdout": best.holdout_accuracy,
                              "test": scored([best.path])["test"],
                              "epoch": best.epoch}
    finally:
        close_all(cands)

    swag_path = os.path.join(folder, "swag.safetensors")
    swag(snaps, swag_path, selection=Selection(from_epoch=start))
    cal = {}
    for diag in (True, False):
        r = evaluate_swag(swag_path, [sgd_last], samples=samples, scale=scale, diag=diag,
                          model=model, data=data, loader=loader, seed=seed,
                          bn_batches=bn_batches)
        rows = {row.name: row for row in r.rows}
        cal["swag_diag" if diag else "swag"] = rows["SWAG-diagonal" if diag else "SWAG"]
        cal["swa"], cal["sgd"] = rows["SWA"], rows[sgd_last]
    out["calibration"] = {k: {"accuracy": v.accuracy, "nll": v.nll, "ece": v.ece,
                              "reliability": [b.to_dict() for b in v.reliability]}
                          for k, v in cal.items()}
    out["seconds"] = time.perf_counter() - t0
    return out


def beyond(out: str, *, data_dir: str | None = None, device: str = options.DEVICE,
           samples: int = options.SWAG_SAMPLES, scale: float = options.SWAG_SCALE,
           bn_batches: int | None = None, jobs: int = 1, log=None) -> BeyondResult:
    """Soups, window search and SWAG on every seed of `replicate OUT`; writes
    OUT/beyond.json, OUT/beyond.md and plots (search and reliability, per seed).

    Args:
        out: a folder `replicate` wrote (its results.json names the protocol).
        samples, scale: SWAG's draws.
        bn_batches: limit every BatchNorm recalibration to this many batches.
        jobs: seeds at once, each in its own process.
        log: called with one progress line at a time.

    Returns:
        A BeyondResult (what beyond.json holds).

    Example:
        >>> beyond("runs/fm", data_dir="data/fashion-mnist", jobs=2).selection["greedy_soup"]
    """
    t0 = time.perf_counter()
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        raise CkptavgError(f"{path}: not found; run ckptavg replicate --out {out} first")
    with open(path) as f:
        rep = json.load(f)
    config, seeds = rep["config"], rep["seeds"]
    if not config.get("holdout"):
        raise CkptavgError(f"{out}: the runs held nothing out (preset holdout 0); selection "
                           "needs held-out images")
    kwargs = dict(data_dir=data_dir, device=device, samples=samples, scale=scale,
                  bn_batches=bn_batches, threads=config.get("threads"))
    folders = {s: os.path.join(out, f"seed-{s}") for s in seeds}
    if jobs == 1 or len(seeds) == 1:
        per_seed = []
        for s in seeds:
            if log:
                log(f"seed {s}")
            per_seed.append(beyond_seed(folders[s], config, s, **kwargs))
    else:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=ctx) as pool:
            futures = {s: pool.submit(beyond_seed, folders[s], config, s, **kwargs)
                       for s in seeds}
            per_seed = [futures[s].result() for s in seeds]
    selection = {k: SelectionRow(mean_std([p[k]["holdout"] for p in per_seed]),
                                 mean_std([p[k]["test"] for p in per_seed])) for k in ROWS}
    calibration = {k: CalibrationSummary(*(mean_std([p["calibration"][k][m] for p in per_seed])
                                           for m in ("accuracy", "nll", "ece")))
                   for k in CAL_ROWS}
    settings = {"samples": samples, "scale": scale, "bn_batches": bn_batches,
                "pool_from_epoch": max(1, config["swa_start"] // 2), "swag_rank": options.SWAG_RANK,
                "swag_from_epoch": config["swa_start"], "preset": rep.get("preset"),
                "config": config}
    result = BeyondResult(out, seeds, selection, calibration, per_seed, settings,
                          time.perf_counter() - t0)
    result.files = [os.path.join(out, "beyond.json"), os.path.join(out, "beyond.md")]
    try:
        result.files += draw(result)
    except CkptavgError as e:  # no matplotlib: the numbers stand without the plots
        if log:
            log(str(e))
    with atomic_text(result.files[0]) as f:
        json.dump(result.to_dict(), f, indent=2)
    with atomic_text(result.files[1]) as f:
        f.write(beyond_table(result))
    return result


def beyond_table(r: BeyondResult) -> str:
    """The Markdown tables of beyond.md."""
    over = f"mean ± std over seeds {', '.join(map(str, r.seeds))}"
    lines = [f"# Held-out selection and SWAG: {over}", "",
             "| method | held-out accuracy (%) | test accuracy (%) |", "|---|---|---|"]
    for k, name in ROWS.items():
        h, t = r.selection[k].holdout, r.selection[k].test
        lines.append(f"| {name} | {h.mean:.2f} ± {h.std:.2f} | {t.mean:.2f} ± {t.std:.2f} |")
    lines += ["", f"Test split, SWAG with {r.settings['samples']} samples, scale "
              f"{r.settings['scale']}, rank {r.settings['swag_rank']}:", "",
              "| method | accuracy (%) | NLL | ECE |", "|---|---|---|---|"]
    for k, name in CAL_ROWS.items():
        c = r.calibration[k]
        lines.append(f"| {name} | {c.accuracy.mean:.2f} ± {c.accuracy.std:.2f} | "
                     f"{c.nll.mean:.4f} ± {c.nll.std:.4f} | {c.ece.mean:.4f} ± {c.ece.std:.4f} |")
    lines += ["", "Per seed (test accuracy; search: chosen start epoch; greedy soup: size):", "",
              "| seed | " + " | ".join(ROWS) + " | start | soup size |",
              "|---|" + "---|" * (len(ROWS) + 2)]
    for p in r.per_seed:
        lines.append(f"| {p['seed']} | " + " | ".join(f"{p[k]['test']:.2f}" for k in ROWS)
                     + f" | {p['search']['start_epoch']} | {len(p['greedy_soup']['chosen'])} |")
    return "\n".join(lines) + "\n"


def draw(r: BeyondResult) -> list[str]:
    """Per seed, from the numbers (so cached seeds are drawn too): held-out accuracy of every
    window against its start, and the reliability diagram of SGD, SWA, SWAG-diagonal, SWAG."""
    from ckptavg.nn.calibration import ReliabilityBin
    from ckptavg.selection.search import SearchResult, Window, plot_search
    from ckptavg.selection.swag import CalibrationRow

    cfg = r.settings["config"]
    held = f"{cfg['data']}:train[{cfg['subset'] - cfg['holdout']}:{cfg['subset']}]"
    files = []
    for p in r.per_seed:
        ws = [Window("", w["start_epoch"], 0, w["holdout"], 0.0) for w in p["windows"]]
        best = next(w for w in ws if w.start_epoch == p["search"]["start_epoch"])
        end = f"epoch-{ws[-1].start_epoch:04d}.safetensors"
        files.append(os.path.join(r.out, f"search-seed{p['seed']}.png"))
        plot_search(SearchResult(windows=ws, best=best, end=end, holdout=held), files[-1])
        rows = [CalibrationRow(name, p["calibration"][k]["accuracy"], p["calibration"][k]["nll"],
                               p["calibration"][k]["ece"], 0,
                               [ReliabilityBin(**b) for b in p["calibration"][k]["reliability"]])
                for k, name in CAL_ROWS.items()]
        files.append(os.path.join(r.out, f"reliability-seed{p['seed']}.png"))
        plot_reliability(rows, files[-1], title=f"seed {p['seed']}: test split, bins with "
                         f"{MIN_BIN} or more images", min_count=MIN_BIN)
    return files
