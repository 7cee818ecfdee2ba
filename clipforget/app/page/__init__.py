"""The Gradio page: ``layout`` (the widgets), ``handlers`` (events, wired by ``wire``) and ``api``
(endpoints for scripts). The only part of :mod:`clipforget.app` that imports gradio; the work is
done by :class:`clipforget.app.AppCore`."""
