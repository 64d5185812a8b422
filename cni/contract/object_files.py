"""Reading Kubernetes object files (JSON or YAML) within limits: the objects dir of the plugin and of the
agent is input, and one hostile file must cost neither of them more than a bounded amount of time and
memory.

- `MAX_FILE_BYTES`: a file larger than this is refused unread (the API server's own object limit is
  about 1.5 MiB).
- `MAX_NODES`: a YAML file may hold at most this many nodes *counted with every alias expanded* (an alias
  counts as the whole node it names). A "billion laughs" document — a few lines of anchors and aliases
  that expand to 10^9 nodes — is refused while it is composed, before anything is built from it.
  Recursive aliases (a node that contains itself) are refused too.
- JSON nested too deep for the parser is refused like any other invalid JSON.

`ObjectFileError` names the file and the limit. PyYAML is imported only when a YAML file is read (the
plugin's JSON path never pays for it); the loader is PyYAML's pure-Python SafeLoader with the counting
added to its composer.
"""

from __future__ import annotations

from cni.contract import jsoncodec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_NODES = 200_000


class ObjectFileError(ValueError):
    """An object file is too big, nested too deep, expands too far, or is not valid JSON/YAML."""


def read_text(path: str, max_bytes: int | None = None) -> str:
    """The UTF-8 text of `path`, refused (ObjectFileError) when it is larger than `max_bytes` (default
    MAX_FILE_BYTES). OSError and UnicodeDecodeError pass through."""
    if max_bytes is None:
        max_bytes = MAX_FILE_BYTES
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ObjectFileError(f"{path}: larger than {max_bytes} bytes; refused unread")
    return data.decode("utf-8")


def load_json(text: str, origin: str) -> Any:
    try:
        return jsoncodec.loads(text)
    except RecursionError as exc:
        raise ObjectFileError(f"{origin}: invalid JSON: nested too deep") from exc
    except ValueError as exc:
        raise ObjectFileError(f"{origin}: invalid JSON: {str(exc)[:200]}") from exc


def load_yaml_all(text: str, origin: str, max_nodes: int = MAX_NODES) -> list[Any]:
    """Every document of a YAML text, within the node limit (ObjectFileError naming `origin`)."""
    import yaml  # lazy: only YAML files need it

    loader = _loader_class()(text)
    loader.max_nodes = max_nodes
    docs: list[Any] = []
    try:
        while loader.check_data():
            docs.append(loader.get_data())
    except _LimitExceeded as exc:
        raise ObjectFileError(f"{origin}: {exc}") from exc
    except RecursionError as exc:
        raise ObjectFileError(f"{origin}: invalid YAML: nested too deep") from exc
    except yaml.YAMLError as exc:
        raise ObjectFileError(f"{origin}: invalid YAML: {str(exc)[:200]}") from exc
    finally:
        loader.dispose()
    return docs


def load_yaml(text: str, origin: str, max_nodes: int = MAX_NODES) -> Any:
    """The single document of a YAML text (None when empty), within the node limit."""
    docs = load_yaml_all(text, origin, max_nodes)
    if len(docs) > 1:
        raise ObjectFileError(f"{origin}: expected one YAML document, found {len(docs)}")
    return docs[0] if docs else None


class _LimitExceeded(Exception):
    pass


_LOADER: Any = None


def _loader_class() -> Any:
    """PyYAML's SafeLoader whose composer counts nodes with aliases expanded (built once, on first use)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        max_nodes = MAX_NODES

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.expanded = 0  # nodes so far in this file, aliases counted as what they name
            self.sizes: dict[int, int] = {}  # id(node) -> its expanded size, once composed

        def compose_document(self) -> Any:
            self.sizes = {}
            return super().compose_document()

        def _count(self, n: int) -> None:
            self.expanded += n
            if self.expanded > self.max_nodes:
                raise _LimitExceeded(
                    f"more than {self.max_nodes} YAML nodes with aliases expanded (an alias bomb?); refused"
                )

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                target = self.anchors.get(self.peek_event().anchor)  # type: ignore[no-untyped-call]
                if target is not None:  # an undefined alias is PyYAML's own error
                    size = self.sizes.get(id(target))
                    if size is None:
                        raise _LimitExceeded("recursive YAML alias (a node that contains itself); refused")
                    self._count(size)
                return super().compose_node(parent, index)
            before = self.expanded
            self._count(1)
            node = super().compose_node(parent, index)
            self.sizes[id(node)] = self.expanded - before
            return node

    _LOADER = BoundedSafeLoader
    return _LOADER
