"""Sources: enumerate work items lazily and deterministically (DESIGN.md section 2).

Every source yields `Item`s; `read_item` turns one into bytes on a decode worker.
"""

from scanner.sources.directory import iter_directory
from scanner.sources.item import MAX_ITEM_BYTES, Item, read_item
from scanner.sources.sniff import looks_like_image

__all__ = ["Item", "MAX_ITEM_BYTES", "iter_directory", "looks_like_image", "read_item"]
