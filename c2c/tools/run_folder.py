"""The trainer's output folder: what a run may touch, and the checks made before it touches anything.

A folder this trainer wrote carries its marker, `trainer_run.json` (written just before the first
step); `--overwrite` clears only such a folder, and only the names the trainer writes in it. Each
checkpoint (`checkpoints/step_N/`) records the flags that define its run (`run.json`), so `--resume`
continues exactly that run or says which flag differs. `check` reads and never writes; the only
writes here are `begin` (after every check has passed) and the checkpoint housekeeping.

Which flags may change on `--resume` is `RESUMABLE`; every other field of `TrainConfig` defines the
run (a field added to `TrainConfig` is run-defining unless it is named there). This module knows
nothing about models or training steps.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from ..errors import UserInputError

MARKER = "trainer_run.json"  # the trainer's own mark on a folder it wrote (config.json is every model's)
RUN_FILE = "run.json"  # in each checkpoint: its step and the flags that define its run
# What the trainer writes in an output folder, and of which kind: all that --overwrite may remove.
WRITTEN = {"final": "folder", "checkpoints": "folder", "draft_adapter": "folder", "pard_draft": "folder", "metrics.jsonl": "file",
           "config.json": "file", MARKER: "file"}
# Flags that may change on --resume: how long to train, how to evaluate and save, where to run. The
# schedule follows a new --steps from the checkpoint on (learning rate, and the gate temperature
# unless --anneal_steps is set).
RESUMABLE = ("steps", "eval_every", "eval_tokens", "eval_prompts", "eval_new_tokens", "eval_seconds", "save_every",
             "keep_checkpoints", "threads", "device", "save_dtype", "output_dir")
FLAG_NAMES = {"draft_model": "base_model", "target_model": "teacher_model"}  # TrainConfig field -> its flag
# Flags added since checkpoints began recording their flags, at the value that matches what a checkpoint
# without them did (where that is not today's default): --cod_rate came with default 0.7, runs before it had none.
BEFORE_RECORDED = {"cod_rate": 0.0}
# Flags that change nothing unless another one is on ({flag: field that must be true}): not compared otherwise.
USED_ONLY_WITH = {"cod_rate": "parallel_drafts", "cod_floor": "parallel_drafts"}


def flag(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name)


def resumable() -> str:
    """The flags --resume lets change, as --help and the errors say them."""
    return ", ".join(flag(n) for n in RESUMABLE if n != "output_dir")


@dataclass(frozen=True)
class Plan:
    """What the run will do to its folder once every check has passed."""

    clear: bool = False  # --overwrite of an earlier run of this trainer: remove what it wrote
    resume_from: Path | None = None  # --resume: the checkpoint to continue


# ---------------------------------------------------------------- the flags that define a run


def _canonical(value):
    """Local paths as absolute paths (the same run given by another relative path); anything else as is."""
    if isinstance(value, str) and value and os.path.exists(value):
        return str(Path(value).resolve())
    return value


def _data_identity(path: str) -> str:
    """A data file by its content (the same data moved elsewhere is the same run; an edited file is not)."""
    if not os.path.isfile(path):
        return path
    stat = os.stat(path)
    return _content_hash(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per file version (every checkpoint records it)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{size} bytes, sha256 {digest.hexdigest()[:16]}"


def run_flags(cfg) -> dict:
    """The values of every run-defining field of `cfg` (all but RESUMABLE): model paths made absolute,
    the data file by its size and content hash."""
    flags = {f.name: _canonical(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in RESUMABLE}
    flags["data"] = _data_identity(cfg.data)
    return flags


def changed_flags(saved: dict, cfg) -> list[str]:
    """'--flag <saved> (checkpoint) vs <now>' for each run-defining flag `cfg` changes. A flag the
    checkpoint does not record (added to the trainer since) is taken at what the run did without it
    (BEFORE_RECORDED, else its default); a flag the run does not use (USED_ONLY_WITH) is not compared."""
    now, defaults = run_flags(cfg), {f.name: f.default for f in fields(cfg)} | BEFORE_RECORDED
    out = []
    for name, value in now.items():
        if name in USED_ONLY_WITH and not getattr(cfg, USED_ONLY_WITH[name]):
            continue
        before = saved.get(name, defaults.get(name))
        if before != value:
            out.append(f"{flag(name)} {before!r} in the checkpoint, {value!r} now")
    return out


# ---------------------------------------------------------------- checks (read only)


def _contents(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """`out` can be created (or is a folder) and written: probed with a temporary file that is removed
    at once, in `out` or in the nearest folder above it that exists."""
    where = _nearest_existing(out)
    if not where.is_dir():
        raise UserInputError(f"--output_dir {out}: {where} is a file, not a folder: choose another --output_dir")
    try:
        handle, probe = tempfile.mkstemp(dir=where, prefix=".c2c-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise UserInputError(f"--output_dir {out}: cannot write in {where} ({e.strerror or e}): choose another "
                             "--output_dir or make that folder writable") from None


def _check_kinds(out: Path) -> None:
    for name, kind in WRITTEN.items():
        path = out / name
        if path.exists() and path.is_dir() != (kind == "folder"):
            raise UserInputError(f"--output_dir {out}: {name} is a {'folder' if path.is_dir() else 'file'} where the "
                                 f"trainer writes a {kind}: move it away or choose another --output_dir")


def check(cfg, overwrite: bool, resume: bool) -> Plan:
    """Every check of the output folder and the resume request, before anything on disk changes."""
    out = Path(cfg.output_dir)
    if overwrite and resume:
        raise UserInputError("--overwrite starts the run over and --resume continues it: pass one of them")
    check_writable(out)
    names = _contents(out)
    ours = MARKER in names
    if names and not ours:
        raise UserInputError(
            f"--output_dir {out} holds files this trainer did not write ({', '.join(names[:4])}"
            f"{' ...' if len(names) > 4 else ''}; no {MARKER}): the trainer writes only into a new or empty folder or one "
            "it wrote itself, and --overwrite clears only the latter; choose another --output_dir (a fuser an earlier "
            "version of the trainer wrote: move it away first)")
    if not overwrite:
        _check_kinds(out)
    if resume:
        return _check_resume(cfg, out)
    earlier = [n for n in names if n in WRITTEN and n != MARKER]
    if earlier and not overwrite:
        latest = latest_checkpoint(out)
        held = f"an earlier run's checkpoints (newest {latest.name})" if latest else f"a trained fuser ({', '.join(earlier)})"
        raise UserInputError(f"--output_dir {out} already holds {held}: pass --resume to continue that run, --overwrite "
                             "to start over (what that run wrote is removed once every check has passed), or choose "
                             "another --output_dir")
    return Plan(clear=bool(earlier) and overwrite)


def _check_resume(cfg, out: Path) -> Plan:
    latest = latest_checkpoint(out)
    if latest is None:
        raise UserInputError(f"--resume: {out} holds no checkpoint to continue (a run saves one every --save_every steps "
                             "and at its last step): run without --resume to start from step 0 (--overwrite replaces "
                             "what the folder holds)")
    try:
        saved = json.loads((latest / RUN_FILE).read_text(encoding="utf-8"))
        step, flags = int(saved["step"]), dict(saved["run"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserInputError(f"--resume: {latest} does not record the flags of its run ({RUN_FILE} missing or "
                             "damaged; an earlier version of the trainer wrote it), so it cannot be checked: start over "
                             "with --overwrite") from None
    changed = changed_flags(flags, cfg)
    if changed:
        raise UserInputError(f"--resume continues the run in {latest} as it was made, but " + "; ".join(changed)
                             + f": pass the checkpoint's values (only {resumable()} may change), or start a new run with another "
                             "--output_dir")
    if step >= cfg.steps:
        raise UserInputError(f"--steps {cfg.steps} is not past the checkpoint's step {step}: raise --steps to train on "
                             "from it")
    return Plan(resume_from=latest)


def check_space(out: Path, need: int) -> None:
    """Free space for one checkpoint and the final fuser (`need` bytes) where `out` is or will be."""
    free = shutil.disk_usage(_nearest_existing(Path(out))).free
    if free < need:
        raise UserInputError(f"--output_dir {out}: {free / 1e9:.2f} GB free, a checkpoint and the final fuser need "
                             f"{need / 1e9:.2f} GB: free some space or choose another --output_dir")


# ---------------------------------------------------------------- writes (after every check)


def begin(cfg, plan: Plan) -> list[str]:
    """Clear an earlier run if `plan` says so, then mark the folder as this trainer's. Returns what was removed."""
    out = Path(cfg.output_dir)
    removed = clear_run(out) if plan.clear else []
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        (out / MARKER).write_text(json.dumps({"written_by": "python -m c2c.tools.train_fuser",
                                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "run": run_flags(cfg)},
                                             indent=2, default=str), encoding="utf-8")
    return removed


def clear_run(out: Path) -> list[str]:
    """`--overwrite`: remove what an earlier run of this trainer wrote (the names in WRITTEN, nothing
    else), so nothing of it can be resumed or loaded as this run's. Returns what was removed."""
    removed = []
    if (out / "checkpoints").is_dir():
        removed += [f"checkpoints/{f.name}" for f in sorted((out / "checkpoints").iterdir())]
    for name, kind in WRITTEN.items():
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        if name != "checkpoints" and name != MARKER:
            removed.append(f"{name}/" if kind == "folder" else name)
    return removed


def save_run_record(folder: Path, cfg, step: int) -> None:
    (folder / RUN_FILE).write_text(json.dumps({"step": step, "run": run_flags(cfg)}, indent=2, default=str),
                                   encoding="utf-8")


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints under `folder` (checkpoints/step_N)."""
    done = sorted((f for f in folder.glob("step_*") if (f / "trainer_state.pt").is_file()), key=_step_of)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    folders = [f for f in (Path(output_dir) / "checkpoints").glob("step_*") if (f / "trainer_state.pt").is_file()]
    return max(folders, key=_step_of) if folders else None


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("step_"))
    except ValueError:
        return -1
