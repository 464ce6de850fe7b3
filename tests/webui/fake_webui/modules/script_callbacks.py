"""As modules/script_callbacks.py: the callbacks the tab registers, with the same signatures."""

import dataclasses
import inspect
import os
import traceback


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: object
    name: str = None


callback_map = dict(callbacks_app_started=[], callbacks_ui_tabs=[], callbacks_ui_settings=[],
                    callbacks_script_unloaded=[], callbacks_before_ui=[])


def add_callback(callbacks, fun, *, name=None, category='unknown'):
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else 'unknown file'
    callback_name = f"{os.path.basename(filename)}/{category}" + (f"/{name}" if name else "")
    callbacks.append(ScriptCallback(filename, fun, callback_name))


def report_exception(c, job):
    print(f"Error executing callback {job} for {c.script}")
    traceback.print_exc()


def app_started_callback(demo, app):
    for c in callback_map['callbacks_app_started']:
        try:
            c.callback(demo, app)
        except Exception:
            report_exception(c, 'app_started_callback')


def ui_tabs_callback():
    res = []
    for c in callback_map['callbacks_ui_tabs']:
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def before_ui_callback():
    for c in callback_map['callbacks_before_ui']:
        try:
            c.callback()
        except Exception:
            report_exception(c, 'before_ui')


def ui_settings_callback():
    for c in callback_map['callbacks_ui_settings']:
        try:
            c.callback()
        except Exception:
            report_exception(c, 'ui_settings_callback')


def on_app_started(callback, *, name=None):
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map['callbacks_script_unloaded'], callback, name=name, category='script_unloaded')


def on_before_ui(callback, *, name=None):
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')
