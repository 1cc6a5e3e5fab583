"""DCP plumbing: flat-range pieces, planners, checksums, atomic directories.

Optimizer state is stored *flattened*: the state tensor of a parameter with
shape ``(r, c)`` is one 1-D DCP tensor of ``r*c`` elements, and every rank
contributes the element ranges it owns. One form covers every layout: a
ZeRO-1 range is one piece, a whole Muon matrix on its owner is one piece
``[0, numel)``, a ``Shard(0)`` FSDP2 shard is the contiguous range of its
rows. DCP then reshards on load by range overlap, whatever layout and world
size wrote the pieces. Model weights are stored in their own shape (plain
tensors, or DTensors as FSDP2 / TP have them); a DTensor contributes the boxes
of its local shard, from the exact index runs of
:func:`shardopt.sharding.mesh.dtensor_local_runs` (a ``_StridedShard`` shard
may be several boxes, where DCP's own planner assumes one).

The planners here are the documented DCP extension points
(``create_local_plan`` / ``resolve_data`` / ``lookup_tensor``); they add two
kinds of state-dict value to plain tensors and DTensors:

* :class:`FlatPieces`: ``[(offset, 1-D tensor)]`` of one flattened tensor;
* :class:`LazyTensor`: a whole tensor made on demand (offline tools), so a
  conversion holds one tensor at a time.
"""
from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)

from ._manifest import DCP_METADATA, chunk_id, crc32_file_range
from .errors import CheckpointError, CorruptCheckpointError


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


@dataclass
class FlatPieces:
    """This rank's pieces of one tensor of ``numel`` elements, stored flattened."""

    numel: int
    dtype: torch.dtype
    pieces: list  # [(offset, 1-D tensor)], disjoint

    def chunks(self):
        return [ChunkStorageMetadata(offsets=torch.Size([o]), sizes=torch.Size([t.numel()])) for o, t in self.pieces]


@dataclass
class LazyTensor:
    """A whole tensor produced on demand by ``make()`` when DCP writes it."""

    shape: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def dtensor_boxes(obj) -> list:
    """``[(global offsets, sizes, view of the local shard)]`` of this rank's piece of a DTensor."""
    from ..sharding.mesh import dtensor_local_runs
    from ..sharding.plan import boxes

    runs = dtensor_local_runs(obj.shape, obj.device_mesh, obj.placements)
    if runs is None or any(not r for r in runs):
        return []
    local = obj.to_local()
    out = []
    for g, size, loc in boxes(runs):
        view = local[tuple(slice(o, o + n) for o, n in zip(loc, size))]
        out.append((tuple(g), tuple(size), view))
    return out


# ---------------------------------------------------------------- planners
def _props(dtype):
    return TensorProperties(dtype=dtype)


class SavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict = state_dict
        self.is_coordinator = is_coordinator

    def create_local_plan(self):
        items, plain = [], {}
        for key, obj in self.state_dict.items():
            if isinstance(obj, FlatPieces):
                for off, t in obj.pieces:
                    items.append(WriteItem(
                        index=MetadataIndex(key, torch.Size([off])), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size([off]), sizes=torch.Size([t.numel()])),
                            properties=_props(obj.dtype), size=torch.Size([obj.numel]),
                        ),
                    ))
            elif _is_dtensor(obj):
                for off, size, _ in dtensor_boxes(obj):
                    items.append(WriteItem(
                        index=MetadataIndex(key, torch.Size(off)), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)),
                            properties=_props(obj.dtype), size=obj.shape,
                        ),
                    ))
            elif isinstance(obj, LazyTensor):
                shape = torch.Size(obj.shape)
                items.append(WriteItem(
                    index=MetadataIndex(key, torch.Size([0] * len(shape))), type=WriteItemType.TENSOR,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape),
                        properties=_props(obj.dtype), size=shape,
                    ),
                ))
            else:
                plain[key] = obj
        items += create_default_local_save_plan(plain, self.is_coordinator).items
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item):
        obj = self.state_dict[write_item.index.fqn]
        if isinstance(obj, FlatPieces):
            off = write_item.index.offset[0]
            for o, t in obj.pieces:
                if o == off:
                    return t.detach()
            raise AssertionError(f"no piece at {off} for {write_item.index.fqn}")
        if _is_dtensor(obj):
            off = tuple(write_item.index.offset)
            for o, _, view in dtensor_boxes(obj):
                if o == off:
                    return view.detach().contiguous()
            raise AssertionError(f"no box at {off} for {write_item.index.fqn}")
        if isinstance(obj, LazyTensor):
            t = obj.make()
            if tuple(t.shape) != tuple(obj.shape) or t.dtype != obj.dtype:
                raise CheckpointError(
                    f"internal: {write_item.index.fqn} produced {tuple(t.shape)} {t.dtype}, "
                    f"expected {tuple(obj.shape)} {obj.dtype}"
                )
            return t.detach().contiguous()
        return super().resolve_data(write_item)


def dest_chunks(obj) -> list:
    """The chunks of the stored tensor this destination covers (in its global coordinates)."""
    if isinstance(obj, FlatPieces):
        return obj.chunks()
    if _is_dtensor(obj):
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(n)) for o, n, _ in dtensor_boxes(obj)]
    if obj.numel() == 0:
        return []
    return [ChunkStorageMetadata(offsets=torch.Size([0] * obj.dim()), sizes=obj.shape)]


def _dest_tensor(obj, index: int):
    if isinstance(obj, FlatPieces):
        return obj.pieces[index][1]
    if _is_dtensor(obj):
        return dtensor_boxes(obj)[index][2]
    return obj


class LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.state_dict = state_dict
        self.original_state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self):
        items = []
        for key, obj in self.state_dict.items():
            md = self.metadata.state_dict_metadata[key]
            items += create_read_items_for_chunk_list(key, md, dest_chunks(obj))
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return _dest_tensor(self.state_dict[index.fqn], index.index)


def read_items(state_dict: dict, metadata) -> list:
    """The read items DCP will issue for ``state_dict`` (to verify exactly what will be read)."""
    planner = LoadPlanner()
    planner.set_up_planner(state_dict, metadata, True)
    return planner.create_local_plan().items


# ---------------------------------------------------------------- read / write
def _dist_on(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


def free_space(path: str) -> str:
    """'12.3 MiB free on /mnt' for the file system holding ``path`` (or its nearest existing parent)."""
    from ..optim._report import format_bytes

    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return f"free space unknown ({e})"
    mount = probe
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    return f"{format_bytes(free)} free on {mount}"


def _causes(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside torch's CheckpointException (or the exception itself)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return [exc]


def write_failure(exc: BaseException, directory: str, what: str) -> CheckpointError:
    """One clear error for a failed write, naming the path and the free space (the usual cause is a full disk)."""
    import errno

    causes = _causes(exc)
    chain = []
    for c in causes:
        while c is not None and c not in chain:
            chain.append(c)
            c = c.__cause__ or c.__context__
    # torch's zip writer turns the OSError into "unexpected pos ..." and drops the errno
    full = any((isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT))
               or "No space left on device" in str(c) for c in chain)
    ranks = sorted(getattr(exc, "failures", None) or {})
    first = causes[0]
    detail = f"{type(first).__name__}: {str(first).strip().splitlines()[0] if str(first).strip() else ''}".rstrip(": ")
    where = f" on rank(s) {', '.join(map(str, ranks))}" if ranks else ""
    hint = "the disk is full" if full else "a full disk is the usual cause"
    target = directory.rstrip("/")
    target = target[: -len(".tmp")] if target.endswith(".tmp") else target
    return CheckpointError(
        f"saving checkpoint {target} failed{where} while {what} ({detail}); {free_space(directory)} ({hint}). "
        "Free some space or save elsewhere; the previous checkpoint at this path, if any, is left as it was"
    )


def dcp_save(state_dict: dict, directory: str, *, process_group=None, per_item_files=False, no_dist=None) -> None:
    """DCP save into ``directory``; a failed write is a :class:`CheckpointError` naming the path and the free space.

    torch raises ``CheckpointException``, a ``BaseException`` that ``except Exception`` around a save would
    not catch, on every rank when any rank's write fails.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    writer = FileSystemWriter(directory, single_file_per_rank=not per_item_files, sync_files=True, overwrite=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*existing checkpoint.*")
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
            dcp.save(state_dict, storage_writer=writer, planner=SavePlanner(), process_group=process_group,
                     no_dist=(not _dist_on()) if no_dist is None else no_dist)
    except (CheckpointException, OSError) as e:
        raise write_failure(e, directory, "writing its data") from e


def dcp_load(state_dict: dict, directory: str, *, process_group=None, no_dist=None) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    reader = FileSystemReader(directory)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
            dcp.load(state_dict, storage_reader=reader, planner=LoadPlanner(), process_group=process_group,
                     no_dist=(not _dist_on()) if no_dist is None else no_dist)
    except CheckpointException as e:
        first = _causes(e)[0]
        raise CorruptCheckpointError(
            f"reading checkpoint {directory} failed on rank(s) {', '.join(map(str, sorted(e.failures)))}: "
            f"{type(first).__name__}: {first}"
        ) from e


def read_metadata(directory: str):
    path = os.path.join(directory, DCP_METADATA)
    if not os.path.exists(path):
        raise CorruptCheckpointError(f"checkpoint file {path} is missing (DCP metadata); the checkpoint is incomplete")
    try:
        return FileSystemReader(directory).read_metadata()
    except Exception as e:
        raise CorruptCheckpointError(f"checkpoint file {path} (DCP metadata) is unreadable or truncated: {e}") from e


class _Direct:
    """A minimal planner for reading single tensors outside dcp.load (single process, offline)."""

    def __init__(self, dest):
        self.dest = dest

    def resolve_tensor(self, read_item):
        t = self.dest
        for d, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(d, off, n)
        return t

    def commit_tensor(self, read_item, tensor):
        pass

    def load_bytes(self, read_item, value):  # pragma: no cover - we never read bytes this way
        raise AssertionError


class TensorReader:
    """Reads whole stored tensors (or flat ranges of them) one at a time, for offline tools."""

    def __init__(self, directory: str, metadata=None):
        self.directory = directory
        self.metadata = metadata if metadata is not None else read_metadata(directory)
        self.reader = FileSystemReader(directory)
        self.reader.set_up_storage_reader(self.metadata, True)
        self.chunks: dict = {}  # key -> its stored chunks' MetadataIndex
        for idx in self.metadata.storage_data:
            self.chunks.setdefault(idx.fqn, []).append(idx)

    def has(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    def read_into(self, key: str, dest: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        """Fill ``dest`` with stored tensor ``key``; with ``offset``, a 1-D range of a flat tensor."""
        md = self.metadata.state_dict_metadata[key]
        if offset is None:
            chunk = ChunkStorageMetadata(offsets=torch.Size([0] * dest.dim()), sizes=dest.shape)
        else:
            chunk = ChunkStorageMetadata(offsets=torch.Size([offset]), sizes=torch.Size([dest.numel()]))
        if dest.numel() == 0:
            return dest
        items = create_read_items_for_chunk_list(key, md, [chunk])
        self.reader.read_data(LoadPlan(items), _Direct(dest)).wait()
        return dest


# ---------------------------------------------------------------- checksums
def storage_checksums(directory: str, metadata, part: int = 0, parts: int = 1) -> dict:
    """CRC-32 of each stored chunk, for the files with index % parts == part."""
    files = sorted({s.relative_path for s in metadata.storage_data.values()})
    mine = set(files[part::parts])
    out = {}
    for idx, info in metadata.storage_data.items():
        if info.relative_path not in mine:
            continue
        crc = crc32_file_range(os.path.join(directory, info.relative_path), info.offset, info.length)
        out[chunk_id(idx.fqn, idx.offset or ())] = {
            "file": info.relative_path, "offset": int(info.offset), "length": int(info.length), "crc32": crc,
        }
    return out


def owner_of_key(key: str, manifest: dict) -> str:
    """A readable name for a DCP key: the parameter FQN and which tensor of it."""
    t = manifest.get("tensors", {}).get(key)
    if t:
        what = "model weight" if t.get("slot") == "model" else f"optimizer state '{t.get('slot')}'"
        return f"parameter '{t.get('fqn')}' ({what})"
    return f"tensor '{key}'"


def verify_chunks(directory: str, manifest: dict, metadata, indices) -> list[str]:
    """Check the stored bytes of ``indices`` (MetadataIndex) against the manifest; returns error lines."""
    errors = []
    sums = manifest.get("checksums", {})
    seen = set()
    sizes: dict = {}
    for idx in indices:
        cid = chunk_id(idx.fqn, idx.offset or ())
        if cid in seen:
            continue
        seen.add(cid)
        who = owner_of_key(idx.fqn, manifest)
        info = metadata.storage_data.get(MetadataIndex(idx.fqn, idx.offset))
        if info is None:
            info = next((v for k, v in metadata.storage_data.items()
                         if k.fqn == idx.fqn and tuple(k.offset or ()) == tuple(idx.offset or ())), None)
        if info is None:
            errors.append(f"{os.path.join(directory, DCP_METADATA)} has no storage entry for chunk {cid} of {who}")
            continue
        path = os.path.join(directory, info.relative_path)
        want = sums.get(cid)
        if want is None:
            errors.append(f"{os.path.join(directory, 'shardopt.json')} has no checksum for chunk {cid} of {who}")
            continue
        if want["file"] != info.relative_path or want["offset"] != info.offset or want["length"] != info.length:
            errors.append(
                f"{os.path.join(directory, DCP_METADATA)} and the manifest disagree on where chunk {cid} of {who} lies "
                f"({info.relative_path}@{info.offset}+{info.length} vs {want['file']}@{want['offset']}+{want['length']})"
            )
            continue
        if path not in sizes:
            sizes[path] = os.path.getsize(path) if os.path.exists(path) else -1
        if sizes[path] < 0:
            errors.append(f"checkpoint file {path} is missing; it holds {who}")
            continue
        if sizes[path] < info.offset + info.length:
            errors.append(
                f"checkpoint file {path} is truncated ({sizes[path]} bytes, needs {info.offset + info.length}); "
                f"it holds {who}"
            )
            continue
        try:
            crc = crc32_file_range(path, info.offset, info.length)
        except (OSError, EOFError) as e:
            errors.append(f"checkpoint file {path} cannot be read ({e}); it holds {who}")
            continue
        if crc != want["crc32"]:
            errors.append(
                f"checkpoint file {path} is corrupted: the bytes of {who} (chunk {cid}) fail their CRC-32 check "
                f"(stored {want['crc32']:#010x}, read {crc:#010x})"
            )
    return errors


def verify_side_file(directory: str, manifest: dict, name: str) -> list[str]:
    want = manifest.get("files", {}).get(name)
    path = os.path.join(directory, name)
    if want is None:
        return []
    if not os.path.exists(path):
        return [f"checkpoint file {path} is missing"]
    size = os.path.getsize(path)
    if size != want["size"]:
        return [f"checkpoint file {path} is truncated or altered ({size} bytes, expected {want['size']})"]
    if crc32_file_range(path, 0, size) != want["crc32"]:
        return [f"checkpoint file {path} is corrupted (CRC-32 mismatch)"]
    return []


def side_file_info(path: str) -> dict:
    size = os.path.getsize(path)
    return {"size": size, "crc32": crc32_file_range(path, 0, size)}


# ---------------------------------------------------------------- atomic directories
def tmp_dir(path: str) -> str:
    return path.rstrip("/") + ".tmp"


def old_dir(path: str) -> str:
    return path.rstrip("/") + ".old"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_save_path(path: str) -> None:
    """Refuse, before anything is touched, a save path that cannot become a checkpoint directory."""
    path = path.rstrip("/")
    for p in (path, tmp_dir(path), old_dir(path)):
        if os.path.lexists(p) and not os.path.isdir(p):
            raise CheckpointError(
                f"cannot save a checkpoint to {path}: {p} is an existing file, not a directory (a checkpoint is a "
                "directory); save to another path, or move the file away"
            )


def prepare_tmp(path: str) -> str:
    """Rank 0, before a save: recover from a crash mid-swap, and clear a stale temporary directory."""
    path = path.rstrip("/")
    check_save_path(path)
    old = old_dir(path)
    if not os.path.exists(path) and os.path.isdir(old):
        os.rename(old, path)  # a crash between the two renames of commit(): the previous checkpoint is .old
    tmp = tmp_dir(path)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    parent = os.path.dirname(os.path.abspath(path))
    _fsync_dir(parent)
    return tmp


def commit(path: str) -> None:
    """Rank 0, after everything is written and synced into ``path.tmp``: make it ``path``.

    ``os.rename`` of a directory is atomic but cannot replace a non-empty
    directory, so an existing checkpoint is first renamed to ``path.old``.
    A crash between the two renames leaves ``path.old`` whole; :func:`resolve`
    and the next save use it.
    """
    path = path.rstrip("/")
    tmp, old = tmp_dir(path), old_dir(path)
    parent = os.path.dirname(os.path.abspath(path))
    _fsync_dir(tmp)
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(parent)
    if os.path.exists(old):
        shutil.rmtree(old)


def resolve(path: str) -> str:
    """The directory to read for ``path``: itself, or ``path.old`` after a crash mid-swap."""
    path = path.rstrip("/")
    if os.path.isdir(path):
        return path
    old = old_dir(path)
    if os.path.isdir(old):
        warnings.warn(f"shardopt: {path} is missing but {old} exists (a save was interrupted while swapping "
                      f"directories); loading {old}", RuntimeWarning, stacklevel=3)
        return old
    if os.path.isdir(tmp_dir(path)):
        raise CheckpointError(f"no checkpoint at {path}: only {tmp_dir(path)}, the folder of a save that never "
                              "completed, is there")
    if os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: it is a file, not a checkpoint directory")
    raise CheckpointError(f"no checkpoint at {path}")
