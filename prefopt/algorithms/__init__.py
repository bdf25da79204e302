"""Built-in algorithms and losses. Every module in this package (and in ``losses/``) is imported, so a new
algorithm or loss is one file with one decorator: nothing else is edited."""

import importlib
import pkgutil

for _package in (__name__, f"{__name__}.losses"):
    _module = importlib.import_module(_package)
    for _info in pkgutil.iter_modules(_module.__path__):
        if not _info.name.startswith("_") and _info.name != "losses":
            importlib.import_module(f"{_package}.{_info.name}")
