"""Every ``GatewayError`` subclass the code defines (every module of ``app/`` imported first, the side tools
that need their own extras aside): the README's error table and the decode pool's pickling are checked
against the same list."""

from __future__ import annotations

import importlib
import pkgutil

import app
from app.errors import GatewayError


def gateway_error_classes() -> set[type[GatewayError]]:
    """``GatewayError`` and all its subclasses, at any depth."""
    for module in pkgutil.walk_packages(app.__path__, "app."):
        if not module.name.startswith(("app.triton_models", "app.bench")):
            importlib.import_module(module.name)
    found: set[type[GatewayError]] = {GatewayError}
    todo = [GatewayError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found
