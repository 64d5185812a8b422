"""The layering rules of the code base, checked over its import graph (run by tests/unit/test_layering.py).

``scan`` reads every module of cni/, node-agent/node_agent/ (generated protocol code excluded) and bench/
with ``ast`` and records, per dotted module name: what it imports (module-level, function-level and
TYPE_CHECKING imports; relative imports resolved; ``from p import m`` counts as importing ``p.m`` when that
is a module), which of those it imports eagerly (at module level, outside TYPE_CHECKING), its length, its
dynamic imports (``importlib.import_module`` / ``__import__``) and its ``__getattr__`` hooks.

Each contract is a pure function over one of those maps returning readable violations (empty: kept).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"cni": REPO / "cni", "node_agent": REPO / "node-agent" / "node_agent", "bench": REPO / "bench"}
GENERATED = ("node_agent.protocol.proto_gen",)
OURS = ("cni", "node_agent", "bench", "tests")
PRODUCT = ("cni", "node_agent")
MAX_LINES = 450

# Third-party modules cni/ may import, only inside a function (never at import time): PyYAML for YAML
# objects files and kubeconfigs.
CNI_LAZY_THIRD_PARTY = frozenset({"yaml"})

AGENT_SIDE = tuple(
    f"node_agent.{p}"
    for p in (
        "agent", "sources", "reconcile", "backends", "netns", "proxy", "protocol", "kernel", "serve", "repair",
        "install_cni",
    )
)  # fmt: skip
PROTOCOL_LAYER = ("cni.contract", "cni.netlink", "cni.kernel", "node_agent.protocol", "node_agent.kernel")

Graph = Mapping[str, Iterable[str]]


@dataclass
class Facts:
    imports: dict[str, set[str]] = field(default_factory=dict)
    eager: dict[str, set[str]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    dynamic: dict[str, list[str]] = field(default_factory=dict)  # "line N: import_module('x')"
    getattr_hooks: dict[str, list[str]] = field(default_factory=dict)  # "line N: module-level __getattr__"


def within(module: str, package: str | Iterable[str]) -> bool:
    packages = (package,) if isinstance(package, str) else tuple(package)
    return any(module == p or module.startswith(p + ".") for p in packages)


def is_ours(module: str) -> bool:
    return within(module, OURS)


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names or module == "__future__"


# ---------------------------------------------------------------------------------------------------
# the scan


def module_name(root_pkg: str, root: Path, path: Path) -> str:
    parts = [root_pkg, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.imports: set[str] = set()
        self.eager: set[str] = set()
        self.dynamic: list[str] = []
        self.hooks: list[str] = []
        self._depth = 0  # inside a function or a TYPE_CHECKING block

    def _add(self, target: str) -> None:
        self.imports.add(target)
        if self._depth == 0:
            self.eager.add(target)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            parent = ".".join(base + ([node.module] if node.module else []))
        else:
            parent = node.module or ""
        for alias in node.names:
            sub = f"{parent}.{alias.name}"
            self._add(sub if sub in self.known else parent)

    def _nested(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._check_hook(node)
        self._nested(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__getattr__":
                self.hooks.append(f"line {item.lineno}: class {node.name} defines __getattr__")
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._depth += 1
            for stmt in node.body:
                self.visit(stmt)
            self._depth -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def _check_hook(self, node: ast.FunctionDef) -> None:
        if node.name == "__getattr__" and self._depth == 0 and node.col_offset == 0:
            self.hooks.append(f"line {node.lineno}: module-level __getattr__")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args:
            target = _static_prefix(node.args[0])
            if target is None or is_ours(target) or target == "":
                shown = ast.unparse(node.args[0])
                self.dynamic.append(f"line {node.lineno}: {name}({shown})")
        self.generic_visit(node)


def _static_prefix(arg: ast.expr) -> str | None:
    """The module name an import_module argument starts with, as far as it is known without running it."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return None  # a variable: could be one of ours


def _files() -> Iterable[tuple[str, Path, Path]]:
    for pkg, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            yield pkg, root, path


def scan() -> Facts:
    files = [(module_name(pkg, root, path), path) for pkg, root, path in _files()]
    files = [(m, p) for m, p in files if not within(m, GENERATED)]
    known = {m for m, _ in files} | set(GENERATED)
    facts = Facts()
    for module, path in files:
        text = path.read_text(encoding="utf-8")
        visitor = _Visitor(module, path.name == "__init__.py", known)
        visitor.visit(ast.parse(text, str(path)))
        facts.imports[module] = visitor.imports
        facts.eager[module] = visitor.eager
        facts.lines[module] = len(text.splitlines())
        facts.dynamic[module] = visitor.dynamic
        facts.getattr_hooks[module] = visitor.hooks
    return facts


# ---------------------------------------------------------------------------------------------------
# the contracts: pure functions, each returning its violations


def _only(graph: Graph, layer: str | tuple[str, ...], allowed: tuple[str, ...], rule: str) -> list[str]:
    """Modules of ``layer`` import, of our own modules, only ``allowed`` ones."""
    return [
        f"{module} imports {target}: {rule}"
        for module, targets in sorted(graph.items())
        if within(module, layer)
        for target in sorted(targets)
        if is_ours(target) and not within(target, allowed)
    ]


def cni_is_stdlib_only(graph: Graph, eager: Graph) -> list[str]:
    """(a) cni.* imports only the standard library and cni.* (PyYAML only inside a function)."""
    out = []
    for module, targets in sorted(graph.items()):
        if not within(module, "cni"):
            continue
        for target in sorted(targets):
            if is_stdlib(target) or within(target, "cni"):
                continue
            if target.split(".")[0] in CNI_LAZY_THIRD_PARTY and target not in eager.get(module, ()):
                continue
            out.append(f"{module} imports {target}: cni may import only the standard library and cni")
    return out


def cni_layers(graph: Graph) -> list[str]:
    """(b) cni.contract -> nothing of ours but itself; cni.netlink (the netlink wire format) -> itself;
    cni.rules -> cni.contract, cni.netlink and itself (pure: never cni.kernel); cni.kernel -> those and
    itself; cni.plugin never node_agent."""
    return [
        *_only(graph, "cni.contract", ("cni.contract",), "cni.contract imports only cni.contract"),
        *_only(graph, "cni.netlink", ("cni.netlink",), "cni.netlink imports only cni.netlink"),
        *_only(graph, "cni.rules", ("cni.contract", "cni.netlink", "cni.rules"),
              "cni.rules imports only cni.contract/cni.netlink/cni.rules"),
        *_only(graph, "cni.kernel", ("cni.contract", "cni.netlink", "cni.rules", "cni.kernel"),
              "cni.kernel imports only cni.contract/cni.netlink/cni.rules/cni.kernel"),
        *[
            f"{module} imports {target}: cni.plugin never imports node_agent"
            for module, targets in sorted(graph.items())
            if within(module, "cni.plugin")
            for target in sorted(targets)
            if within(target, "node_agent")
        ],
    ]


def protocol_layer(graph: Graph) -> list[str]:
    """(c) node_agent.protocol and node_agent.kernel import only the protocol layer."""
    rule = "node_agent.protocol/kernel import only " + ", ".join(PROTOCOL_LAYER)
    return _only(graph, ("node_agent.protocol", "node_agent.kernel"), PROTOCOL_LAYER, rule)


def refproxy_layer(graph: Graph) -> list[str]:
    """(d) node_agent.refproxy imports only the protocol layer and itself."""
    allowed = (*PROTOCOL_LAYER, "node_agent.refproxy")
    return _only(graph, "node_agent.refproxy", allowed, "node_agent.refproxy imports only contract/protocol/kernel")


def product_boundaries(graph: Graph) -> list[str]:
    """(e) only node_agent.commands.lab (and the lab) import node_agent.lab; nothing imports tests;
    agent-side packages never import node_agent.commands or node_agent.refproxy."""
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if within(target, "tests"):
                out.append(f"{module} imports {target}: nothing imports tests")
            if (
                within(module, PRODUCT)
                and within(target, "node_agent.lab")
                and not within(module, ("node_agent.lab", "node_agent.commands.lab"))
            ):
                out.append(f"{module} imports {target}: only node_agent.commands.lab imports the lab")
            if within(module, AGENT_SIDE) and within(target, ("node_agent.commands", "node_agent.refproxy")):
                out.append(f"{module} imports {target}: agent-side packages never import commands or refproxy")
    return out


def bench_imports_no_tests(graph: Graph) -> list[str]:
    """(f) bench imports no tests."""
    return [
        f"{module} imports {target}: bench imports no tests"
        for module, targets in sorted(graph.items())
        if within(module, "bench")
        for target in sorted(targets)
        if within(target, "tests")
    ]


def module_size(lines: Mapping[str, int], limit: int = MAX_LINES) -> list[str]:
    """(g) no product module over ``limit`` lines."""
    return [
        f"{module} has {count} lines: a product module has at most {limit}"
        for module, count in sorted(lines.items())
        if within(module, PRODUCT) and count > limit
    ]


def no_lookup_by_name(dynamic: Mapping[str, list[str]], hooks: Mapping[str, list[str]]) -> list[str]:
    """(h) no import_module / __import__ of our own modules, no module-level or class __getattr__."""
    out = [
        f"{module} {where}: import our modules explicitly, not by name"
        for module, found in sorted(dynamic.items())
        if within(module, PRODUCT)
        for where in found
    ]
    out += [
        f"{module} {where}: declare the interface instead of forwarding attributes"
        for module, found in sorted(hooks.items())
        if within(module, PRODUCT)
        for where in found
    ]
    return out


def all_contracts(facts: Facts) -> dict[str, Callable[[], list[str]]]:
    return {
        "a: cni is stdlib only": lambda: cni_is_stdlib_only(facts.imports, facts.eager),
        "b: cni layers": lambda: cni_layers(facts.imports),
        "c: protocol layer": lambda: protocol_layer(facts.imports),
        "d: refproxy layer": lambda: refproxy_layer(facts.imports),
        "e: product boundaries": lambda: product_boundaries(facts.imports),
        "f: bench imports no tests": lambda: bench_imports_no_tests(facts.imports),
        "g: module size": lambda: module_size(facts.lines),
        "h: no lookup by name": lambda: no_lookup_by_name(facts.dynamic, facts.getattr_hooks),
    }
