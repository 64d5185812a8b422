"""Install the plugin so it runs on a host without Python (kind nodes, minimal node OSes).

Layout, all under the install dir (default /opt/headrace), written through `host_root` (where the
host's / is mounted in this process; "/" when running on the host itself):

    runtime-<fingerprint>/bin/python3.11           copy of the running interpreter's binary
    runtime-<fingerprint>/lib/python3.11/...       the stdlib (minus tests, GUI, dev files)
    runtime-<fingerprint>/lib/python3.11/lib-dynload/  extension modules
    runtime-<fingerprint>/shlib/*.so*              shared libs those extension modules need beyond
                                                   the interpreter's own (libffi, libssl, ...)
    runtime-<fingerprint>/app/cni, app/yaml        the plugin package (and pure-Python PyYAML)
    runtime-<fingerprint>/bin/headrace-cni-front   the compiled front (static), when this image has it,
    runtime-<fingerprint>/bin/python3              and the name it runs the interpreter by

and `<cni bin dir>/headrace-cni`, a launcher script. Its `#!` line names the compiled front and the agent
socket (`#!<runtime>/bin/headrace-cni-front <agent socket>`): the front relays an ADD to the agent
without starting an interpreter and runs the script with `bin/python3 -IS` for everything else
(`cni/front/front.c`). Without a front (a build without a C compiler) the `#!` line runs the bundled
interpreter with `-I -S` itself (isolated: no PYTHON* env, no site, no user dirs), which then relays.
The kernel handles `#!`, so no shell is needed either. The interpreter finds its stdlib from its own
location. Extension-module dependencies are loaded from `shlib/` by path before the module imports them.
The host must provide only what the interpreter binary itself links (glibc's loader, libc, libm, libz,
libexpat): see docs/deploy.md.
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cni.plugin.launch import DEFAULT_AGENT_SOCKET
from node_agent.install_cni.atomic import read_bytes, remove_file, write_atomic

PLUGIN_BINARY = "headrace-cni"
FRONT_BINARY = "headrace-cni-front"
#: The interpreter's name next to the front in the runtime's bin/ (INTERPRETER in cni/front/front.c).
FRONT_INTERPRETER = "python3"
#: off: lay the interpreter's launcher even when this build has the front (a switch for operators).
FRONT_ENV = "HEADRACE_CNI_FRONT"
FRONT_SWITCH = {"on": True, "1": True, "true": True, "yes": True, "off": False, "0": False, "false": False,
                "no": False}
LAUNCHER_MARKER = "# headrace-cni launcher, written by `headrace install-cni`"
RUNTIME_PREFIX = "runtime-"
FORMAT_VERSION = "2"
COMPLETE_MARK = ".complete"
#: Linux reads at most this many bytes of a `#!` line (BINPRM_BUF_SIZE).
MAX_SHEBANG = 255

EXCLUDED_STDLIB = frozenset(
    {
        "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
        "venv", "site-packages", "dist-packages", "curses", "dbm", "sqlite3", "__phello__",
        "turtle.py", "antigravity.py", "this.py", "EXTERNALLY-MANAGED",
    }
)
EXCLUDED_DYNLOAD = re.compile(
    r"^(_test|_ctypes_test|_curses|_dbm|_gdbm|_sqlite3|nis|readline|_tkinter|xxlimited|audioop|"
    r"ossaudiodev|_xxtestfuzz|_xxsubinterpreters|xxsubtype)"
)
#: Provided by the host's C library together with the loader; never bundled.
GLIBC_CORE = frozenset(
    {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1", "libresolv.so.2"}
)


class RuntimeInstallError(Exception):
    pass


@dataclass(frozen=True)
class RuntimeSource:
    """Where the runtime is copied from: the interpreter running this code."""

    executable: str
    version: str  # "3.11"
    stdlib: str
    dynload: str
    packages: tuple[str, ...]  # package directories copied into app/
    front: str = ""  # the compiled front's binary ("" when this build has none)

    @classmethod
    def current(cls) -> RuntimeSource:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        exe = os.path.realpath(sys.executable)
        paths = sysconfig.get_paths()
        stdlib = paths["stdlib"]
        dynload = os.path.join(paths["platstdlib"], "lib-dynload")
        if not os.path.isdir(dynload):
            dynload = os.path.join(stdlib, "lib-dynload")
        packages = [_package_dir("cni")]
        yaml_dir = _package_dir("yaml", required=False)
        if yaml_dir:
            packages.append(yaml_dir)
        return cls(exe, version, stdlib, dynload, tuple(packages), front_binary())


@dataclass(frozen=True)
class PluginInstall:
    launcher: str  # host path
    runtime: str  # host path
    changed: bool
    front: str = ""  # host path of the compiled front the launcher names ("": the interpreter relays)


def _package_dir(name: str, required: bool = True) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        if required:
            raise RuntimeInstallError(f"package {name!r} not found in this interpreter")
        return ""
    return str(next(iter(spec.submodule_search_locations)))


def front_binary(environ: Mapping[str, str] | None = None) -> str:
    """The compiled front built beside the `cni` package (`make front`; the image's build stage), or ""
    (none built, or FRONT_ENV turned off: install-cni then lays the interpreter's launcher)."""
    value = (os.environ if environ is None else environ).get(FRONT_ENV, "on").strip().lower()
    if value not in FRONT_SWITCH:
        raise RuntimeInstallError(f"{FRONT_ENV} must be on or off, not {value!r}")
    path = os.path.join(_package_dir("cni"), "front", FRONT_BINARY)
    return path if FRONT_SWITCH[value] and os.access(path, os.X_OK) else ""


def under_root(host_root: str, path: str) -> str:
    """`path` (as the host sees it) as this process sees it."""
    if not path.startswith("/"):
        raise RuntimeInstallError(f"expected an absolute path, not {path!r}")
    return os.path.join(host_root, path.lstrip("/")) if host_root not in ("", "/") else path


def _package_files(pkg_dir: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(pkg_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and d != "tests")
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def fingerprint(source: RuntimeSource) -> str:
    h = hashlib.sha256()
    st = os.stat(source.executable)
    h.update(f"{FORMAT_VERSION}\0{sys.version}\0{source.executable}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for pkg in source.packages:
        for f in _package_files(pkg):
            h.update(os.path.relpath(f, os.path.dirname(pkg)).encode() + b"\0")
            h.update(read_bytes(f) or b"")
    if source.front:
        h.update(b"front\0" + (read_bytes(source.front) or b""))
    return h.hexdigest()[:12]


_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_LOADER = re.compile(r"^\s*(/\S*ld-linux\S*)\s+\(0x[0-9a-f]+\)\s*$")


def ldd(path: str) -> dict[str, str]:
    """soname -> resolved path of every shared library `path` needs (transitively), via ldd."""
    try:
        proc = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise RuntimeInstallError("ldd not found: needed to collect the runtime's shared libraries") from exc
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        m = _LDD_LINE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        loader = _LDD_LOADER.match(line)
        if loader:
            out[os.path.basename(loader.group(1))] = loader.group(1)
    return out


def host_libraries(executable: str) -> dict[str, str]:
    """What the host must provide: the interpreter binary's own libraries and its loader."""
    return ldd(executable)


def _ignore_stdlib(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in EXCLUDED_STDLIB or n.startswith("config-") or n == "lib-dynload"}


def _copy_stdlib(source: RuntimeSource, dest_lib: str) -> None:
    shutil.copytree(source.stdlib, dest_lib, ignore=_ignore_stdlib, symlinks=False)


def _copy_dynload(source: RuntimeSource, dest: str) -> list[str]:
    os.makedirs(dest, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(source.dynload)):
        if not name.endswith(".so") or EXCLUDED_DYNLOAD.match(name):
            continue
        shutil.copy2(os.path.join(source.dynload, name), os.path.join(dest, name))
        copied.append(name)
    return copied


def _copy_package(pkg_dir: str, dest_app: str) -> None:
    name = os.path.basename(pkg_dir.rstrip("/"))
    for f in _package_files(pkg_dir):
        rel = os.path.relpath(f, pkg_dir)
        target = os.path.join(dest_app, name, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(f, target)


def _bundle_libraries(
    extensions: Iterable[str], dynload_dir: str, skip: Iterable[str], shlib_dir: str, host_shlib: str
) -> dict[str, list[str]]:
    """Copy what each extension module needs beyond `skip`; return module -> preload list (host paths)."""
    skip_set = set(skip) | GLIBC_CORE
    closures: dict[str, dict[str, str]] = {}
    preload: dict[str, list[str]] = {}
    os.makedirs(shlib_dir, exist_ok=True)
    for ext in extensions:
        needed = {
            k: v
            for k, v in ldd(os.path.join(dynload_dir, ext)).items()
            if k not in skip_set and not k.startswith("ld-linux")
        }
        if not needed:
            continue
        for soname, path in needed.items():
            if soname not in closures:
                closures[soname] = {k: v for k, v in ldd(path).items() if k not in skip_set}
                closures[soname].pop(soname, None)
                shutil.copy2(path, os.path.join(shlib_dir, soname))
        # A library's transitive closure is larger than each of its dependencies': load smaller first.
        order = sorted(needed, key=lambda s: (len(closures[s]), s))
        module = ext.split(".", 1)[0]
        preload[module] = [os.path.join(host_shlib, s) for s in order]
    return preload


_LAUNCHER = '''{shebang}
{marker}; `headrace uninstall-cni` removes it.
# Runs the plugin on the self-contained runtime {runtime} (nothing of the host's Python is used).{front_note}
import sys

_PRELOAD = {preload!r}


class _Preload:
    """Load an extension module's bundled shared libraries (by path) before the module itself."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        libs = _PRELOAD.pop(name, None)
        if libs:
            from importlib.machinery import ExtensionFileLoader, ModuleSpec

            for lib in libs:
                try:
                    ExtensionFileLoader("_headrace_lib", lib).create_module(
                        ModuleSpec("_headrace_lib", None, origin=lib)
                    )
                except ImportError:
                    pass  # expected: a plain library has no PyInit_; it stays loaded by soname
        return None


sys.meta_path.insert(0, _Preload)
sys.path[:0] = [{app!r}]
from cni.plugin.launch import run_executable

run_executable({agent_socket!r})
'''


_FRONT_NOTE = """
# The #! line's program relays an ADD to the agent at the socket it names; it runs this file with the
# runtime's bin/python3 -IS for every other command and for an ADD the agent did not run."""


def render_launcher(python: str, runtime: str, app: str, preload: dict[str, list[str]],
                    agent_socket: str = DEFAULT_AGENT_SOCKET, front: str = "") -> bytes:
    """The launcher's text; `agent_socket` is where it relays an ADD first (the one the configuration
    names, which the agent checks); `front`: the compiled front's path, which the `#!` line then names."""
    if any(c.isspace() for c in python) or any(c.isspace() for c in front):
        raise RuntimeInstallError(f"install dir path has spaces, not allowed in a #! line: {front or python!r}")
    if front and any(c.isspace() or not c.isprintable() for c in agent_socket):
        raise RuntimeInstallError(f"agent socket path has spaces, not allowed in a #! line: {agent_socket!r}")
    shebang = f"#!{front} {agent_socket}" if front else f"#!{python} -IS"
    if len(shebang) > MAX_SHEBANG:
        raise RuntimeInstallError(f"install dir or agent socket path too long for a #! line: {shebang!r}")
    text = _LAUNCHER.format(
        shebang=shebang, marker=LAUNCHER_MARKER, runtime=runtime, app=app, preload=dict(sorted(preload.items())),
        agent_socket=agent_socket, front_note=_FRONT_NOTE if front else "",
    )
    return text.encode("utf-8")


def install_plugin(
    bin_dir: str, install_dir: str, host_root: str = "/", source: RuntimeSource | None = None,
    agent_socket: str = DEFAULT_AGENT_SOCKET,
) -> PluginInstall:
    """Install (or keep) the runtime and the launcher. Nothing is written when both are current."""
    source = source or RuntimeSource.current()
    fp = fingerprint(source)
    runtime_host = os.path.join(install_dir, RUNTIME_PREFIX + fp)
    runtime_w = under_root(host_root, runtime_host)
    python_name = f"python{source.version}"
    python_host = os.path.join(runtime_host, "bin", python_name)
    app_host = os.path.join(runtime_host, "app")
    changed = False
    preload_file = os.path.join(runtime_w, "preload.json")
    executables = launcher_programs(os.path.join(runtime_w, "bin", FRONT_BINARY if source.front else python_name))
    complete = os.path.exists(os.path.join(runtime_w, COMPLETE_MARK)) and all(map(os.path.exists, executables))
    if not complete:  # never built, cut short, or what the launcher runs was removed since
        _build_runtime(source, runtime_w, runtime_host, python_name)
        changed = True
    preload = json.loads(read_bytes(preload_file) or b"{}")
    launcher_w = os.path.join(under_root(host_root, bin_dir), PLUGIN_BINARY)
    os.makedirs(os.path.dirname(launcher_w), exist_ok=True)
    front_host = os.path.join(runtime_host, "bin", FRONT_BINARY) if source.front else ""
    data = render_launcher(python_host, runtime_host, app_host, preload, agent_socket, front_host)
    previous = launcher_runtime(launcher_w, install_dir)  # what a plugin started a moment ago runs
    changed = write_atomic(launcher_w, data, mode=0o755) or changed
    keep = {RUNTIME_PREFIX + fp, previous} if previous != RUNTIME_PREFIX + fp else None
    changed = _remove_other_runtimes(under_root(host_root, install_dir), keep) or changed
    return PluginInstall(os.path.join(bin_dir, PLUGIN_BINARY), runtime_host, changed, front_host)


def _build_runtime(source: RuntimeSource, runtime_w: str, runtime_host: str, python_name: str) -> None:
    parent = os.path.dirname(runtime_w)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".runtime-build-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "bin"))
        shutil.copy2(source.executable, os.path.join(tmp, "bin", python_name))
        if source.front:
            shutil.copy2(source.front, os.path.join(tmp, "bin", FRONT_BINARY))
            os.symlink(python_name, os.path.join(tmp, "bin", FRONT_INTERPRETER))
        lib = os.path.join(tmp, "lib", python_name)
        _copy_stdlib(source, lib)
        dynload = os.path.join(lib, "lib-dynload")
        exts = _copy_dynload(source, dynload)
        skip = host_libraries(source.executable)
        preload = _bundle_libraries(
            exts, dynload, skip, os.path.join(tmp, "shlib"), os.path.join(runtime_host, "shlib")
        )
        app = os.path.join(tmp, "app")
        for pkg in source.packages:
            _copy_package(pkg, app)
        compileall.compile_dir(app, quiet=2, ddir=os.path.join(runtime_host, "app"))
        write_atomic(os.path.join(tmp, "preload.json"), json.dumps(preload, sort_keys=True).encode())
        write_atomic(
            os.path.join(tmp, "host-libraries.json"), json.dumps(skip, indent=1, sort_keys=True).encode()
        )
        write_atomic(os.path.join(tmp, COMPLETE_MARK), b"")
        os.chmod(tmp, 0o755)  # noqa: S103 - the runtime must be readable and executable by all
        if os.path.exists(runtime_w):
            shutil.rmtree(runtime_w)
        os.rename(tmp, runtime_w)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_other_runtimes(install_dir_w: str, keep: set[str] | None) -> bool:
    """Remove unfinished builds and, with `keep` (the launcher just moved to another runtime), the runtimes
    not in it. The one the launcher named before stays in `keep`: a plugin started from it just before the
    switch still imports modules from it. It goes at the next switch, so current + previous remain."""
    removed = False
    try:
        names = os.listdir(install_dir_w)
    except FileNotFoundError:
        return False
    for name in names:
        old_runtime = keep is not None and name.startswith(RUNTIME_PREFIX) and name not in keep
        if old_runtime or name.startswith(".runtime-build-"):
            shutil.rmtree(os.path.join(install_dir_w, name), ignore_errors=True)
            removed = True
    return removed


def is_our_launcher(path: str) -> bool:
    head = (read_bytes(path) or b"")[:1024]
    return head.startswith(b"#!") and LAUNCHER_MARKER.encode() in head


def launcher_programs(program: str) -> list[str]:
    """What a launcher whose `#!` line names `program` runs: that program and, for the compiled front, the
    interpreter beside it (the link to the runtime's interpreter binary)."""
    if os.path.basename(program) == FRONT_BINARY:
        return [program, os.path.join(os.path.dirname(program), FRONT_INTERPRETER)]
    return [program]


def _shebang_program(path: str) -> str:
    """The program the `#!` line of the file at `path` names ("" when none)."""
    first = (read_bytes(path) or b"").split(b"\n", 1)[0]
    words = first[2:].decode("utf-8", "replace").split()
    return words[0] if first.startswith(b"#!") and words else ""


def launcher_runtime(path: str, install_dir: str) -> str:
    """The runtime (its directory's name) our launcher at `path` runs, "" when not ours or none under
    `install_dir` (a host path)."""
    runtime = os.path.dirname(os.path.dirname(_shebang_program(path))) if is_our_launcher(path) else ""
    name = os.path.basename(runtime)
    in_dir = os.path.dirname(runtime) == os.path.normpath(install_dir)
    return name if in_dir and name.startswith(RUNTIME_PREFIX) else ""


def launcher_problem(path: str, host_root: str = "/") -> str:
    """What stops our launcher at `path` (as this process sees it) from running: its `#!` program (host
    path) missing or not executable, or, for the compiled front, the interpreter beside it; "" when none."""
    if not (named := _shebang_program(path)):
        return f"{path} has no #! line"
    for program in launcher_programs(named):
        if not os.access(under_root(host_root, program), os.X_OK):
            return f"the launcher's {os.path.basename(program)} ({program}) is missing or not executable"
    return ""


def uninstall_plugin(bin_dir: str, install_dir: str, host_root: str = "/") -> list[str]:
    """Remove our launcher (only if it is ours) and every runtime; return what was removed (host paths)."""
    removed = []
    launcher_w = os.path.join(under_root(host_root, bin_dir), PLUGIN_BINARY)
    if is_our_launcher(launcher_w) and remove_file(launcher_w):
        removed.append(os.path.join(bin_dir, PLUGIN_BINARY))
    install_w = under_root(host_root, install_dir)
    try:
        names = os.listdir(install_w)
    except FileNotFoundError:
        names = []
    for name in names:
        if name.startswith((RUNTIME_PREFIX, ".runtime-build-")):
            shutil.rmtree(os.path.join(install_w, name), ignore_errors=True)
            removed.append(os.path.join(install_dir, name))
    return removed
