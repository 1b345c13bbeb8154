"""The shipped demo checkpoints (`jaxdec.load("demo-target")`, `"demo-draft"`).

This top-level `checkpoints/` folder is installed as the package `jaxdec.checkpoints`
(see pyproject.toml); `jaxdec.loading` finds it with `importlib.resources`. How the
checkpoints were trained: README.md here, and `python -m jaxdec.train`.
"""
