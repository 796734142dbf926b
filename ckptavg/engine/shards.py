"""`average` across torch.distributed ranks: `torchrun ... -m ckptavg average INPUTS -o DIR`.

Every rank selects and plans the same run (same inputs, same order, same weights), then
streams only its share of the tensor names, balanced by bytes, from every input, and writes
its own safetensors shard into a hidden temporary folder beside the output. The ranks gather
their weight maps; rank 0 writes the index (and the inputs' config files) and swaps the
folder in. No tensor crosses the network; the inputs must be on a filesystem every rank
sees. Each tensor is reduced by the same code as in one process, so the result is bitwise
the same. A problem found by any rank is shared with all of them at the next agreement
point, so every rank stops with the same one-line error instead of hanging, and nothing is
left at the output.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from ckptavg.engine.content import ContentHashes, final_metadata, refuse_same_tensors
from ckptavg.engine.kernel import execute
from ckptavg.engine.plan import Request, dcp_entry
from ckptavg.engine.prepare import choose, plan_run
from ckptavg.engine.result import AverageResult
from ckptavg.errors import CkptavgError
from ckptavg.io import TensorSpec
from ckptavg.io.folder import side_files
from ckptavg.io.staging import Staging, describe, record_done, with_kept
from ckptavg.io.writer import without_pending
from ckptavg.parallel import Group


def partition(specs: list[TensorSpec], ranks: int) -> list[list[str]]:
    """Tensor names per rank, balanced by bytes: largest first to the least loaded rank
    (ties: the lower rank), each rank's names kept in plan order. Deterministic."""
    load = [0] * ranks
    owner: dict[str, int] = {}
    for s in sorted(specs, key=lambda s: (-s.nbytes, s.key)):
        r = min(range(ranks), key=lambda i: (load[i], i))
        owner[s.key] = r
        load[r] += s.nbytes
    return [[s.key for s in specs if owner[s.key] == r] for r in range(ranks)]


def average_ranks(group: Group, req: Request, progress=None) -> AverageResult:
    """`average` on one of several ranks: the same selection and plan everywhere, then this
    rank's share of the tensors (see `write_shards`). Failures are agreed on, never hung on."""
    with contextlib.ExitStack() as stack:
        error, plan, result, chosen = None, None, None, []
        try:  # the same preparation as one process's (engine/prepare.py), on every rank
            run = choose(req, stack)
            chosen = run.chosen
            plan, result = plan_run(req, run)
        except BaseException as e:
            error = e
        group.agree(error)
        if not req.dry_run:
            side, notes = side_files(plan.readers)
            result.warnings += notes
            result.warnings += write_shards(
                plan, req.output, group, execute, progress, req.threads, side,
                dcp_entry(plan.readers[-1]) if req.kind == "dcp" else False, req.resume,
                [(c.epoch, c.step) for c in chosen])
        result.ranks, result.rank = group.size, group.rank
        return result


def write_shards(plan, output: str, group: Group, execute, progress=None,
                 threads: int | None = None, side_files: dict[str, bytes] | None = None,
                 dcp: str | None | bool = False, resume: bool = False,
                 positions: list[tuple] | None = None) -> list[str]:
    """Reduce this rank's share of `plan` into its shard; rank 0 commits the folder.

    With `dcp` (False: safetensors shards; else the DCP entry, None for the top level), the
    ranks then save one torch.distributed.checkpoint together, each from its own shard.

    Safetensors shards are built in the output's staging folder (io/staging.py), rank 0
    holding its lock: each rank records its shard when done, a failed run keeps the done
    ones, and with `resume` a rank whose shard is done (and checks out) skips it. Returns
    the notes to report."""
    from ckptavg.io.writer import SafetensorsWriter, commit_folder, rank_shard_names

    output = os.path.abspath(output.rstrip(os.sep))
    keys = partition(plan.specs, group.size)
    names = rank_shard_names(keys)
    mine, name = keys[group.rank], names[group.rank]
    staging, error = None, None
    try:
        if group.rank == 0:
            want = {**describe(plan.readers, plan.specs, plan.metadata),
                    "shards": {names[r]: keys[r] for r in range(group.size) if keys[r]}}
            if dcp is not False:
                want.update(output="dcp", entry=dcp)
            staging = Staging(output, want, resume)
    except BaseException as e:
        error = e
    group.agree(error)
    tmp, done, notes, earlier = group.share(
        (staging.path, sorted(staging.done), staging.notes, staging.content)
        if staging is not None else None)
    specs = {s.key: s for s in plan.specs}
    hashes = ContentHashes.of_plan(plan)
    weight_map, record, error = {}, None, None
    try:
        if mine and name in done:
            weight_map = {k: name for k in mine}
        elif mine:
            meta = {**without_pending(plan.metadata), "format": "pt"}
            with SafetensorsWriter(os.path.join(tmp, name), [specs[k] for k in mine], meta,
                                   shown=output) as writer:
                execute(plan, writer, keys=mine, progress=progress, threads=threads,
                        hashes=hashes)
                for r in plan.readers:
                    r.check_unchanged()
            record = hashes.record(mine)
            record_done(tmp, name, record)
            weight_map = {k: name for k in mine}
    except BaseException as e:
        error = e
    try:
        gathered = group.agree(error, (weight_map, record))
        maps = [m for m, _ in gathered]
        # every rank's digests (and those an earlier run recorded): the same hashes everywhere
        records = {**earlier, **{names[r]: rec for r, (_, rec) in enumerate(gathered) if rec}}
        digests = ContentHashes.of_plan(plan).hexdigests(records)
        if digests is not None:
            refuse_same_tensors([r.path for r in plan.readers], digests, positions)
        metadata = final_metadata(plan.metadata, digests)
    except CkptavgError as e:
        raise with_kept(e, staging.keep_or_drop() if staging is not None else None) from None
    except BaseException:
        if staging is not None:
            staging.keep_or_drop()
        raise
    if dcp is not False:
        _save_staged_dcp(plan, metadata, output, group, tmp, name, mine, dcp, staging)
        return notes

    def commit() -> None:
        merged = {k: v for m in maps for k, v in m.items()}
        staging.settle()
        commit_folder(tmp, output, {s.key: merged[s.key] for s in plan.specs}, metadata,
                      plan.bytes_out, side_files)

    _commit_on_rank0(group, staging, output, commit)
    return notes


def _commit_on_rank0(group: Group, staging: Staging | None, output: str, commit) -> None:
    """Rank 0 runs `commit` (the output made from the staged shards) and releases the
    staging folder; a failure keeps what it still holds for --resume (the line says so) and
    stops every rank with the same error."""
    from ckptavg.io.atomic import write_error

    error = None
    if group.rank == 0:
        try:
            commit()
            staging.release()
        except OSError as e:
            error = with_kept(write_error(output, e), staging.keep_or_drop())
        except BaseException as e:
            staging.keep_or_drop()
            error = e
    group.agree(error)


def _shared_temp(group: Group, output: str) -> str:
    """A hidden temporary folder beside `output`, made by rank 0 and named to every rank."""
    from ckptavg.io.atomic import temp_folder_beside

    tmp, error = None, None
    try:
        if group.rank == 0:
            tmp = temp_folder_beside(output)
    except BaseException as e:
        error = e
    group.agree(error)
    return group.share(tmp)


def _save_staged_dcp(plan, metadata: dict[str, str], output: str, group: Group, tmp: str,
                     name: str, mine: list[str], entry: str | None,
                     staging: Staging | None) -> None:
    """The collective DCP save of every rank's staged shard (`name` in `tmp`, holding
    `mine`), into a folder rank 0 swaps in for `output`; then the staging folder goes. A
    failure keeps the staged shards for `--resume`."""
    from ckptavg.io.atomic import write_error
    from ckptavg.io.dcp import commit_dcp, save_dcp, staged_state

    folder = _shared_temp(group, output)
    with contextlib.ExitStack() as stack:
        state, error = {}, None
        try:
            state = stack.enter_context(staged_state(tmp, {k: name for k in mine}, mine,
                                                     plan.ties))
        except BaseException as e:
            error = e
        try:
            group.agree(error)
            # A collective: every rank writes its own tensors, rank 0 the metadata.
            save_dcp(state, folder, entry, metadata if group.rank == 0 else None,
                     distributed=True)
        except BaseException as e:
            kept = None
            if group.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
                kept = staging.keep_or_drop()
            if isinstance(e, OSError):  # a full disk inside DCP's writer (save_dcp): one line
                raise with_kept(write_error(output, e), kept) from None
            if isinstance(e, CkptavgError):
                raise with_kept(e, kept) from None
            raise

    def commit() -> None:
        try:
            commit_dcp(folder, output)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the staged shards: now in the output

    _commit_on_rank0(group, staging, output, commit)
