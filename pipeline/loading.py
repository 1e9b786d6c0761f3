"""Loading what a plan names: device and dtype defaults, quiet libraries, the model with its adapter.

torch and the model libraries are imported inside functions only (the command line's ``--help`` stays fast).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import LookalikeError
from .plan import DEMO, DEMOS, Plan

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .personalizer import Personalizer

DEBUG_ENV = "LOOKALIKE_DEBUG"


def debug() -> bool:
    """Whether LOOKALIKE_DEBUG asks for tracebacks and library warnings."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def device_and_dtype(model: str, device: str | None, dtype: str | None
                      ) -> tuple[torch.device | None, torch.dtype | None]:
    """--device and --dtype with their defaults: cuda + float16 when available, else cpu + float32 (demo: None)."""
    import torch

    if model in DEMOS:
        return None, None

    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise LookalikeError(f"unknown --device {device!r}; use cuda, cuda:N, mps or cpu") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LookalikeError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu")
    name = dtype or ("float16" if dev.type == "cuda" else "float32")
    return dev, getattr(torch, name)


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's retry warnings (kept with LOOKALIKE_DEBUG=1): a failure is one sentence."""
    if debug():
        yield
        return
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars are shown only there)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers' and transformers' warnings, and their loading bars off a terminal (LOOKALIKE_DEBUG keeps them)."""
    if debug():
        yield
        return
    import warnings

    from diffusers.utils import logging as dl
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tl

    saved = (dl.get_verbosity(), tl.get_verbosity(), dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled(),
             hub_utils.are_progress_bars_disabled())
    dl.set_verbosity_error()
    tl.set_verbosity_error()
    if not _stderr_is_terminal():
        dl.disable_progress_bar()
        tl.disable_progress_bar()  # and huggingface_hub's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            yield
        finally:
            warnings.simplefilter("ignore", UserWarning)  # HF_HUB_DISABLE_PROGRESS_BARS refusing a change
            dl.set_verbosity(saved[0])
            tl.set_verbosity(saved[1])
            if saved[2]:
                dl.enable_progress_bar()
            if saved[3]:
                tl.enable_progress_bar()
            if saved[4]:
                hub_utils.disable_progress_bars()


def load_personalizer(plan: Plan, device: torch.device | None, dtype: torch.dtype | None,
                      faces: dict[str, Any] | None = None) -> tuple[Personalizer, str]:
    """The model with the adapter loaded (the demo: on the cpu in float32); returns it and the adapter's name."""
    if plan.demo:
        from .demo import DEMO_TRAINED, demo_personalizer, trained_demo_personalizer

        if DEMO_TRAINED and plan.model == DEMO:
            p = trained_demo_personalizer(adapter=plan.checkpoint is None)
        else:
            p = demo_personalizer(plan.spec.name if plan.checkpoint is None else None)
        p.encoders.face_options = dict(faces or {})
        if plan.checkpoint is None:
            return p, p.adapters[0].name
        return p, p.load_adapter(plan.checkpoint, spec=plan.spec)
    from .personalizer import Personalizer

    assert plan.checkpoint is not None and device is not None and dtype is not None
    p = Personalizer.from_pretrained(plan.model, dtype=dtype, device=device)
    p.encoders.face_options = dict(faces or {})
    return p, p.load_adapter(plan.checkpoint, spec=plan.spec)
