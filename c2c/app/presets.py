"""Named presets: flag defaults for models shipped in the repository.

`tiny`: a Qwen3-architecture target (~2.2M parameters) and draft (~0.23M), their tokenizer and a
C2C fuser, trained on Shakespeare by `presets/build_tiny.py`; runs offline on a CPU in seconds.
With --parallel_drafting a preset's fuser is `fuser_parallel/` (its projectors trained with a parallel
draft: a LoRA adapter and a mask embedding) and its draft the one that fuser was trained on (its
config.json's `model.base_model`: `pard_draft/` when it was trained on top of the PARD draft);
`pard_draft/` is the draft trained without fusion (PARD alone).
`arith`: the fusion control, built by `presets/build_arith.py`: a target (~0.8M) that adds 3-digit
numbers and continues mod-1000 addition chains, a 1-layer draft that can't carry on its own, and a
fuser trained on the pair; prompts are `A+B=` or `AAA,BBB,` (held-out problems in its prompt files).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError



def _preset_root() -> Path:
    """presets/ of a source checkout (or an editable install), else the copy `pip install .` put
    beside the package (package data `c2c.presets_data`)."""
    checkout = Path(__file__).resolve().parents[2] / "presets"
    if (checkout / "tiny").is_dir():
        return checkout
    try:
        from importlib.resources import files

        return Path(str(files("c2c.presets_data")))
    except ModuleNotFoundError:
        return checkout


PRESET_ROOT = _preset_root()

def _shipped(name: str, max_new_tokens: int) -> dict:
    """A shipped pair's flag defaults: presets/<name>/{draft,target,fuser,prompts.txt}, CPU, float32."""
    folder = PRESET_ROOT / name
    return {
        "base_model": str(folder / "draft"),
        "teacher_model": str(folder / "target"),
        "fuser_checkpoint": str(folder / "fuser"),
        "prompts": str(folder / "prompts.txt"),
        "device": "cpu",
        "dtype": "float32",
        "max_new_tokens": max_new_tokens,
    }


PRESETS: dict[str, dict] = {"tiny": _shipped("tiny", 128), "arith": _shipped("arith", 40)}


def trained_on(fuser: Path, preset: str | None = None) -> str:
    """The preset folder of the draft a fuser was trained on (its config.json's `model.base_model`,
    recorded as presets/<name>/<folder>; `preset`: <name>, the fuser's own folder's by default):
    "draft" unless it names another folder of that preset."""
    import json

    fuser = Path(fuser)
    try:
        named = json.loads((fuser / "config.json").read_text(encoding="utf-8"))["model"]["base_model"]
    except (OSError, ValueError, KeyError, TypeError):
        return "draft"
    return Path(named).name if Path(named).parent.name == (preset or fuser.parent.name) else "draft"


def preset_defaults(name: str | None, parallel: bool = False, fuser: str | None = None) -> dict:
    """The flag defaults of a preset ({} for None); a preset whose files are missing is an error.
    `parallel` (--parallel_drafting): the preset's fuser trained with a parallel draft
    (`fuser_parallel/`, presets/build_parallel.py) in place of its chain fuser, and the draft it was
    trained on; `fuser` (the user's --fuser_checkpoint, if any): the draft is the one that fuser was
    trained on instead (the preset's draft unless it names another of the preset's folders)."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise UserInputError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    if parallel and (PRESET_ROOT / name / "fuser_parallel").is_dir():
        values["fuser_checkpoint"] = str(PRESET_ROOT / name / "fuser_parallel")
        # the draft of the fuser that runs: the user's own --fuser_checkpoint (a folder) when given
        chosen = Path(fuser) if fuser and fuser.lower() != "none" else PRESET_ROOT / name / "fuser_parallel"
        values["base_model"] = str(PRESET_ROOT / name / trained_on(chosen, name))
    missing = [v for k, v in values.items() if k in ("base_model", "teacher_model", "fuser_checkpoint") and not Path(v).exists()]
    if missing:
        raise UserInputError(f"preset {name!r} files are missing ({missing[0]}); rebuild them with python presets/build_{name}.py")
    return dict(values)
