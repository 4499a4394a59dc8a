"""The web app: `python -m bagel_jax.app --checkpoint ...` (Gradio, the `.[app]` extra).

    service.py   the request functions over one Inferencer (checked input, one request at a time)
    ui.py        the Gradio page: upstream app.py's tabs, controls and defaults
    __main__.py  the command line: load the model, serve the page
"""
