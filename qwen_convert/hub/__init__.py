"""SRC -> a local directory: a path as is, `qconv:NAME` from the package, a hub id downloaded
(ModelScope first, then Hugging Face; HF_ENDPOINT mirrors honoured) and integrity-checked.

    download.py  the hubs, revisions, file selection, resumable downloads, sha256 records
    resolve.py   resolve_model(): the one place every command turns SRC into files

Imports the core modules and checkpoint/ (to check what it downloaded).
"""
