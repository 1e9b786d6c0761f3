"""Rebuild the small test-data set shipped in tests/data from the full copy in ../shared (run by hand).

DreamBench (google/dreambooth, CC-BY-4.0): four subjects (two objects, two live subjects), their photos
downscaled to a 256 px long side, with the licence, the per-image sources of those subjects, and a
``prompts.json`` restricted to them. YuNet (Apache-2.0): copied byte for byte, with its notice.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SUBJECTS = {"backpack": 2, "cat": 2, "dog": 5, "teapot": 2}  # name -> number of photos kept
LONG_SIDE = 256


def _sources(text: str, names: set[str]) -> str:
    """The sources file's header, the paragraphs of the kept subjects, then its licences section verbatim."""
    body, licences = text.split("\nLicenses\n", 1)
    paragraphs = body.split("\n\n")
    kept = [p for p in paragraphs[3:] if p.split(":", 1)[0].strip() in names]
    return "\n\n".join(paragraphs[:3] + kept).rstrip() + "\n\n\nLicenses\n" + licences


def main(shared: Path) -> None:
    src, dst = shared / "data" / "dreambench", HERE / "dreambench"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    prompts = json.loads((src / "prompts.json").read_text())
    subjects = []
    for entry in prompts["subjects"]:
        count = SUBJECTS.get(entry["name"])
        if count is None:
            continue
        (dst / entry["name"]).mkdir()
        entry = dict(entry, images=entry["images"][:count])
        for rel in entry["images"]:
            with Image.open(src / rel) as im:
                im = im.convert("RGB")
                im.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
                im.save(dst / rel, quality=85, optimize=True)
        subjects.append(entry)
    prompts["subjects"] = subjects
    prompts["note"] = (prompts.get("note", "") + " Test subset shipped with lookalike: "
                       f"{', '.join(SUBJECTS)}, photos downscaled to a {LONG_SIDE} px long side.").strip()
    (dst / "prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    shutil.copy(src / "LICENSE.md", dst / "LICENSE.md")
    (dst / "references_and_licenses.txt").write_text(
        _sources((src / "references_and_licenses.txt").read_text(), set(SUBJECTS)))
    yunet = HERE / "yunet"
    yunet.mkdir(exist_ok=True)
    for name in ("face_detection_yunet.onnx", "NOTICE"):
        shutil.copy(shared / "models" / "yunet" / name, yunet / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared")
