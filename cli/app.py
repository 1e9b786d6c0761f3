"""``lookalike app``: the subcommand that serves the web page (gradio is imported only when it runs)."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def _port(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; use a number from 1 to 65535, e.g. 7860")
    return int(text)


def add_app_parser(sub: Any) -> None:
    """The ``app`` subcommand."""
    from ..pipeline.plan import DEFAULT_MODEL

    p = sub.add_parser(
        "app", help="serve a web page (Gradio) for personalization, on this machine only by default",
        description="Serve the lookalike web page: upload reference photos, type a prompt, download PNGs that "
                    "carry the same metadata as `lookalike generate`, save and load subject files.",
        epilog="The page loads nothing from the network and sends no analytics; it has no sharing link. "
               "Try it offline: lookalike app --model demo, then open http://127.0.0.1:7860 .")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|FOLDER|demo",
                   help=f"diffusers model, SD1.5 or SDXL: a hub id, a local folder, or demo (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 opens it to "
                        f"the network)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="weights' precision (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--face-models", metavar="DIR", default=None,
                   help="FaceID adapters: the insightface model folder (default: ~/.insightface/models/buffalo_l)")
    p.add_argument("--face-detector", choices=("insightface", "yunet"), default=None,
                   help="FaceID adapters: insightface's detector (default) or OpenCV's YuNet")
    p.add_argument("--yunet-model", metavar="FILE", default=None, help="with --face-detector yunet: the YuNet .onnx file")
    p.set_defaults(run=cmd_app)


def cmd_app(args: argparse.Namespace) -> int:
    """Check the model and adapter list, then serve the page until interrupted."""
    from ..app.engine import Engine
    from ..app.page import launch
    from ..pipeline.loading import device_and_dtype
    from .checks import face_options

    device_and_dtype(args.model, args.device, args.dtype)  # a bad --device fails before gradio loads
    engine = Engine(args.model, device=args.device, dtype=args.dtype, faces=face_options(args))
    engine.adapter_choices()  # an unknown --model fails here, in one line
    launch(engine, args.host, args.port)
    return 0
