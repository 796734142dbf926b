"""Benchmark: `ckptavg average` against the load-everything method and the I/O floor.

Generates N checkpoints of S MB (float32 tensors of at most 16 MB) in .pt and .safetensors,
warms the page cache, then runs each method in its own process, interleaved, R times, and
prints wall time and peak RSS (ru_maxrss of the child: counts mapped file pages) minus the
RSS of `python -c "import torch, safetensors"`.

    .venv/bin/python benchmarks/bench_average.py                    # 6 x 512 MB, the targets
    .venv/bin/python benchmarks/bench_average.py --n 2,6,32 --size-mb 128 --methods st-st,pt-st
    .venv/bin/python benchmarks/bench_average.py --conditions quiet,busy --dtype bfloat16
    sudo .venv/bin/python benchmarks/bench_average.py --cold       # drop caches before each run

Conditions: `quiet` (nothing else runs), `busy` (the benchmark itself keeps one CPU-bound
process running, as when a user averages beside a training job); `--cold` drops the page
cache before every run (root only), since real runs read from disk.

Methods:
  ckptavg pt->st / pt->pt / st->st   the tool, float64 accumulation (default)
  tm-st, lt-st                       timm-style (.pth.tar: state_dict, optimizer momentum,
                                     `args` Namespace, metric) and Lightning-style (.ckpt:
                                     optimizer_states, hyper_parameters holding a user's
                                     class and numpy scalars, loops) inputs of the same
                                     weights, -> .safetensors; compared with pt-st
  classic pt->pt                     torch.load each file whole, sum, divide, torch.save
  floor                              cat every input > /dev/null, then cp one input (output size)
  fairseq, timm-pt, timm-st          peers' scripts, unmodified (with --peers DIR)
  pt-st-before, st-st-before         the same commands run from an earlier checkout (--before DIR)
  mergekit                           mergekit-pytorch linear merge (with --mergekit BIN)

Peers are not part of this repository. `--peers DIR` names a folder holding
`fairseq_average_checkpoints.py` (fairseq's scripts/average_checkpoints.py) and
`timm_avg_checkpoints.py` (timm's avg_checkpoints.py), copied from their repositories;
fairseq's script imports `fairseq.file_io.PathManager` only to open files, so the benchmark
puts a two-line stand-in for that module on its path instead of installing fairseq. timm's
script needs timm installed (the `interop` extra). `--mergekit BIN` is the
`mergekit-pytorch` of a separate venv (`pip install mergekit`: it pins its own click and
tqdm). Absent peers are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time

CLASSIC = r"""
import sys, torch
paths, out = sys.argv[1:-1], sys.argv[-1]
acc = None
for p in paths:
    sd = torch.load(p, map_location="cpu", weights_only=True)["model"]
    if acc is None:
        acc = {k: v.clone() for k, v in sd.items()}
    else:
        for k, v in sd.items():
            acc[k] += v
    del sd
for k in acc:
    acc[k] /= len(paths)
torch.save({"state_dict": acc}, out)
"""


# Runs the CLI in-process after the imports, with the peak-RSS counter reset (Linux
# clear_refs 5), and prints how far the peak rose above the post-import RSS: the memory
# the averaging itself used, without the import's own transient peak.
WORK_RSS = r"""
import sys, torch, safetensors, ckptavg.cli, ckptavg.engine.average, ckptavg.io.pt
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) * 1024
base = status('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')
try:
    ckptavg.cli.main(sys.argv[2:])
except SystemExit as e:
    assert not e.code, e.code
open(sys.argv[1], 'w').write(str(status('VmHWM:') - base))
"""


def run(cmd: list[str], shell: bool = False, cold: bool = False) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    subprocess.run(["sync"], check=True)  # no dirty pages of one run slow the next
    if cold:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {cmd}")
    return wall, usage.ru_maxrss * 1024


class UserConfig:  # a user's config class among Lightning's hyper-parameters
    def __init__(self, width: int):
        self.width = width


def generate(folder: str, n: int, size_mb: int, dtype: str = "float32",
             tensor_mb: int = 16, styles: str = "") -> None:
    import argparse as ap

    import numpy as np
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    n_tensors = max(1, size_mb // tensor_mb)
    dt = getattr(torch, dtype)
    numel = tensor_mb * 2**20 // dt.itemsize
    for i in range(n):
        pt, st = os.path.join(folder, f"ck-{i:03d}.pt"), os.path.join(folder, f"ck-{i:03d}.safetensors")
        if not (os.path.exists(pt) and os.path.exists(st)):
            g = torch.Generator().manual_seed(i)
            sd = {f"layer{j}.weight": torch.randn(numel, generator=g).to(dt)
                  for j in range(n_tensors)}
            torch.save({"model": sd, "epoch": i}, pt)
            save_file(sd, st, metadata={"train.epoch": str(i)})
        else:
            sd = None
        tm, lt = (os.path.join(folder, f"ck-{i:03d}{s}") for s in (".pth.tar", ".ckpt"))
        if ("tm" in styles and not os.path.exists(tm)) or ("lt" in styles and not os.path.exists(lt)):
            if sd is None:
                from safetensors.torch import load_file
                sd = load_file(st)
            momentum = {j: {"momentum_buffer": v.clone()} for j, v in enumerate(sd.values())}
            if "tm" in styles:
                torch.save({"epoch": i, "arch": "resnet50", "state_dict": sd,
                            "optimizer": {"state": momentum, "param_groups": [{"lr": 0.1}]},
                            "version": 2, "args": ap.Namespace(lr=0.1, model="resnet50"),
                            "metric": float(i)}, tm)
            if "lt" in styles:
                torch.save({"epoch": i, "global_step": 100 * i, "pytorch-lightning_version": "2.6.0",
                            "state_dict": sd, "optimizer_states": [{"state": momentum}],
                            "lr_schedulers": [], "loops": {"fit_loop": {"epoch_progress": {}}},
                            "callbacks": {"ModelCheckpoint": {"best_model_score": np.float64(0.5)}},
                            "hyper_parameters": {"cfg": UserConfig(64), "lr": np.float32(0.1)},
                            "hparams_name": "kwargs"}, lt)



FAIRSEQ_SHIM = "class PathManager:\n    open = staticmethod(open)\n"


def peer_commands(args, py: str, folder: str, n: int, pts: list[str], sts: list[str],
                  out: str) -> dict:
    """The peers' commands for this input set (those that are available)."""
    cmds = {}
    if args.peers:
        fairseq = os.path.join(args.peers, "fairseq_average_checkpoints.py")
        timm = os.path.join(args.peers, "timm_avg_checkpoints.py")
        if os.path.isfile(fairseq):
            shim = os.path.join(folder, "shim", "fairseq")
            os.makedirs(shim, exist_ok=True)
            open(os.path.join(shim, "__init__.py"), "w").close()
            with open(os.path.join(shim, "file_io.py"), "w") as f:
                f.write(FAIRSEQ_SHIM)
            cmds["fairseq"] = (f"PYTHONPATH={os.path.dirname(shim)} {py} {fairseq} --inputs "
                               f"{' '.join(pts)} --output {out}.fairseq.pt > /dev/null", True)
        else:
            print(f"note: {fairseq} absent: fairseq skipped")
        if os.path.isfile(timm):
            cmds["timm-pt"] = ([py, timm, "--input", folder, "--filter", "ck-*.pt", "--output",
                                out + ".timm.pth", "--no-use-ema", "--no-sort"], False)
            cmds["timm-st"] = ([py, timm, "--input", folder, "--filter", "ck-*.safetensors",
                                "--output", out + ".timm.safetensors", "--no-use-ema",
                                "--no-sort", "--safetensors"], False)
        else:
            print(f"note: {timm} absent: timm skipped")
    if args.mergekit:
        if os.path.isfile(args.mergekit):
            config = os.path.join(folder, "mergekit.yml")
            with open(config, "w") as f:
                f.write("merge_method: linear\ndtype: float32\nmodels:\n")
                for p in sts:
                    f.write(f"  - model: {os.path.abspath(p)}\n    parameters:\n      weight: 1.0\n")
            cmds["mergekit"] = ([args.mergekit, config, out + ".mergekit", "--quiet"], False)
        else:
            print(f"note: {args.mergekit} absent: mergekit skipped")
    return cmds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="6", help="comma-separated input counts")
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="bench-tmp")
    ap.add_argument("--methods", default="floor,classic,pt-st,pt-pt,st-st")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--conditions", default="quiet", help="quiet, busy or quiet,busy")
    ap.add_argument("--dtype", default="float32", help="inputs' dtype (float32, bfloat16)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--peers", help="folder with fairseq's and timm's averaging scripts")
    ap.add_argument("--mergekit", help="path of a mergekit-pytorch executable")
    ap.add_argument("--before", help="a checkout of an earlier commit (git worktree): adds "
                    "pt-st-before and st-st-before, that code run side by side with this one")
    args = ap.parse_args()
    py = sys.executable
    methods = args.methods.split(",")
    if any(m.endswith("-before") for m in methods) and not args.before:
        ap.error("the *-before methods need --before DIR (a checkout of the earlier commit)")
    results = []
    # A fresh VM backs guest memory on first touch (about 4x slower writes); touch 8 GiB
    # once so that no method pays for it.
    subprocess.run([py, "-c", "bytearray(8 << 30)"], check=True)
    base_wall, base_rss = min(run([py, "-c", "import torch, safetensors"]) for _ in range(3))
    print(f"peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"baseline `import torch, safetensors`: {base_wall:.2f} s, RSS {base_rss / 2**20:.0f} MiB")
    for n, condition in [(int(x), c) for x in args.n.split(",") for c in args.conditions.split(",")]:
        # absolute: the *-before commands run from another folder
        folder = os.path.join(os.path.abspath(args.dir), f"n{n}-s{args.size_mb}-{args.dtype}")
        # Generated in a child: this process stays small, so children forked from it do
        # not start with its pages counted in their peak RSS.
        styles = ",".join(m[:2] for m in methods if m in ("tm-st", "lt-st"))
        subprocess.run([py, __file__, "--generate", folder, str(n), str(args.size_mb), args.dtype,
                        styles or "-"], check=True)
        burner = (subprocess.Popen([py, "-c", "while True: pass"]) if condition == "busy"
                  else None)
        # the import under the same condition: the floor + import that the target compares with
        base_wall = min(run([py, "-c", "import torch, safetensors"])[0] for _ in range(3))
        pts = [os.path.join(folder, f"ck-{i:03d}.pt") for i in range(n)]
        sts = [os.path.join(folder, f"ck-{i:03d}.safetensors") for i in range(n)]
        out = os.path.join(folder, "out")
        extra_inputs = [p[:-3] + sfx for p in pts for m, sfx in (("tm-st", ".pth.tar"),
                                                                  ("lt-st", ".ckpt"))
                        if m in methods]
        subprocess.run(["cat", *pts, *sts, *extra_inputs], stdout=subprocess.DEVNULL,
                       check=True)  # page cache
        cmds = {
            "floor": (f"cat {' '.join(sts)} > /dev/null && cp {sts[0]} {out}.floor", True),
            "classic": ([py, "-c", CLASSIC, *pts, out + ".classic.pt"], False),
            "pt-st": ([py, "-m", "ckptavg", "average", *pts, "-o", out + ".a.safetensors", "-q"], False),
            "pt-pt": ([py, "-m", "ckptavg", "average", *pts, "-o", out + ".b.pt", "-q"], False),
            "st-st": ([py, "-m", "ckptavg", "average", *sts, "-o", out + ".c.safetensors", "-q"], False),
            "tm-st": ([py, "-m", "ckptavg", "average", *[p[:-3] + ".pth.tar" for p in pts], "-o",
                       out + ".g.safetensors", "-q"], False),
            "lt-st": ([py, "-m", "ckptavg", "average", *[p[:-3] + ".ckpt" for p in pts], "-o",
                       out + ".h.safetensors", "-q"], False),
            "interpreter": ([py, "-c", "import ckptavg.cli, numpy, isal"], False),
        }
        if args.before:  # `-m ckptavg` imports the checkout in the working folder
            cd = f"cd {shlex.quote(os.path.abspath(args.before))} && {shlex.quote(py)} -m ckptavg average"
            cmds["pt-st-before"] = (f"{cd} {' '.join(map(shlex.quote, pts))} -o {out}.e.safetensors -q", True)
            cmds["st-st-before"] = (f"{cd} {' '.join(map(shlex.quote, sts))} -o {out}.f.safetensors -q", True)
        peers = peer_commands(args, py, folder, n, pts, sts, out)
        cmds.update(peers)
        methods = args.methods.split(",") + [m for m in peers if m not in args.methods.split(",")]
        times: dict[str, list] = {m: [] for m in methods}
        for rep in range(args.repeats):
            # the order reversed every other repeat: the first command after a generation
            # or a sync measured up to 15 % slower here, whichever it was (session 13)
            for m in (methods if rep % 2 == 0 else methods[::-1]):
                cmd, shell = cmds[m]
                for f in os.listdir(folder):
                    if f.startswith("out"):
                        p = os.path.join(folder, f)
                        shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
                times[m].append(run(cmd, shell=shell, cold=args.cold))
                if m == "pt-pt":
                    pt_out_size = os.path.getsize(out + ".b.pt")
        if burner is not None:
            burner.kill()
            burner.wait()
        row = {"n": n, "size_mb": args.size_mb, "dtype": args.dtype, "condition": condition,
               "cold": args.cold, "import_s": base_wall, "import_rss": base_rss}
        print(f"\nN={n} {args.dtype} inputs of {args.size_mb} MB (largest tensor 16 MB), "
              f"{condition}{', cold cache' if args.cold else ''}, {args.repeats} runs, median:")
        print(f"{'method':<10} {'wall s':>8} {'peak RSS MiB':>13} {'RSS - import MiB':>17}")
        for m in methods:
            wall = statistics.median(t for t, _ in times[m])
            rss = max(r for _, r in times[m])
            extra = rss - base_rss if m != "floor" else rss
            row[m] = {"wall_s": wall, "rss": rss, "rss_above_import": extra,
                      "walls": [t for t, _ in times[m]]}
            print(f"{m:<10} {wall:>8.2f} {rss / 2**20:>13.0f} {extra / 2**20:>17.0f}")
        print("ratios:")
        for m in peers:  # each peer against ckptavg reading the same files
            mine = "st-st" if m in ("timm-st", "mergekit") else "pt-st"
            if mine in row:
                print(f"  {m:<8} / ckptavg {mine}    {row[m]['wall_s'] / row[mine]['wall_s']:.2f}  "
                      "(target >= 2)")
        if "classic" in row and "pt-st" in row:
            print(f"  pt->st / classic         {row['pt-st']['wall_s'] / row['classic']['wall_s']:.2f}  (target <= 0.5)")
        if "pt-pt" in row and "pt-st" in row:
            print(f"  pt->pt / pt->st          {row['pt-pt']['wall_s'] / row['pt-st']['wall_s']:.2f}  (target <= 1.15)")
        for m in ("tm-st", "lt-st"):
            if m in row and "pt-st" in row:
                print(f"  {m} / pt->st           {row[m]['wall_s'] / row['pt-st']['wall_s']:.2f}  "
                      "(target <= 1.15)")
        if "interpreter" in row:
            for m in ("pt-pt", "pt-st", "tm-st", "lt-st"):
                if m in row:
                    above = (row[m]["rss"] - row["interpreter"]["rss"]) / 2**20
                    print(f"  {m} peak RSS above the interpreter's (ckptavg.cli, numpy, isal "
                          f"imported)  {above:.0f} MiB  (target <= 100)")
        if "floor" in row and "st-st" in row:
            r = row["st-st"]["wall_s"] / (row["floor"]["wall_s"] + base_wall)
            print(f"  st->st / (floor+import)  {r:.2f}  (target <= 1.3)")
        limit = 4 * 16 * 2**20 + 256 * 2**20
        for m in ("pt-st", "st-st"):
            if m in row:
                if row[m]["rss_above_import"] < 0:  # it never imported torch
                    print(f"  {m} peak RSS {row[m]['rss'] / 2**20:.0f} MiB, the whole process "
                          f"(torch not imported; target <= {limit / 2**20:.0f} MiB above it)")
                else:
                    print(f"  {m} RSS above import      {row[m]['rss_above_import'] / 2**20:.0f} MiB "
                          f"(target <= {limit / 2**20:.0f} MiB)")
        if "pt-pt" in row:
            size = pt_out_size
            print(f"  pt->pt RSS above import / output size  "
                  f"{row['pt-pt']['rss_above_import'] / size:.2f}  (target <= 1.2)")
        work = os.path.join(folder, "work-rss")
        for m in ("pt-st", "pt-pt", "st-st"):
            if m in row:
                cmd = cmds[m][0]
                run([py, "-c", WORK_RSS, work, *cmd[3:]])
                row[m]["work_rss"] = int(open(work).read())
                print(f"  {m} peak RSS above the post-import RSS: "
                      f"{row[m]['work_rss'] / 2**20:.0f} MiB")
        results.append(row)
        for f in os.listdir(folder):
            if f.startswith("out"):
                p = os.path.join(folder, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--generate":
        generate(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                 styles=sys.argv[6].replace("-", ""))
    else:
        main()
