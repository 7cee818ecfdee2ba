"""The web app's logic, without gradio: :class:`AppCore` is the facade ``app.py`` calls. No torch
at import: the page is built and served before the model stack loads (:mod:`.loading`)."""
from .core import AppCore
from .loading import NotReady
from .results import zip_export
from .retrieval import Hit
from .views import bind_warning, device_line, status_text

__all__ = ["AppCore", "Hit", "NotReady", "bind_warning", "device_line", "status_text", "zip_export"]
