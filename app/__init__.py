"""The ``lookalike app`` web page (Gradio): a front end beside the command line, over the library.

:class:`~lookalike.app.engine.Engine` does the work without gradio; :func:`~lookalike.app.page.launch` serves
the page. gradio is imported only when the page is built, so importing this package stays light.
"""

from .engine import Engine, Photos, Request

__all__ = ["Engine", "Photos", "Request"]
