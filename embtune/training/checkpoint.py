"""Resumable checkpoints: one dict per checkpoint, written atomically, read without running pickled code.

A run keeps two checkpoints in ``RUN_DIR/checkpoints/``: ``ckpt-last.pt`` and the one before it,
``ckpt-prev.pt``. A checkpoint is written to a temporary file, flushed to disk (fsync), then renamed
over ``ckpt-last.pt`` after the old one has become ``ckpt-prev.pt``; a crash or a full disk while
saving leaves the earlier checkpoints as they were. Each file ends with a sha256 of its contents, so a
truncated or damaged file is recognised and the previous checkpoint is used instead (with a warning).

The payload is ``torch.save`` of plain containers and tensors, read back with
``torch.load(weights_only=True)``: loading a checkpoint never runs code stored in it.

A ``train.strategy=fsdp`` run keeps its weights and optimiser state out of this file, sharded by
``torch.distributed.checkpoint`` into a folder beside it that the file names (``shards``; written and read
by :mod:`embtune.training.fsdp`); the rest of the state is this same file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
LAST, PREV = "ckpt-last.pt", "ckpt-prev.pt"
_MAGIC = b"EMBTUNE-SHA256:"  # then the 32-byte digest of everything before it

# 5: ``bf16: auto`` computes in bf16 on a CPU with native bf16 too; 4: every process's random state
# (``rng_by_rank``) in a run of several processes; 3: ``train.bf16=true`` asks for bf16 on a CPU too; 2: public
# ``_target_`` paths (``embtune.losses.InfoNCE``) and a ``recipe`` node; 1: the flat layout's module paths
# (``embtune.losses.info_nce.InfoNCE``, ``embtune.formats.Pairwise``), ``train.rounds``.
FORMAT = 5
# format-1 ``_target_`` -> format 2, whole names first, then module prefixes
_TARGETS_V1 = {
    "embtune.model.Embedder.from_pretrained": "embtune.model.from_pretrained",
    "embtune.distill.CrossEncoderTeacher": "embtune.model.CrossEncoderTeacher",
    "embtune.mining.HardNegativeMiner": "embtune.mining.HardNegativeMiner",
}
_PREFIXES_V1 = {
    "embtune.pooling.": "embtune.model.", "embtune.formats.": "embtune.data.", "embtune.data.beir.": "embtune.data.",
    "embtune.data.files.": "embtune.data.", "embtune.data.stdlib.": "embtune.data.",
    "embtune.negatives.": "embtune.negatives.", "embtune.online_hard.": "embtune.negatives.",
    "embtune.cross_batch.": "embtune.negatives.", "embtune.evaluators.": "embtune.eval.",
    "embtune.logger.": "embtune.run.",
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (truncated, damaged, or not an embtune checkpoint)."""


def save(run_dir: str | Path, state: dict) -> Path:
    """Write ``state`` as ``run_dir/checkpoints/ckpt-last.pt``; the former last becomes ``ckpt-prev.pt``.

    Returns:
        The path written.
    Raises:
        OSError: the write failed (e.g. ENOSPC, disk full); the message says the earlier checkpoints
            are intact, and the temporary file is removed.
    """
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    last, prev, tmp = folder / LAST, folder / PREV, folder / f".{LAST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.write(_MAGIC + hashlib.sha256(payload).digest())
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "the" checkpoint
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = ", ".join(p.name for p in (last, prev) if p.exists()) or "none"
        raise OSError(e.errno, f"could not write checkpoint {last} ({os.strerror(e.errno or errno.EIO)}); "
                               f"earlier checkpoints are intact ({kept})") from e
    if last.exists():
        os.replace(last, prev)
    os.replace(tmp, last)
    _fsync_dir(folder)
    return last


def read(path: str | Path) -> dict:
    """Read one checkpoint file, checking its digest first.

    Raises:
        CheckpointError: the file is truncated, damaged or not an embtune checkpoint.
        FileNotFoundError: no such file.
    """
    data = Path(path).read_bytes()
    cut = len(data) - len(_MAGIC) - 32
    if cut < 0 or data[cut:cut + len(_MAGIC)] != _MAGIC:
        raise CheckpointError(f"{path}: not a complete embtune checkpoint (truncated or another format)")
    if hashlib.sha256(data[:cut]).digest() != data[cut + len(_MAGIC):]:
        raise CheckpointError(f"{path}: checksum mismatch (the file is damaged)")
    return torch.load(io.BytesIO(data[:cut]), map_location="cpu", weights_only=True)


def load(where: str | Path) -> tuple[dict, Path]:
    """The newest usable checkpoint of a run folder (or the file itself when ``where`` is a file).

    In a run folder, ``ckpt-last.pt`` is tried, then ``ckpt-prev.pt`` with a warning naming what was
    wrong with the last one.

    Returns:
        ``(state, path of the file read)``.
    Raises:
        FileNotFoundError: ``where`` does not exist, or holds no checkpoint.
        CheckpointError: every candidate is damaged.
    """
    where = Path(where).expanduser()
    if not where.exists():
        raise FileNotFoundError(f"{where}: no such run folder or checkpoint file to resume from")
    if where.is_file():
        return _with_shards(_current(read(where)), where), where
    folder = where / FOLDER if (where / FOLDER).is_dir() else where
    candidates = [folder / LAST, folder / PREV]
    if not any(p.exists() for p in candidates):
        raise FileNotFoundError(f"{where}: no checkpoint ({FOLDER}/{LAST} or {FOLDER}/{PREV}) to resume from")
    problems = []
    for path in candidates:
        if not path.exists():
            problems.append(f"{path.name} is missing")
            continue
        try:
            state = read(path)
        except Exception as e:  # a damaged zip raises RuntimeError, EOFError, ... depending on where
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; resuming from the previous checkpoint %s (step %d)", "; ".join(problems), path,
                        state["step"])
        return _with_shards(_current(state), path), path
    raise CheckpointError(f"{where}: no usable checkpoint: {'; '.join(problems)}")


def _with_shards(state: dict, path: Path) -> dict:
    """A sharded run's state with ``shards_dir``, the folder of its shards beside the file read."""
    return {**state, "shards_dir": str(path.parent / state["shards"])} if state.get("shards") else state


def upgrade_config(config: dict, version: int) -> dict:
    """A checkpoint's config of format ``version`` as today's layout reads it (a new dict).

    Format 1 -> 2: every ``_target_`` moves to its public name (``embtune.losses.info_nce.InfoNCE`` ->
    ``embtune.losses.InfoNCE``), ``model.multi_vector: true`` becomes ``embtune.model.from_pretrained_multi_vector``
    (``model=multi_vector``), a file's rows keep training whole (``data.dev_queries=0``), and the mode moves from ``train.rounds`` / a ``pretrain`` node to ``recipe.name``.

    Format 2 -> 3: ``train.bf16: true`` meant bf16 where the device supports it and never on a CPU, which is
    today's ``auto`` (``true`` now asks for bf16 on a CPU with native bf16 too).

    Format 3 -> 4: the config is the same (format 4 adds every process's random state beside the config).

    Format 4 -> 5: ``bf16: auto`` (``train``, and ``eval`` where set) meant fp32 on a CPU; a run that
    resumes on a CPU (``train.device: cpu``, or ``auto`` without CUDA) keeps fp32 (``false``), so it
    continues as it started.
    """
    if version >= FORMAT:
        return config
    out = _v1_to_v2(config) if version < 2 else config
    train = dict(out.get("train") or {})
    if version < 3 and train.get("bf16") is True:
        train["bf16"] = "auto"
    out = {**out, "train": train}
    device = str(train.get("device", "auto"))
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu:
        if train.get("bf16", "auto") == "auto":
            train["bf16"] = False
        if isinstance(out.get("eval"), dict) and out["eval"].get("bf16") == "auto":
            out = {**out, "eval": {**out["eval"], "bf16": False}}
    return out


def _v1_to_v2(config: dict) -> dict:
    """Format 1 -> 2 (see :func:`upgrade_config`)."""

    def target(name: str) -> str:
        if name in _TARGETS_V1:
            return _TARGETS_V1[name]
        if name.startswith("embtune.losses."):  # embtune.losses.<module>.<Class>
            return "embtune.losses." + name.rsplit(".", 1)[1]
        for old, new in _PREFIXES_V1.items():
            if name.startswith(old):
                return new + name.rsplit(".", 1)[1]
        return name

    def walk(node):
        if isinstance(node, dict):
            return {k: target(v) if k == "_target_" and isinstance(v, str) else walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    out = walk(config)
    model = dict(out.get("model") or {})
    if model.pop("multi_vector", False):  # the multi-vector model is a model option of its own now
        model["_target_"] = "embtune.model.from_pretrained_multi_vector"
        model.pop("shared_weights", None)
    else:
        model.pop("multi_vector_dim", None)
    out["model"] = model
    data = dict(out.get("data") or {})
    if data.get("_target_") in ("embtune.data.load_jsonl", "embtune.data.load_hf"):
        data.setdefault("dev_queries", 0)  # format 1 held out no dev split: the same rows train
    out["data"] = data
    train = dict(out.get("train") or {})
    rounds = train.pop("rounds", 0) or 0
    out["train"] = train
    if out.get("pretrain") is not None:
        out["recipe"] = {"name": "two_stage"}
    elif rounds:
        out["recipe"] = {"name": "mining_rounds", "rounds": rounds}
    else:
        out["recipe"] = {"name": "finetune"}
    return out


def _current(state: dict) -> dict:
    """``state`` with its config in today's format (see :func:`upgrade_config`)."""
    version = state.get("format", 1)
    if "config" not in state:  # not a training state (a bare dict saved through save)
        return state
    if version > FORMAT:
        raise CheckpointError(f"checkpoint format {version} is newer than this embtune reads ({FORMAT}); upgrade embtune")
    return {**state, "config": upgrade_config(state["config"], version), "format": FORMAT}


def rng_state(negatives: random.Random) -> dict:
    """Every random state a step reads: Python's, NumPy's, torch's (CPU and CUDA: dropout) and the
    negative sampler's ``random.Random``. Plain lists and tensors only (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {"python": _py_state(random.getstate()), "negatives": _py_state(negatives.getstate()),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, negatives: random.Random) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_py_tuple(state["python"]))
    negatives.setstate(_py_tuple(state["negatives"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state(s: tuple) -> dict:
    return {"version": s[0], "internal": list(s[1]), "gauss": s[2]}


def _py_tuple(d: dict) -> tuple:
    return d["version"], tuple(d["internal"]), d["gauss"]


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StopOnSignal:
    """Context manager: SIGINT (Ctrl-C) and SIGTERM set :attr:`signum` instead of killing the process, so
    the loop can finish its step, save a checkpoint and exit. A second signal stops at once
    (KeyboardInterrupt). Outside the main thread (where handlers cannot be set) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        log.warning("%s received: finishing this step, then saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


def rng_states(negatives: random.Random, d) -> list[dict] | None:
    """Every process's :func:`rng_state`, in rank order, on rank 0 (None on the others): each process of a DDP
    run draws its own dropout masks and hard negatives, so each resumes from its own. Every process of the
    group (``d``, a :class:`~embtune.training.distributed.Dist`) must call it; one gather."""
    from embtune.training.distributed import gather_object

    return gather_object(rng_state(negatives), d)


def training_state(*, model, optimizer, scheduler, loss_fn, negatives_rng: random.Random, step: int, epoch: int,
                   done: int, seen: int, skipped: int, seconds: float, base: dict, fingerprint: str,
                   config: dict, weights: bool = True, rng_by_rank: list[dict] | None = None) -> dict:
    """Everything a resumed run needs, as one dict: weights (model and loss, e.g. a learnable temperature),
    optimiser and scheduler state, the position in the data (``epoch``, ``done`` = batches of that epoch
    already trained on), counters, every random state, the base metrics, the data's fingerprint and the
    config. Read it back with :func:`restore_training`. ``weights=False`` leaves out the model's weights
    and the optimiser state (a sharded run writes them through :func:`embtune.training.fsdp.save_sharded`).
    ``rng_by_rank``: every process's random state (:func:`rng_states`), kept when there are several; ``rng``
    is this process's (rank 0's) either way."""
    state = {"format": FORMAT, "loss": loss_fn.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
             "epoch": epoch, "done": done, "seen": seen, "skipped": skipped, "seconds": seconds,
             "rng": rng_state(negatives_rng), "base": base, "fingerprint": fingerprint, "config": config}
    if rng_by_rank is not None and len(rng_by_rank) > 1:
        state["rng_by_rank"] = rng_by_rank
    return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()} if weights else state


def restore_training(state: dict, *, model, optimizer, scheduler, loss_fn, negatives_rng: random.Random,
                     fingerprint: str, rank: int = 0, world: int = 1) -> dict:
    """Load a :func:`training_state` dict into the run's objects; returns the counters
    (``step, epoch, done, seen, skipped, seconds``). A sharded run's weights and optimiser state are not in
    ``state`` (``shards``): :func:`embtune.training.fsdp.restore_sharded` loads them, with each process's
    random state. Process ``rank`` of ``world`` takes its own random state (:func:`rank_rng`).

    Raises:
        ValueError: the data differs from the data the checkpoint was trained on.
    """
    check_data(state, fingerprint)
    if not state.get("shards"):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    loss_fn.load_state_dict(state["loss"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rank_rng(state, rank, world), negatives_rng)
    return {k: state[k] for k in ("step", "epoch", "done", "seen", "skipped", "seconds")}


def check_data(state: dict, fingerprint: str) -> None:
    """Refuse to resume ``state`` on other data than it was trained on (``fingerprint``: the data's sha256, see
    :class:`embtune.data.TrainingData`); the loop calls it in its pre-flight, before any model loads.

    Raises:
        ValueError: the fingerprints differ, both shown.
    """
    if state["fingerprint"] != fingerprint:
        raise ValueError("the training data changed since the checkpoint was written (sha256 fingerprint "
                         f"{state['fingerprint'][:12]} then, {fingerprint[:12]} now); resume with the same data")


def rank_rng(state: dict, rank: int, world: int) -> dict:
    """Process ``rank``'s random state in ``state``: its own when the checkpoint holds one per process of a
    run of ``world`` processes; otherwise (a checkpoint of format 3 or older, which kept rank 0's only, or one
    of another number of processes) rank 0's, on every process, with a warning: the run resumes, but its
    processes' dropout masks and sampled negatives are no longer those of an uninterrupted run."""
    ranks = state.get("rng_by_rank")
    if world == 1 or state.get("shards"):  # one process; or sharded: each process's own is beside the shards
        return state["rng"]
    if ranks is not None and len(ranks) == world:
        return ranks[rank]
    if rank == 0:
        held = f"{len(ranks)} processes'" if ranks is not None else "only one process's (format 3 or older)"
        log.warning("the checkpoint holds %s random state, this run has %d processes: every process resumes from "
                    "rank 0's (dropout masks and sampled negatives differ from an uninterrupted run's)", held, world)
    return state["rng"]


def stop_after_signal(signum: int, step: int, path: Path | None) -> SystemExit:
    """Log how to go on after a SIGINT/SIGTERM stop; returns the SystemExit (128 + signal number) to raise."""
    run_dir = path.parent.parent if path is not None else None
    log.warning("stopped by %s after step %d; checkpoint %s; continue with: embtune resume_from=%s",
                signal.Signals(signum).name, step, path, run_dir)
    return SystemExit(128 + signum)
