"""As modules/ui_gradio_extensions.py: every extension's `javascript/*.js` goes into the page's <head>
as a `<script src="file=...">` (the WebUI patches gradio's TemplateResponse to add them)."""

import glob
import os

import gradio as gr

from modules import paths, shared


def javascript_files():
    for base in (paths.extensions_builtin_dir, paths.extensions_dir):
        yield from sorted(glob.glob(os.path.join(base, "*", "javascript", "*.js")))


def webpath(fn):
    """A path gradio serves: relative to the WebUI folder when inside it (links kept, as gradio 3
    allows files under its working folder), else absolute."""
    web_path = os.path.relpath(fn, paths.script_path) if os.path.abspath(fn).startswith(paths.script_path) else \
        os.path.abspath(fn)
    return f"file={web_path.replace(os.sep, '/')}?{os.path.getmtime(fn)}"


def javascript_html():
    return "".join(f'<script type="text/javascript" src="{webpath(js)}"></script>\n' for js in javascript_files())


def reload_javascript():
    head = javascript_html()

    def template_response(*args, **kwargs):
        res = shared.GradioTemplateResponseOriginal(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode())
        res.init_headers()
        return res

    if not hasattr(shared, "GradioTemplateResponseOriginal"):
        shared.GradioTemplateResponseOriginal = gr.routes.templates.TemplateResponse
    gr.routes.templates.TemplateResponse = template_response
