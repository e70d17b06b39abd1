"""YAML read with bounded depth, aliases and expanded size, so a small document cannot become a huge one."""

from __future__ import annotations

from typing import Any

import yaml

from apphosting.settings import Limits

__all__ = ["TooBig", "load"]


class TooBig(yaml.YAMLError):
    """The document exceeds one of the bounds; `reason` is the violation's machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and many aliases while composing, before anything is built."""

    def __init__(self, stream: str, limits: Limits) -> None:
        super().__init__(stream)
        self._limits = limits
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self._limits.custom_values_yaml_max_aliases:
                raise TooBig(
                    "TOO_LONG", f"must use at most {self._limits.custom_values_yaml_max_aliases} aliases (*name)"
                )
        self._depth += 1
        try:
            if self._depth > self._limits.custom_values_yaml_max_depth:
                raise TooBig("TOO_DEEP", f"must nest at most {self._limits.custom_values_yaml_max_depth} levels deep")
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self._depth -= 1


def _expanded_nodes(root: yaml.Node, limit: int) -> int | None:
    """Nodes of the document with every alias expanded (stops past `limit`); None when an alias recurses."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(child)] for child in children))
            continue
        if key in sizes:
            continue
        if key in on_path:
            return None
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                return None
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load(text: str, limits: Limits) -> Any:
    """yaml.safe_load with bounded depth, aliases and expanded size; raises TooBig or a YAMLError."""
    loader = _BoundedLoader(text, limits)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        maximum = limits.custom_values_yaml_max_nodes
        expanded = _expanded_nodes(node, maximum)
        if expanded is None:
            raise TooBig("INVALID_FORMAT", "must not contain an alias that refers to itself (a cycle)")
        if expanded > maximum:
            raise TooBig("TOO_LONG", f"must hold at most {maximum} values once its aliases are expanded (alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()
