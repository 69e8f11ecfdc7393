"""`qconv run`: a recipe file -> seq-cls, ONNX variants, verify -> manifest.json and REPORT.md.

    recipe.py    the recipe: parsed, validated, overridable with --set, fingerprinted
    run.py       run_recipe(): the steps, resumable, each skipped when its output is intact
    manifest.py  manifest.json (files, sha256, versions, metrics) and `qconv run --check`

Imports every stage below it (hub, seqcls, onnx, verify).
"""
