"""LoRA tools: resize, merge, extract, convert, info (`python -m daemon lora ...`, later daemon jobs).

Each tool is a function that takes paths and options, reports progress through an optional
`progress(done, total, what)` callback, publishes its output with `shared.files.publish_new` (a new
name, never over a file, never a partial file) and returns a small result record; bad input raises a
`UserError` whose one line names the file and what is wrong.
"""
