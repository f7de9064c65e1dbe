"""One registry for everything a user picks by name: models, methods, datasets, attacks, export formats.

Every kind used to have its own pattern (a decorator, a dict of lambdas plus a regex, a plain dict, a
table of tuples), so adding a model or a format meant learning a new one, and users could not add
their own. A :class:`Registry` is a name -> entry mapping with the three things every kind needs: a
listing, the one-line unknown-name error (the CLI prints it and exits 2), and registration, as a
decorator or a call. Entries can also come from patterns (``wideresnet-<depth>-<widen>``), which are
listed by their template and resolved by a function of the name.
"""

from __future__ import annotations

import re
from typing import Callable, Generic, Iterator, TypeVar

from robustedge.errors import RobustEdgeError, unknown_name

T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Registry(Generic[T]):
    """Named entries of one ``kind`` (the word the error messages use: "model", "dataset", ...).

    ``loader`` (optional) is called once before the first lookup, for registries whose entries
    register themselves when their modules are imported (the training methods)."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None, *,
                 loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._patterns: dict[str, tuple[re.Pattern, Callable[[re.Match], T]]] = {}
        self._loader = loader
        for name, entry in (entries or {}).items():
            self.register(name, entry)

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """``registry.register("name", entry)``, or ``@registry.register("name")`` above a class or
        function. A name already taken is refused unless ``replace=True`` (a user's own model must
        not silently shadow a built-in one)."""
        self._load()  # the built-in entries first, so a clash with one is caught here
        if not isinstance(name, str) or not _NAME.match(name):
            raise RobustEdgeError(f"a {self.kind} name is letters, digits, '_', '-' or '.', got {name!r}")

        def add(obj: T) -> T:
            if not replace and (name in self._entries or self._pattern_for(name) is not None):
                raise RobustEdgeError(f"{self.kind} '{name}' is already registered (pass replace=True to replace it)")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def register_pattern(self, template: str, regex: str, factory: Callable[[re.Match], T]) -> None:
        """Names matching ``regex`` (listed as ``template``) resolve to ``factory(match)``."""
        self._patterns[template] = (re.compile(regex), factory)

    def _pattern_for(self, name: str) -> T | None:
        for regex, factory in self._patterns.values():
            match = regex.match(str(name))
            if match:
                return factory(match)
        return None

    def get(self, name: str) -> T:
        """The entry called ``name``, or the one-line error listing the valid names."""
        self._load()
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        found = self._pattern_for(name) if isinstance(name, str) else None
        if found is None:
            raise unknown_name(self.kind, str(name), self.names())
        return found

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and (name in self._entries or self._pattern_for(name) is not None)

    def names(self) -> list[str]:
        """Registered names in registration order, then the pattern templates."""
        self._load()
        return list(self._entries) + list(self._patterns)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
