"""What ``lookalike demo`` does with a trained demo model: its evaluation table and a grid of examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data import make_split
from .evaluate import cases, evaluate, format_table, generate_cases
from .judge import load_judge
from .render import caption, render

WORLD_SEED = 0  # the seed the shipped model was rebuilt with: it fixes which subjects are held out


def cli_defaults() -> tuple[int, float, float]:
    """Steps, guidance and adapter scale that ``lookalike generate --model demo`` uses by default."""
    from ..pipeline.output import DEFAULT_GUIDANCE, DEFAULT_SCALE, DEFAULT_STEPS

    return DEFAULT_STEPS, DEFAULT_GUIDANCE["sd15"], DEFAULT_SCALE


def evaluate_model(model_dir: str | Path | None = None, per_subject: int = 4, steps: int | None = None,
                   seed: int = WORLD_SEED) -> tuple[dict, str]:
    """Generate for every held-out subject with the CLI's defaults and judge it; (figures, table)."""
    from ..pipeline.demo import DEMO_DIR, trained_demo_personalizer

    folder = Path(model_dir) if model_dir is not None else DEMO_DIR
    p = trained_demo_personalizer(model_dir=folder)
    judge = load_judge(str(folder / "judge.safetensors"))
    default_steps, guidance, scale = cli_defaults()
    result = evaluate(p, judge, make_split(seed), per_subject, steps or default_steps, guidance, scale, seed)
    return result, format_table(result)


def upscale(image: np.ndarray, factor: int = 4) -> np.ndarray:
    return image.repeat(factor, 0).repeat(factor, 1)


def write_grid(out: str | Path, model_dir: str | Path | None = None, subjects: int = 10, per_subject: int = 4,
               seed: int = WORLD_SEED) -> Path:
    """``demo_grid.png``: per held-out subject, its reference then what the model drew for new captions."""
    from ..pipeline.demo import trained_demo_personalizer
    from ..pipeline.output import save_png  # PNG with settings in its metadata

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    p = trained_demo_personalizer(model_dir=model_dir)
    steps, guidance, scale = cli_defaults()
    all_cases = cases(make_split(seed), per_subject, seed)[: subjects * per_subject]
    images = generate_cases(p, all_cases, True, steps, guidance, scale, seed + 1000)
    rows, lines = [], []
    gap = np.full((32 * 4, 8, 3), 255, np.uint8)
    for s in range(subjects):
        chunk = all_cases[s * per_subject:(s + 1) * per_subject]
        reference = render(chunk[0].identity, chunk[0].reference)
        Image.fromarray(reference).save(out / f"reference_{s:02d}.png")
        cells = [upscale(reference), gap] + [upscale(images[s * per_subject + k]) for k in range(per_subject)]
        rows.append(np.concatenate(cells, axis=1))
        lines.append(f"row {s + 1}: reference {chunk[0].identity.name} on {chunk[0].reference.background}; "
                     + "; ".join(f"'{caption(c.scene)}'" for c in chunk))
    grid = np.concatenate([np.concatenate([r, np.full((8, r.shape[1], 3), 255, np.uint8)]) for r in rows])
    path = out / "demo_grid.png"
    save_png(Image.fromarray(grid), path, {"model": "demo", "adapter": "demo (plus)", "scale": repr(scale),
                                           "steps": str(steps), "guidance": str(guidance),
                                           "captions": "\n".join(lines)})
    (out / "demo_grid.txt").write_text("columns: reference | four generations with new captions\n"
                                       + "\n".join(lines) + "\n")
    return path
