"""The read pass into an output's writer, in one process or on each of torchrun's ranks.

`write_run` opens the writer the output asks for (`io.outputs.make_writer`: its side files,
its staging folder when it has one, every rank's share of a folder under torchrun), runs the
kernel over the tensors still to write, checks that no input changed under the pass, and
fills the inputs' content hashes into the output's metadata before the commit, after
refusing two inputs that hold the same tensors. `average` (one process) and `average_ranks`
(shards.py) both end here: one writing path.
"""

from __future__ import annotations

from ckptavg.engine.content import ContentHashes, placeholder, refuse_same_tensors
from ckptavg.engine.kernel import execute
from ckptavg.engine.plan import Request, dcp_entry
from ckptavg.engine.prepare import Run
from ckptavg.engine.result import AverageResult
from ckptavg.engine.select import Candidate
from ckptavg.errors import CkptavgError
from ckptavg.io.folder import side_files
from ckptavg.io.outputs import make_writer, records_content, staged
from ckptavg.io.quantized import without_quantization
from ckptavg.io.staging import describe, with_kept


def write_run(req: Request, plan, run: Run, result: AverageResult, progress=None,
              group=None) -> None:
    """The read pass of `plan` into `req.output`'s writer, content hashes filled in before
    its commit; under torchrun (`group`) this rank's share, rank 0 committing the folder."""
    kind, readers = req.kind, plan.readers
    side, notes = side_files(readers) if kind == "sharded" else ({}, [])
    if plan.dequantize and "config.json" in side:
        side["config.json"] = without_quantization(side["config.json"])
    result.warnings += notes
    entry = dcp_entry(readers[-1]) if req.dcp else plan.entry
    stage_run = describe(readers, plan.specs, plan.metadata) \
        if staged(req.output, kind) else None
    writer = make_writer(req.output, plan.specs, plan.metadata, req.shard_size, plan.ties,
                         inputs=run.protected, entry=entry, extras=plan.extras,
                         side_files=side, dcp=req.dcp, run=stage_run, resume=req.resume,
                         group=group)
    content = records_content(req.output, kind)
    hashes = ContentHashes.of_plan(plan) if content and writer.fills_metadata else None
    if hashes is not None and stage_run is not None:
        writer.hashes = hashes  # each finished shard records its digests
    try:
        with writer:
            keys = writer.pending_keys() if stage_run is not None else None
            execute(plan, writer, keys, progress=progress, threads=req.threads, hashes=hashes)
            for r in readers:
                r.check_unchanged()
            if hashes is not None:
                _fill_content(writer, hashes, run.chosen, run.running is not None, result)
    except CkptavgError as e:
        raise with_kept(e, writer.kept) from None
    result.warnings += writer.notes


def _fill_content(writer, hashes: ContentHashes, chosen: list[Candidate], running: bool,
                  result: AverageResult) -> None:
    """The content hashes into the output's metadata (and the result), after refusing two
    inputs that hold the same tensors. A resumed folder output takes the digests of its
    earlier shards from their records (and, under torchrun, the other ranks' shards from
    theirs); where those hold none, the entries go without."""
    digests = hashes.hexdigests(writer.recorded())
    if digests is None:
        writer.fill({placeholder(i): None for i in range(len(chosen))})
        return
    digests = digests[1 if running else 0:]
    refuse_same_tensors([c.path for c in chosen], digests, [(c.epoch, c.step) for c in chosen])
    writer.fill({placeholder(i): d for i, d in enumerate(digests)})
    result.content = digests
