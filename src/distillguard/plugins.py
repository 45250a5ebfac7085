"""One registry over entry points for everything that varies: detectors, campaigns, watermark
schemes, backends.

A kind of plugin is an entry-point group; distillguard's own built-ins are entry points of the
same groups in its ``pyproject.toml``, so a third-party package extends a registry exactly the
way the built-ins fill it::

    [project.entry-points."distillguard.detectors"]
    mydetector = "my_package.my_module:MyDetector"

    DETECTORS = Registry("distillguard.detectors", "detector", check=is_detector_class)
    DETECTORS.get("mydetector")   # -> MyDetector, or ConfigError naming the group and known names

Loading is lazy (the first lookup imports every entry point of the group) and fault-isolated: a
plugin that fails to import or fails ``check`` is logged and kept in :attr:`Registry.errors`;
the other plugins, built-ins included, still load, and asking for the broken one by name raises
a :class:`ConfigError` that carries its error. A third-party entry point that reuses a built-in's
name is refused the same way, so installing a package cannot silently replace a built-in.

Code may also :meth:`Registry.add` an object at run time (a detector class defined in a
script or a test); entry points stay the way to ship one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from distillguard.errors import ConfigError

__all__ = ["BUILTIN_DIST", "Registry"]

log = logging.getLogger(__name__)

T = TypeVar("T")
BUILTIN_DIST = "distillguard"  # entry points of this distribution are the built-ins


def _dist_name(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.metadata["Name"]


def _is_builtin(ep: EntryPoint) -> bool:
    name = _dist_name(ep)
    return name is not None and name.lower().replace("_", "-") == BUILTIN_DIST


class Registry(Generic[T]):
    """The plugins of one entry-point ``group``, by name.

    ``what`` names one plugin in messages ("detector", "watermark scheme"). ``check(name, obj)``
    validates a loaded object and returns what the registry stores (the object itself, or
    something built from it); it raises (any exception) to refuse it.
    """

    def __init__(
        self,
        group: str,
        what: str,
        check: Callable[[str, object], T] | None = None,
        has_builtins: bool = True,
    ):
        self.group = group
        self.has_builtins = has_builtins
        self.what = what
        self._check = check or (lambda name, obj: obj)  # type: ignore[return-value]
        self._items: dict[str, T] = {}
        self._builtin: set[str] = set()
        self._added: set[str] = set()  # names given by add(), kept across reload()
        self.errors: dict[str, str] = {}  # name -> why that plugin was not loaded
        self._loaded = False
        self._lock = threading.RLock()  # two threads' first lookups must not load a group twice
        self._loading: int | None = None  # the thread loading the entry points

    # ---- registration -----------------------------------------------------------------------

    def add(self, name: str, obj: object) -> T:
        """Register ``obj`` as ``name`` at run time; the same object twice is a no-op."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.what} needs a non-empty name, got {name!r}")
        with self._lock:
            item = self._check(name, obj)
            old = self._items.get(name)
            if old is not None and old is not item and old != item:
                raise ConfigError(
                    f"two {self.what}s named {name!r} (group {self.group!r}): "
                    f"{_describe(old)} and {_describe(item)}; rename one"
                )
            self._items[name] = item
            self._added.add(name)
            self.errors.pop(name, None)
            return item

    def remove(self, name: str) -> None:
        """Forget ``name`` (for code that :meth:`add`-ed something temporary)."""
        with self._lock:
            self._items.pop(name, None)
            self._added.discard(name)

    def reload(self) -> None:
        """Forget what entry points gave and read them again (after installing a plugin)."""
        with self._lock:
            self._loaded = False
            self.errors.clear()
            self._builtin.clear()
            self._items = {k: v for k, v in self._items.items() if k in self._added}
            self._load()

    # ---- lookup -----------------------------------------------------------------------------

    def all(self) -> dict[str, T]:
        """Every loaded plugin by name: built-ins first, then plugins, then run-time additions."""
        self._load()
        return dict(self._items)

    def names(self) -> list[str]:
        return list(self.all())

    def __contains__(self, name: object) -> bool:
        return name in self.all()

    def __iter__(self) -> Iterator[str]:
        return iter(self.all())

    def get(self, name: str) -> T:
        """The plugin called ``name``; a ConfigError naming the group and the known names if none."""
        self._load()  # a no-op once loaded: get() is on hot paths (a scheme per sampled row)
        items = self._items
        if name in items:
            return items[name]
        if name in self.errors:
            raise ConfigError(
                f"{self.what} {name!r} (entry-point group {self.group!r}) failed to load: "
                f"{self.errors[name]}; fix or uninstall the package that provides it"
            )
        raise ConfigError(
            f"unknown {self.what} {name!r}; known: {', '.join(sorted(items)) or '(none)'} "
            f"(entry-point group {self.group!r}; a plugin package adds one there)"
        )

    # ---- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded or self._loading == threading.get_ident():
            # The second case: a plugin's module, while it is being imported, asks this registry
            # (say, builds a WatermarkParams); it sees what is loaded so far instead of loading
            # everything again from inside its own import.
            return
        with self._lock:
            if self._loaded:
                return
            self._loading = threading.get_ident()
            try:
                self._load_all()
            finally:
                self._loading = None

    def _load_all(self) -> None:
        eps = list(entry_points(group=self.group))
        # Built-ins first, so a plugin reusing a built-in's name is the one refused.
        eps.sort(key=lambda ep: not _is_builtin(ep))
        if self.has_builtins and not any(_is_builtin(ep) for ep in eps):
            # An editable install keeps the metadata of its last `pip install`: a group added
            # to pyproject.toml since then is invisible until the package is installed again.
            raise ConfigError(
                f"no built-in {self.what}s found: the installed distillguard metadata has no "
                f"entry-point group {self.group!r}; reinstall it (pip install -e .)"
            )
        for ep in eps:
            self._load_one(ep)
        self._loaded = True

    def _load_one(self, ep: EntryPoint) -> None:
        builtin = _is_builtin(ep)
        source = _dist_name(ep) or "?"
        if ep.name in self._builtin and not builtin:
            self._fail(ep.name, f"{source}'s {ep.value} reuses the name of a built-in {self.what}")
            return
        try:
            obj = ep.load()
            item = self._check(ep.name, obj)
        except Exception as e:  # a broken plugin must not hide the others: report it, go on
            self._fail(ep.name, f"{source}'s {ep.value}: {type(e).__name__}: {e}")
            return
        old = self._items.get(ep.name)
        if old is not None and old is not item and old != item:
            self._fail(ep.name, f"{source}'s {ep.value} reuses the name of {_describe(old)}")
            return
        self._items[ep.name] = item
        if builtin:
            self._builtin.add(ep.name)

    def _fail(self, name: str, why: str) -> None:
        log.warning("%s plugin %r not loaded (group %s): %s", self.what, name, self.group, why)
        self.errors[name] = why


def _describe(obj: object) -> str:
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    return f"{mod}.{qual}" if mod and qual else repr(obj)
