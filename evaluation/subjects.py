"""Subject sets to evaluate on: the DreamBench layout (``prompts.json``) and a plain folder per subject.

**DreamBench** (DreamBooth, Ruiz et al. 2023): a folder with ``prompts.json`` holding the prompt
templates (``object_prompts``, ``live_subject_prompts``) and a ``subjects`` list of
``{"name", "class", "live", "prompt_set", "images"}`` (image paths relative to the folder).

**Plain**: ``DIR/<subject>/`` holds a subject's reference images (JPEG, PNG, WebP, BMP). Optional:
``DIR/prompts.txt`` (one prompt per line for every subject; blank lines and ``#`` comments skipped),
``DIR/<subject>/prompts.txt`` (that subject's own prompts) and ``DIR/subjects.json``
(``{"<subject>": {"class": "woman", "live": true, "face": true}}``, and a top-level ``"face": true``
for a face set). Without prompts, DreamBench's templates are used (live ones for live subjects).

Prompts are zero-shot: encoder-based methods have no learned token, so the unique token ``{0}`` is
dropped and ``{1}`` (or ``{class}``) becomes the class word, with spaces collapsed:
``"a {0} {1} on the beach"`` -> ``"a dog on the beach"`` (as BLIP-Diffusion and IP-Adapter evaluations do).
A subject's class comes from ``prompts.json`` / ``subjects.json``, else DreamBench's own class for
its 30 subject names, else the folder name without trailing digits (``my_mug2`` -> ``my mug``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import LookalikeError
from ..fileio import inside, safe_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PROMPTS_JSON = "prompts.json"
PROMPTS_TXT = "prompts.txt"
SUBJECTS_JSON = "subjects.json"
#: DreamBench's classes of its 30 subjects (google/dreambooth, dataset/prompts_and_classes.txt).
DREAMBENCH_CLASSES: dict[str, str] = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock",
    "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog",
    "dog7": "dog", "dog8": "dog", "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy", "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy",
    "red_cartoon": "cartoon", "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
#: Classes that take DreamBench's live-subject prompts (DreamBench: cat and dog; people for face sets).
LIVE_CLASSES: frozenset[str] = frozenset({"cat", "dog", "person", "man", "woman", "boy", "girl", "child"})
_PLACE = ("a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
          "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric",
          "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
          "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
          "a {0} {1} on top of a purple rug in a forest")
_LOOK = ("a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}")
#: DreamBench's 25 object prompt templates, verbatim.
OBJECT_PROMPTS: tuple[str, ...] = _PLACE + (
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug") + _LOOK
#: DreamBench's 25 live-subject prompt templates, verbatim.
LIVE_PROMPTS: tuple[str, ...] = _PLACE + (
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit") + _LOOK


@dataclass(frozen=True)
class EvalSubject:
    """One subject: its name, class word, reference images and (already formatted) prompts."""

    name: str
    class_word: str
    references: tuple[Path, ...]
    prompts: tuple[str, ...]
    live: bool = False
    face: bool = False


@dataclass(frozen=True)
class SubjectSet:
    """The subjects of one benchmark folder; ``layout`` is "dreambench" or "plain"."""

    root: Path
    layout: str
    subjects: tuple[EvalSubject, ...]

    @property
    def face(self) -> bool:
        """Whether every subject is a face (the face metric then runs by default)."""
        return bool(self.subjects) and all(s.face for s in self.subjects)

    def limited(self, subjects: int | None = None, prompts: int | None = None) -> SubjectSet:
        """The first ``subjects`` subjects, each with its first ``prompts`` prompts (None keeps all)."""
        for value, flag in ((subjects, "limit-subjects"), (prompts, "limit-prompts")):
            if value is not None and value < 1:
                raise LookalikeError(f"--{flag} must be at least 1, not {value}")
        chosen = self.subjects[:subjects] if subjects else self.subjects
        return replace(self, subjects=tuple(replace(s, prompts=s.prompts[:prompts] if prompts else s.prompts)
                                            for s in chosen))


def format_prompt(template: str, class_word: str) -> str:
    """Zero-shot prompt: drop the unique token ``{0}``, put the class word for ``{1}``/``{class}``."""
    text = template.replace("{0}", "").replace("{1}", class_word).replace("{class}", class_word)
    return " ".join(text.split())


def class_from_name(name: str) -> str:
    """A subject's class word from its folder name: DreamBench's table, else the name sans digits."""
    if name in DREAMBENCH_CLASSES:
        return DREAMBENCH_CLASSES[name]
    word = " ".join(re.sub(r"\d+$", "", name).replace("_", " ").replace("-", " ").split())
    return word or name


def load_subject_set(root: str | os.PathLike[str]) -> SubjectSet:
    """Read a subject set: the DreamBench layout when ``prompts.json`` is present, else the plain one."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise LookalikeError(f"--subjects {root} is not a folder; pass a DreamBench folder (with prompts.json) "
                             f"or a folder with one subfolder of photos per subject")
    if (path / PROMPTS_JSON).is_file():
        return _load_dreambench(path)
    return _load_plain(path)


def _read_json(file: Path) -> Any:
    """A JSON file's content, any failure as one sentence."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read {file}: {str(exc).splitlines()[0]}; fix the JSON") from exc


def _load_dreambench(root: Path) -> SubjectSet:
    """The DreamBench layout described by ``prompts.json``."""
    data = _read_json(root / PROMPTS_JSON)
    entries = data.get("subjects") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise LookalikeError(f"{root / PROMPTS_JSON} has no 'subjects' list; it is not a DreamBench prompts.json")
    subjects = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise LookalikeError(f"{root / PROMPTS_JSON}: every subject needs a \"name\"; found {str(entry)[:60]}")
        name = safe_name(entry["name"], f"subject name in {root / PROMPTS_JSON}")
        word = str(entry.get("class") or class_from_name(name))
        live = bool(entry.get("live", word in data.get("live_classes", ("cat", "dog"))))
        prompt_set = entry.get("prompt_set") or ("live_subject_prompts" if live else "object_prompts")
        templates = data.get(prompt_set)
        if not isinstance(templates, list) or not templates:
            raise LookalikeError(f"{root / PROMPTS_JSON} has no prompt list {prompt_set!r} for subject {name}")
        listed = entry.get("images") or []
        if not isinstance(listed, list) or not all(isinstance(p, str) and p for p in listed):
            raise LookalikeError(f"{root / PROMPTS_JSON}: the images of subject {name} must be a list of file names")
        images = ([inside(root, p, what=f"reference image of subject {name}") for p in listed]
                  or _images_in(inside(root, name, what="subject folder")))
        missing = [p for p in images if not p.is_file()]
        if missing or not images:
            raise LookalikeError(f"subject {name} of {root} lacks its reference image(s) "
                                 f"{missing[0] if missing else root / name}; restore the dataset folder")
        subjects.append(EvalSubject(name, word, tuple(images), tuple(format_prompt(t, word) for t in templates),
                                    live=live, face=bool(entry.get("face", False))))
    return SubjectSet(root, "dreambench", tuple(subjects))


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in a folder, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def read_prompts(file: Path) -> tuple[str, ...]:
    """Prompt templates, one per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LookalikeError(f"cannot read the prompts file {file}: {exc}; write one prompt per line") from exc
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not prompts:
        raise LookalikeError(f"the prompts file {file} holds no prompt; write one prompt per line")
    return prompts


def _load_plain(root: Path) -> SubjectSet:
    """One subfolder of reference photos per subject, with optional prompts and subjects.json."""
    meta = _read_json(root / SUBJECTS_JSON) if (root / SUBJECTS_JSON).is_file() else {}
    if not isinstance(meta, dict):
        raise LookalikeError(f"{root / SUBJECTS_JSON} must hold an object mapping subject names to settings")
    shared = read_prompts(root / PROMPTS_TXT) if (root / PROMPTS_TXT).is_file() else None
    face_set = bool(meta.get("face", False))
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images_in(folder)
        if not images:
            continue
        info = meta.get(folder.name) or {}
        word = str(info.get("class") or class_from_name(folder.name))
        live = bool(info.get("live", word in LIVE_CLASSES or face_set or info.get("face", False)))
        own = folder / PROMPTS_TXT
        templates = read_prompts(own) if own.is_file() else shared or (LIVE_PROMPTS if live else OBJECT_PROMPTS)
        subjects.append(EvalSubject(folder.name, word, tuple(images), tuple(format_prompt(t, word) for t in templates),
                                    live=live, face=bool(info.get("face", face_set))))
    if not subjects:
        raise LookalikeError(f"{root} holds no subject: give it one subfolder of photos per subject, or a "
                             f"DreamBench prompts.json")
    return SubjectSet(root, "plain", tuple(subjects))
