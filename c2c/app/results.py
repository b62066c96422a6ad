"""Results files: written atomically (temporary file, then a hard link to the final name), never
overwriting an existing file, so a crash or a second run can't leave a half-written or clobbered JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_name": name,
        "platform": platform.platform(),
    }


def check_output_dir(folder: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Create `folder` and prove it writable now, before a long run whose results would be lost."""
    from ..errors import UserInputError

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserInputError(f"cannot write to {flag} {folder}: {e.strerror or e} (pass a writable folder)") from None


def timestamp() -> str:
    """The time stamp in results names (one per run: the JSON and its plots folder share it)."""
    return time.strftime("%Y%m%d_%H%M%S")


def save_json_atomic(data: dict, output_dir: str | os.PathLike, prefix: str = "results", stamp: str | None = None) -> Path:
    """Write `<output_dir>/<prefix>_YYYYmmdd_HHMMSS.json` (suffix _1, _2... if taken). Returns the path.

    A write that fails (a full disk, a folder that went away) is a UserInputError that says nothing
    was saved, and leaves no partial file behind."""
    folder = Path(output_dir)
    try:
        return _save_json(data, folder, prefix, stamp or timestamp())
    except OSError as e:
        raise write_failed(folder, e) from None


def write_failed(folder: str | os.PathLike, error: OSError):
    """The error for results that could not be written (a full disk, a folder that went away)."""
    from ..errors import UserInputError

    return UserInputError(f"cannot write the results to {folder}: {error.strerror or error} (free some space or pass "
                          "another --output_dir); nothing was saved")


def _save_json(data: dict, folder: Path, prefix: str, stamp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{prefix}_", suffix=".json.tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; results are ordinary files
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.flush()
            os.fsync(f.fileno())
        for i in range(1000):
            final = folder / (f"{prefix}_{stamp}.json" if i == 0 else f"{prefix}_{stamp}_{i}.json")
            try:
                os.link(tmp, final)  # fails if the name exists: never overwrites
                return final
            except FileExistsError:
                continue
        raise FileExistsError(f"no free results file name in {folder}")
    finally:
        os.unlink(tmp)


def command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv if argv is None else [sys.argv[0], *argv]
    return " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *args])
