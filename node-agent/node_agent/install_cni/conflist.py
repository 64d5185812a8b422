"""Pure logic on CNI network configuration files: pick the primary one, convert, insert/remove our entry.

Everything here works on file names and parsed JSON; nothing touches the filesystem.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

PLUGIN_TYPE = "headrace-cni"
CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")
#: Files we own in the config dir (kubeconfig, temp files) are never picked as the primary config.
OWN_FILE_PREFIXES = (".headrace-", "headrace-")

JsonObject = dict[str, Any]


class ConfigError(Exception):
    """A CNI config file we must not touch (unparseable, commented, wrong shape)."""

    def __init__(self, filename: str, message: str) -> None:
        super().__init__(f"{filename}: {message}")
        self.filename = filename
        self.message = message


def is_candidate(name: str) -> bool:
    """Whether libcni would consider `name` at all (by extension), minus our own files."""
    if name.startswith(OWN_FILE_PREFIXES):
        return False
    return name.endswith(CONFIG_EXTENSIONS)


def candidates(names: Iterable[str]) -> list[str]:
    """Config file names in the order runtimes try them: lexically sorted, filtered by extension."""
    return sorted(n for n in names if is_candidate(n))


def is_conflist_name(name: str) -> bool:
    return name.endswith(".conflist")


_COMMENT_RE = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.DOTALL)


def _strip_comments(text: str) -> str:
    return _COMMENT_RE.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)


def parse_config(filename: str, text: str) -> JsonObject:
    """Parse one config file; refuse comments, bad JSON and non-object documents with a clear error."""
    try:
        doc = json.loads(text)
    except RecursionError as exc:
        raise ConfigError(filename, "invalid JSON: nested too deep") from exc
    except json.JSONDecodeError as exc:
        stripped = _strip_comments(text)
        if stripped != text:
            try:
                json.loads(stripped)
            except (ValueError, RecursionError):
                pass
            else:
                raise ConfigError(
                    filename, "contains comments, which JSON (and libcni) does not allow; fix the file"
                ) from exc
        raise ConfigError(filename, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise ConfigError(filename, f"invalid JSON: {str(exc)[:200]}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(filename, f"expected a JSON object, found {type(doc).__name__}")
    return doc


def config_problem(filename: str, doc: Mapping[str, Any]) -> str:
    """Why libcni would not load `doc` from a file named `filename`; "" when it would.

    The kind follows the extension, as in libcni's callers (containerd's go-cni, CRI-O's ocicni):
    `.conflist` is read with ConfListFromFile (a string `name`, a non-empty `plugins` list of objects
    with a `type` each), `.conf` and `.json` with ConfFromFile (a single plugin: a `type`). A `.conf`
    holding a `plugins` list and no `type` is no conflist to them: go-cni refuses it, CRI-O skips it.
    """
    if is_conflist_name(filename):
        return _conflist_problem(doc)
    if _is_type(doc.get("type")):
        return ""
    if "plugins" in doc:
        return "holds a 'plugins' list but is not a .conflist: runtimes read it as a single plugin without 'type'"
    return "no 'type': not a network config"


def _is_type(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _conflist_problem(doc: Mapping[str, Any]) -> str:
    if not isinstance(doc.get("name"), str):
        return "a .conflist without a string 'name'"
    if "cniVersion" in doc and not isinstance(doc["cniVersion"], str):
        return "'cniVersion' is not a string"
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        return "a .conflist without a non-empty 'plugins' list"
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not _is_type(plugin.get("type")):
            return f"plugin {i} of 'plugins' is not an object with a 'type'"
    return ""


def config_kind(filename: str, doc: Mapping[str, Any]) -> str | None:
    """'conflist', 'conf' or None when libcni would not load the file (see `config_problem`)."""
    if config_problem(filename, doc):
        return None
    return "conflist" if is_conflist_name(filename) else "conf"


def to_conflist(conf: Mapping[str, Any]) -> JsonObject:
    """A single-plugin .conf as the equivalent conflist (as libcni's ConfListFromConf builds it)."""
    out: JsonObject = {}
    if "cniVersion" in conf:
        out["cniVersion"] = conf["cniVersion"]
    out["name"] = conf.get("name", "")
    out["plugins"] = [copy.deepcopy(dict(conf))]
    return out


def conflist_name_for(conf_name: str) -> str:
    """`10-bridge.conf` -> `10-bridge.conflist` (same sort position for every runtime)."""
    for ext in (".conf", ".json"):
        if conf_name.endswith(ext):
            return conf_name[: -len(ext)] + ".conflist"
    return conf_name + ".conflist"


def is_our_entry(plugin: Mapping[str, Any]) -> bool:
    return plugin.get("type") == PLUGIN_TYPE


def has_our_entry(conflist: Mapping[str, Any]) -> bool:
    plugins = conflist.get("plugins", [])
    return isinstance(plugins, list) and any(isinstance(p, dict) and is_our_entry(p) for p in plugins)


def upsert_entry(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> JsonObject:
    """A copy of `conflist` with exactly one `entry` at the end of its chain; everything else kept.

    An existing headrace entry anywhere in the chain is replaced (moved to the end) and duplicates
    dropped. The input is not modified.
    """
    if entry.get("type") != PLUGIN_TYPE:
        raise ValueError(f"entry type must be {PLUGIN_TYPE!r}")
    out = copy.deepcopy(dict(conflist))
    plugins = [p for p in out.get("plugins", []) if not is_our_entry(p)]
    plugins.append(copy.deepcopy(dict(entry)))
    out["plugins"] = plugins
    return out


def remove_entry(conflist: Mapping[str, Any]) -> JsonObject:
    """A copy of `conflist` without any headrace entry; everything else kept."""
    out = copy.deepcopy(dict(conflist))
    out["plugins"] = [p for p in out.get("plugins", []) if not is_our_entry(p)]
    return out


def version_warning(conflist: Mapping[str, Any], supported: Iterable[str]) -> str | None:
    """A warning when the runtime will call our plugin with a cniVersion it does not support."""
    version = conflist.get("cniVersion")
    supported = tuple(supported)
    if version not in supported:
        return (
            f"cniVersion {version!r} of this conflist is not supported by headrace-cni "
            f"({', '.join(supported)}): the runtime passes it to every plugin of the chain, and headrace-cni "
            "would refuse every pod ADD"
        )
    return None


def render(doc: Mapping[str, Any]) -> bytes:
    """Canonical bytes we write: 2-space indented JSON, key order kept, trailing newline."""
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
