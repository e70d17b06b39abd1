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


# libyaml's composer, about nine times as fast as PyYAML's own (with the checks below, a values file of 200
# keys takes 7 ms of the event loop instead of 39); PyYAML built without libyaml keeps its own.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# What libyaml says of a document nested past its own bound (1,000 levels), before any node is made.
_LIBYAML_TOO_DEEP = "exceeded maximum nesting depth"


def _too_deep(limits: Limits) -> TooBig:
    return TooBig("TOO_DEEP", f"must nest at most {limits.custom_values_yaml_max_depth} levels deep")


def _expanded_nodes(root: yaml.Node, limits: Limits) -> int | None:
    """Nodes of the document with every alias expanded (counted until past the limit); None when an
    alias refers to a node that holds it. Its nesting and its alias uses are checked on the way, in
    document order: a node met again is an alias (`*name`) of an anchored one, a use at its own depth.
    """
    limit = limits.custom_values_yaml_max_nodes
    sizes: dict[int, int] = {}
    # The nodes being walked: the path from the root to the current one.
    walking: set[int] = set()
    aliases = 0
    # (node, depth, None) to walk; (node, depth, its children) to add up once they are walked.
    stack: list[tuple[yaml.Node, int, list[yaml.Node] | None]] = [(root, 1, None)]
    while stack:
        node, depth, walked = stack.pop()
        key = id(node)
        if walked is not None:
            walking.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(child)] for child in walked))
            continue
        again = key in sizes or key in walking
        if again:
            aliases += 1
            if aliases > limits.custom_values_yaml_max_aliases:
                raise TooBig("TOO_LONG", f"must use at most {limits.custom_values_yaml_max_aliases} aliases (*name)")
        if depth > limits.custom_values_yaml_max_depth:
            raise _too_deep(limits)
        if key in walking:
            return None
        if again:
            continue
        children = _children(node)
        if not children:
            sizes[key] = 1
            continue
        walking.add(key)
        stack.append((node, depth, children))
        stack.extend((child, depth + 1, None) for child in reversed(children))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load(text: str, limits: Limits) -> Any:
    """yaml.safe_load with bounded depth, aliases and expanded size; raises TooBig or a YAMLError.

    The document is composed into nodes (an alias is the node it names, not a copy), checked, and only
    then built: an alias bomb is refused before it expands.
    """
    loader = _LOADER(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            if exc.problem == _LIBYAML_TOO_DEEP:
                raise _too_deep(limits) from None
            raise
        except RecursionError:
            # PyYAML's own composer recurses once per level.
            raise _too_deep(limits) from None
        if node is None:
            return None
        maximum = limits.custom_values_yaml_max_nodes
        expanded = _expanded_nodes(node, limits)
        if expanded is None:
            raise TooBig("INVALID_FORMAT", "must not contain an alias that refers to itself (a cycle)")
        if expanded > maximum:
            raise TooBig("TOO_LONG", f"must hold at most {maximum} values once its aliases are expanded (alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()
