"""Apply the pure conflist logic to a CNI config directory: install, uninstall, check.

Every write is atomic (`atomic.write_atomic`); a run that finds everything in place writes nothing.
A `.conf` primary is converted to a `.conflist`; the original bytes are kept in a small state file so
uninstall can put back exactly what was there. `host_root` is where the host's / is mounted in this
process: symlinks in the config dir are followed as the host follows them (`hostpath`).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from node_agent.install_cni import conflist as cl
from node_agent.install_cni import hostpath
from node_agent.install_cni.atomic import read_bytes, remove_file, write_atomic


@dataclass(frozen=True)
class PrimaryConfig:
    name: str
    path: str
    doc: cl.JsonObject
    kind: str  # "conflist" | "conf"
    mode: int
    real: str  # the file `path` names, its links followed as on the host: what is read and written
    #: "name: reason" of each candidate before it that libcni would not load (see `scan`)
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigChange:
    """What one install/uninstall step did. action: unchanged, inserted, updated, converted, removed,
    restored, no-config."""

    action: str
    path: str | None = None
    converted_from: str | None = None
    skipped: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.action not in ("unchanged", "no-config")

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "path": self.path, "converted_from": self.converted_from,
                "skipped": list(self.skipped)}


class _Loaded(NamedTuple):
    doc: cl.JsonObject
    mode: int
    real: str


def _real(path: str, host_root: str) -> str:
    """The file `path` names on the host (as this process sees it); ConfigError naming `path` when it is a
    link that does not lead to a file here (a dangling link, or a target whose directory is not mounted)."""
    try:
        real = hostpath.resolve(path, host_root)
    except hostpath.LinkError as exc:
        raise cl.ConfigError(path, f"cannot follow its symlink: {exc}") from exc
    if os.path.islink(path) and not os.path.lexists(real):
        hint = "" if host_root in ("", "/") else (
            f" (not on the host, or its directory is not mounted under {host_root} in this container)")
        raise cl.ConfigError(path, f"a symlink to {hostpath.host_view(real, host_root)}, which is not there{hint}")
    return real


def _load(conf_dir: str, name: str, host_root: str = "/") -> _Loaded | None:
    path = os.path.join(conf_dir, name)
    real = _real(path, host_root)
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        return None  # removed since the directory was listed
    if not stat.S_ISREG(st.st_mode):
        return None
    raw = read_bytes(real)
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise cl.ConfigError(path, f"not UTF-8 text: {exc}") from exc
    return _Loaded(cl.parse_config(path, text), st.st_mode & 0o7777, real)


def list_names(conf_dir: str) -> list[str]:
    try:
        return cl.candidates(os.listdir(conf_dir))
    except FileNotFoundError:
        return []


def scan(conf_dir: str, host_root: str = "/") -> tuple[PrimaryConfig | None, tuple[str, ...]]:
    """The config a runtime would use and the candidates before it that it would not load.

    The first candidate (lexically) that libcni loads is the one CRI-O uses; containerd refuses the
    whole directory when its first candidate does not load, so no pod gets any chain there and the
    file we chain into does not matter. A candidate of the wrong shape (`conflist.config_problem`) is
    therefore skipped, as CRI-O does. A candidate that cannot be parsed at all raises `ConfigError`
    naming the file: it may be a file another writer has not finished, and we never guess past it. So
    does a symlink that does not lead to a file here: the runtime may well load what it names.
    """
    skipped: list[str] = []
    for name in list_names(conf_dir):
        loaded = _load(conf_dir, name, host_root)
        if loaded is None:
            continue
        kind = cl.config_kind(name, loaded.doc)
        if kind is None:
            skipped.append(f"{name}: {cl.config_problem(name, loaded.doc)}")
            continue
        path = os.path.join(conf_dir, name)
        primary = PrimaryConfig(name, path, loaded.doc, kind, loaded.mode, loaded.real, tuple(skipped))
        return primary, tuple(skipped)
    return None, tuple(skipped)


def find_primary(conf_dir: str, host_root: str = "/") -> PrimaryConfig | None:
    """The config a runtime would use (see `scan`)."""
    return scan(conf_dir, host_root)[0]


def _read_state(state_path: str | None) -> dict[str, Any]:
    if not state_path:
        return {}
    raw = read_bytes(state_path)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_state(state_path: str | None, state: Mapping[str, Any]) -> None:
    if not state_path:
        return
    if not state:
        remove_file(state_path)
        return
    os.makedirs(os.path.dirname(state_path), exist_ok=True)
    write_atomic(state_path, cl.render(state), mode=0o600)


def install_config(
    conf_dir: str,
    entry: Mapping[str, Any],
    state_path: str | None = None,
    supported_versions: Iterable[str] | None = None,
    host_root: str = "/",
) -> ConfigChange:
    """Make sure the primary config ends with exactly `entry`. Nothing written when already so.

    With `supported_versions`, a config whose cniVersion the plugin does not support is refused
    (ConfigError, nothing written): the runtime would call the plugin with that version and every pod
    ADD on the node would fail, including the agent's own.
    """
    primary, skipped = scan(conf_dir, host_root)
    if primary is None:
        return ConfigChange("no-config", skipped=skipped)
    state = _read_state(state_path)
    primary = _rewritten_json(conf_dir, primary, state, host_root) or primary
    if supported_versions is not None:
        warning = cl.version_warning(primary.doc, supported_versions)
        if warning:
            raise cl.ConfigError(primary.path, warning + "; not chaining headrace-cni into it")
    if primary.kind == "conflist":
        return _upsert(primary, entry)
    return _convert(conf_dir, primary, entry, state, state_path, host_root)


def _upsert(primary: PrimaryConfig, entry: Mapping[str, Any]) -> ConfigChange:
    new = cl.upsert_entry(primary.doc, entry)
    if new == primary.doc:
        return ConfigChange("unchanged", primary.path, skipped=primary.skipped)
    action = "updated" if cl.has_our_entry(primary.doc) else "inserted"
    # through a symlink to its target: the link (someone's layout) stays as it is
    write_atomic(primary.real, cl.render(new), mode=primary.mode)
    return ConfigChange(action, primary.path, skipped=primary.skipped)


def _converted(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state's record of our conversion: {"conflist", "conf", "mode", "original"}, or {}."""
    converted = state.get("converted")
    return converted if isinstance(converted, dict) else {}


def _made_by_us(state: Mapping[str, Any], conflist_name: str, conf_name: str) -> bool:
    converted = _converted(state)
    return converted.get("conflist") == conflist_name and converted.get("conf") == conf_name


def _rewritten_json(
    conf_dir: str, primary: PrimaryConfig, state: Mapping[str, Any], host_root: str
) -> PrimaryConfig | None:
    """The `.json` we converted into the primary conflist, there again: its owner wrote it anew. It sorts
    after our conflist, so the runtime keeps using our conversion of the old one until it is converted
    again. (A `.conf` written anew sorts before our conflist: it is the primary itself.)"""
    name = str(_converted(state).get("conf", ""))
    if primary.kind != "conflist" or not name.endswith(".json") or not _made_by_us(state, primary.name, name):
        return None
    try:
        loaded = _load(conf_dir, name, host_root)
    except cl.ConfigError:
        return None  # the runtime keeps using our conflist: nothing to convert
    if loaded is None or cl.config_kind(name, loaded.doc) != "conf":
        return None
    return PrimaryConfig(name, os.path.join(conf_dir, name), loaded.doc, "conf", loaded.mode, loaded.real,
                         primary.skipped)


def _convert(
    conf_dir: str, primary: PrimaryConfig, entry: Mapping[str, Any], state: dict[str, Any],
    state_path: str | None, host_root: str,
) -> ConfigChange:
    """Replace a `.conf` primary by the equivalent `.conflist` with `entry`. The `.conflist` of that name
    is overwritten only when the state says we made it from this `.conf` (its owner wrote the `.conf`
    again since: Multus, OVN-Kubernetes, older Cilium do on every restart); anyone else's is an error."""
    new_name = cl.conflist_name_for(primary.name)
    new_path = os.path.join(conf_dir, new_name)
    new = cl.upsert_entry(cl.to_conflist(primary.doc), entry)
    changed = ConfigChange("converted", new_path, converted_from=primary.path, skipped=primary.skipped)
    if os.path.lexists(new_path) and not _made_by_us(state, new_name, primary.name):
        existing = _load(conf_dir, new_name, host_root)
        if existing is None or existing.doc != new:
            raise cl.ConfigError(
                primary.path, f"cannot convert to a conflist: {new_path} already exists and was not made by "
                "install-cni from this file"
            )
        # an earlier conversion wrote the conflist and stopped before removing the .conf: finish it
        remove_file(primary.path)
        return changed
    original = read_bytes(primary.real)
    if original is not None:  # what uninstall puts back: the .conf as its owner last wrote it
        state["converted"] = {
            "conflist": new_name,
            "conf": primary.name,
            "mode": primary.mode,
            "original": original.decode("utf-8"),
        }
        _write_state(state_path, state)
    # The new file is in place (fsynced) before the old one goes: a runtime always finds a config.
    write_atomic(new_path, cl.render(new), mode=primary.mode)
    remove_file(primary.path)
    return changed


def uninstall_config(conf_dir: str, state_path: str | None = None, host_root: str = "/") -> list[ConfigChange]:
    """Remove our entry from every config file that has it; restore a .conf we converted. The record of
    the conversion goes either way: a conflist left behind (changed by others since) is no longer ours,
    and a later install must not overwrite it."""
    changes: list[ConfigChange] = []
    state = _read_state(state_path)
    converted = _converted(state)
    for name in list_names(conf_dir):
        path = os.path.join(conf_dir, name)
        try:
            loaded = _load(conf_dir, name, host_root)
        except cl.ConfigError:
            continue  # not ours to judge on the way out
        if loaded is None:
            continue
        doc = loaded.doc
        if "plugins" not in doc or not isinstance(doc["plugins"], list) or not cl.has_our_entry(doc):
            continue
        new = cl.remove_entry(doc)
        if converted and converted.get("conflist") == name and _matches_original(converted, new):
            conf_path = os.path.join(conf_dir, str(converted["conf"]))
            write_atomic(conf_path, str(converted["original"]).encode("utf-8"), mode=int(converted["mode"]))
            remove_file(path)
            changes.append(ConfigChange("restored", conf_path, converted_from=path))
            continue
        write_atomic(loaded.real, cl.render(new), mode=loaded.mode)
        changes.append(ConfigChange("removed", path))
    state.pop("converted", None)
    _write_state(state_path, state)
    return changes


def _matches_original(converted: Mapping[str, Any], conflist_doc: Mapping[str, Any]) -> bool:
    try:
        original = cl.parse_config(str(converted["conf"]), str(converted["original"]))
    except (cl.ConfigError, KeyError):
        return False
    return cl.to_conflist(original) == dict(conflist_doc)


def entry_present(conf_dir: str, entry: Mapping[str, Any] | None = None, host_root: str = "/") -> bool:
    """Whether the primary config is a conflist ending with our entry (equal to `entry` when given)."""
    try:
        primary = find_primary(conf_dir, host_root)
    except cl.ConfigError:
        return False
    if primary is None or primary.kind != "conflist":
        return False
    plugins = primary.doc.get("plugins", [])
    if not plugins or not cl.is_our_entry(plugins[-1]):
        return False
    return entry is None or plugins[-1] == dict(entry)
