"""The dataclass allow-list: which dataclasses may travel on the wire, and under what name.

A dataclass is encoded as its registered name plus its init fields, and decoded by looking the
name up here and calling ``cls(**fields)``; a name that is not registered is a DecodeError, so
bytes can never make the decoder build a class it was not told about. Registering is a dict
plus a decorator (CONVENTIONS.md rule 4): ``@register_dataclass("phase_result")``. The codec
reads ``_BY_NAME`` and ``_BY_CLASS`` directly; they are only ever mutated in place.
"""

from __future__ import annotations

import dataclasses

__all__ = ["register_dataclass", "registered_dataclasses", "unregister_dataclass"]


@dataclasses.dataclass(frozen=True)
class _Registered:
    cls: type
    name: str
    fields: tuple[str, ...]  # init fields, in declaration order
    required: frozenset[str]  # init fields without a default


_BY_NAME: dict[str, _Registered] = {}
_BY_CLASS: dict[type, _Registered] = {}


def register_dataclass(cls_or_name: type | str | None = None, /, *, name: str | None = None):
    """Allow a dataclass on the wire under ``name``.

    Use as ``@register_dataclass("phase_result")`` or ``register_dataclass(cls, name=...)``.
    Its init fields are encoded by name; decoding calls ``cls(**fields)``.

    Returns:
        The class (so it works as a decorator), or a decorator.
    Raises:
        TypeError: ``cls`` is not a dataclass or no name was given.
        ValueError: the name is taken by another class, or the class has another name.
    """
    if isinstance(cls_or_name, str):
        if name is not None:
            raise TypeError("register_dataclass: give the name once")
        return lambda cls: _register(cls, cls_or_name)
    if cls_or_name is None:
        if name is None:
            raise TypeError("register_dataclass needs a name: @register_dataclass('name')")
        return lambda cls: _register(cls, name)
    if name is None:
        raise TypeError(f"register_dataclass({cls_or_name!r}) needs name=...")
    return _register(cls_or_name, name)


def _register(cls: type, name: str) -> type:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_dataclass: {cls!r} is not a dataclass")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise TypeError(f"register_dataclass: name must be a non-empty str of <= 200 chars, got {name!r}")
    old = _BY_NAME.get(name)
    if old is not None and old.cls is cls:
        return cls
    if old is not None:
        raise ValueError(f"dataclass name {name!r} is already registered to {old.cls.__qualname__}; "
                         f"registered names: {sorted(_BY_NAME)}")
    if cls in _BY_CLASS:
        raise ValueError(f"{cls.__qualname__} is already registered as {_BY_CLASS[cls].name!r}")
    init = [f for f in dataclasses.fields(cls) if f.init]
    required = frozenset(f.name for f in init if f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
    entry = _Registered(cls, name, tuple(f.name for f in init), required)
    _BY_NAME[name] = entry
    _BY_CLASS[cls] = entry
    return cls


def unregister_dataclass(name: str) -> None:
    """Remove a registration (for tests and plugins). Raises KeyError listing valid names."""
    entry = _BY_NAME.pop(name, None)
    if entry is None:
        raise KeyError(f"no dataclass registered as {name!r}; registered names: {sorted(_BY_NAME)}")
    del _BY_CLASS[entry.cls]


def registered_dataclasses() -> dict[str, type]:
    """Return a snapshot of the registry: name -> class."""
    return {n: e.cls for n, e in _BY_NAME.items()}

