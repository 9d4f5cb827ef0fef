"""Plug-ins: another package adds losses, methods, calibrators or backbones without editing this one.

A plug-in package declares an entry point in the group ``calibprompt.plugins``; its value is a module
(imported) or a callable (imported and called with no arguments). Importing it runs the package's
``@register_loss`` / ``@register_method`` / ``@register_calibrator`` decorators and
``register_backbone(...)`` calls. calibprompt loads every plug-in once per process, the first time a
registry is asked for a name it does not know or for its full list, so a plug-in's names work in
configs, ``train``, ``sweep`` (Ray workers included) and the listings. docs/ecosystem.md has a
plug-in loss in 15 lines.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "calibprompt.plugins"
_loaded: list[str] | None = None


class PluginError(ValueError):
    """A plug-in could not be loaded."""


def load_plugins() -> list[str]:
    """Import every ``calibprompt.plugins`` entry point (once per process); returns their names."""
    global _loaded
    if _loaded is not None:
        return list(_loaded)
    loaded = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            target = ep.load()
            if callable(target):
                target()
        except Exception as err:  # noqa: BLE001 - any failure names the plug-in and how to get past it
            raise PluginError(f"calibprompt plug-in {ep.name!r} ({ep.value}, from distribution "
                              f"{getattr(ep.dist, 'name', '?')}) failed to load: {type(err).__name__}: {err}. "
                              "Fix or uninstall that package.") from err
        loaded.append(ep.name)
    _loaded = loaded  # only once every plug-in loaded: a broken one keeps raising, never "unknown loss"
    return list(_loaded)
