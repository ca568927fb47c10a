"""Command implementations: what each ``genpath`` command does, callable from Python the same way.

Each module here composes the lower layers (the slide engine, normalizers, pipelines) into one
job with files in and files out; :mod:`genpath.cli` only parses options and calls them.
"""
