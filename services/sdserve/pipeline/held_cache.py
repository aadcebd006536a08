"""A bounded cache of loaded weights by name (LoRA adapters, ControlNets), least recently used
out first, that never evicts what a live request holds.

A request holds what it uses from the moment it is prepared until its job object is gone
(`hold_while_alive`: finished, cancelled, expired or failed, the engine drops the job and the
release runs when the object goes). An item evicted meanwhile would be loaded again by the
next request naming it, a second copy beside the one still in use.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_in_use: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
"""How many live requests hold each loaded item (`hold_while_alive`)."""
_in_use_lock = threading.Lock()


def hold_while_alive(owner: object, items: Iterable[object]) -> None:
    """Marks `items` in use for as long as `owner` (a request's job) exists."""
    items = list(items)
    if not items:
        return
    with _in_use_lock:
        for item in items:
            _in_use[item] = _in_use.get(item, 0) + 1
    weakref.finalize(owner, _release, items)


def _release(items: list[object]) -> None:
    with _in_use_lock:
        for item in items:
            count = _in_use.get(item, 0) - 1
            if count > 0:
                _in_use[item] = count
            else:
                _in_use.pop(item, None)


def in_use(item: object) -> bool:
    """Whether a live request holds the item (`hold_while_alive`)."""
    with _in_use_lock:
        return item in _in_use


class HeldCache(Generic[T]):
    """Loaded items by name, least recently used first out, within `max_bytes`.

    `get` loads on a miss and then evicts the least recently used items that no live request
    holds until the cache is within its bound again; held items stay even above it, until a
    later `get` finds them free. Thread-safe.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[T], int], kind: str):
        self.max_bytes = int(max_bytes)
        self._size_of = size_of
        self._kind = kind
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, name: str, loader: Callable[[], T]) -> T:
        """The item `name`, loaded with `loader()` unless cached; now the most recent.

        Raises:
            ValueError: the loaded item alone is over `max_bytes` (it is not cached).
        """
        with self._lock:
            item = self._items.get(name)
            if item is not None:
                self._items.move_to_end(name)
                return item
            item = loader()
            size = self._size_of(item)
            if size > self.max_bytes:
                raise ValueError(f"{self._kind} {name!r} takes {size} bytes, more than the "
                                 f"cache's bound of {self.max_bytes}")  # fmt: skip
            self._items[name] = item
            self._evict(keep=name)
            return item

    def _evict(self, keep: str) -> None:
        for name, item in list(self._items.items()):
            if self.nbytes <= self.max_bytes:
                return
            if name != keep and not in_use(item):
                del self._items[name]
                logger.info("%s cache: evicted %s", self._kind, name)

    @property
    def nbytes(self) -> int:
        """The bytes the cached items take."""
        with self._lock:
            return sum(map(self._size_of, self._items.values()))

    def names(self) -> list[str]:
        """Cached items, least recently used first."""
        with self._lock:
            return list(self._items)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
