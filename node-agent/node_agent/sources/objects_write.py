"""Objects-dir mode: write a pod's `ambient.istio.io/redirection` annotation back into its object file,
as the API server would store the agent's patch. The file is replaced atomically (same directory,
rename); JSON stays JSON, YAML stays YAML (comments are not kept)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from cni.contract.kube_objects import ObjectError, pod_from_object
from node_agent.install_cni.atomic import replace_file
from node_agent.sources.redirection_mark import ANNOTATION, ENABLED

SUFFIXES = (".json", ".yaml", ".yml")


def _is_pod(obj: Any, namespace: str, name: str) -> bool:
    if not isinstance(obj, dict) or obj.get("kind") != "Pod":
        return False
    try:
        pod = pod_from_object(obj)
    except ObjectError:
        return False
    return (pod.namespace, pod.name) == (namespace, name)


def _set(obj: dict[str, Any], enabled: bool) -> bool:
    """Set or remove the annotation in obj; True when obj changed."""
    meta = obj.setdefault("metadata", {})
    notes = meta.get("annotations") or {}
    if enabled == (notes.get(ANNOTATION) == ENABLED) and (enabled or ANNOTATION not in notes):
        return False
    if enabled:
        notes[ANNOTATION] = ENABLED
    else:
        notes.pop(ANNOTATION, None)
    meta["annotations"] = notes
    return True


def _patch_docs(docs: list[Any], namespace: str, name: str, enabled: bool) -> tuple[bool, bool]:
    """(found, changed) over the documents of one file (objects, or `kind: *List` with items)."""
    found = changed = False
    for doc in docs:
        is_list = isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List")
        objs = (doc.get("items") or []) if is_list else [doc]
        for obj in objs:
            if _is_pod(obj, namespace, name):
                found = True
                changed = _set(obj, enabled) or changed
    return found, changed


TMP_SUFFIX = ".headrace-tmp"


def _write_atomic(path: Path, text: str) -> None:
    """Replace the file by renaming a hidden sibling over it (hidden files are not read as objects)."""
    replace_file(str(path), text.encode("utf-8"), str(path.parent / f".{path.name}{TMP_SUFFIX}"),
                 path.stat().st_mode & 0o777)


def sweep_unfinished(directory: Path) -> list[str]:
    """Remove the hidden siblings an agent killed mid-write left (`.<file>.headrace-tmp`: that write did not
    happen, the object file is the one before); the names removed. Run at start, before any write."""
    removed: list[str] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed  # the source reports a missing or unreadable directory itself
    for path in entries:
        if not (path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)):
            continue
        try:
            if stat.S_ISDIR(path.lstat().st_mode):
                continue  # not one of ours (a symlink of that name is removed: a write would follow it)
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path.name)
    return sorted(removed)


def _patch_file(path: Path, namespace: str, name: str, enabled: bool) -> bool:
    """Set or remove the annotation if this file holds the pod; False when it does not."""
    text = path.read_text(encoding="utf-8")
    if name not in text:
        return False
    if path.suffix == ".json":
        docs = [json.loads(text)]
    else:
        import yaml  # lazy: only YAML files need it

        docs = list(yaml.safe_load_all(text))
    found, changed = _patch_docs(docs, namespace, name, enabled)
    if not found:
        return False
    if changed:
        if path.suffix == ".json":
            _write_atomic(path, json.dumps(docs[0], indent=2) + "\n")
        else:
            import yaml

            _write_atomic(path, yaml.safe_dump_all(docs, sort_keys=False))
    return True


def _candidate(path: Path) -> bool:
    return path.suffix in SUFFIXES and not path.name.startswith(".") and path.is_file()


def write_pod_annotation(directory: Path, namespace: str, name: str, enabled: bool, hint: str | None = None) -> bool:
    """Set (enabled) or remove the annotation on pod namespace/name in its object file; False when no
    file holds that pod (it is gone: nothing to do). `hint`: the file the source last saw it in, tried
    first (else, or when it no longer holds the pod, every file is read until one does)."""
    hinted = directory / hint if hint is not None and "/" not in hint else None
    if hinted is not None and _candidate(hinted) and _patch_file(hinted, namespace, name, enabled):
        return True
    for path in sorted(directory.iterdir()):
        if path != hinted and _candidate(path) and _patch_file(path, namespace, name, enabled):
            return True
    return False
