"""The layering rules (tests/unit/layering.py) hold for the code base, and each rule catches what it should."""

from __future__ import annotations

import ast
from collections.abc import Callable

import pytest

from tests.unit import layering as L

FACTS = L.scan()


@pytest.mark.parametrize("name", list(L.all_contracts(FACTS)))
def test_the_code_base_keeps_the_contract(name: str) -> None:
    violations = L.all_contracts(FACTS)[name]()
    assert not violations, "\n".join(violations)


def test_the_scan_sees_the_whole_code_base() -> None:
    assert {"cni.plugin.entry", "node_agent.cli", "node_agent.lab.simnode", "bench.agent_enrol"} <= set(FACTS.imports)
    assert not any(L.within(m, "node_agent.protocol.proto_gen") for m in FACTS.imports)
    assert "cni.contract.kube_objects" in FACTS.imports["cni.plugin.pod_source"]


# ---------------------------------------------------------------------------------------------------
# the scanner


def visit(source: str, module: str = "pkg.sub.mod", is_package: bool = False) -> L._Visitor:
    known = {"pkg.sub.sibling", "pkg.sub", "pkg.other", "pkg.other.deep"}
    visitor = L._Visitor(module, is_package, known)
    visitor.visit(ast.parse(source))
    return visitor


def test_scanner_resolves_relative_imports_and_submodules() -> None:
    v = visit("from . import sibling\nfrom ..other import deep, name\nfrom .sibling import thing\n")
    assert v.imports == {"pkg.sub.sibling", "pkg.other.deep", "pkg.other"}
    assert visit("from . import sibling\n", module="pkg.sub", is_package=True).imports == {"pkg.sub.sibling"}


def test_scanner_counts_function_level_and_type_checking_imports_as_not_eager() -> None:
    v = visit(
        "import os\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import typing_only\n"
        "def f():\n    import lazy\n"
        "class C:\n    def m(self):\n        from pkg import late\n"
    )
    assert v.imports == {"os", "typing", "typing_only", "lazy", "pkg"}
    assert v.eager == {"os", "typing"}


def test_scanner_finds_lookups_by_name() -> None:
    v = visit(
        "import importlib\n"
        "importlib.import_module(f'node_agent.commands.{x}')\n"
        "__import__('cni.plugin')\n"
        "importlib.import_module(name)\n"
        "importlib.import_module('json')\n"
        "def __getattr__(name): ...\n"
        "class P:\n    def __getattr__(self, name): ...\n"
    )
    assert v.dynamic == [
        "line 2: import_module(f'node_agent.commands.{x}')",
        "line 3: __import__('cni.plugin')",
        "line 4: import_module(name)",
    ]
    assert v.hooks == ["line 6: module-level __getattr__", "line 8: class P defines __getattr__"]


# ---------------------------------------------------------------------------------------------------
# each contract against a graph that breaks it


def test_a_cni_imports_only_the_standard_library() -> None:
    graph = {"cni.plugin.x": {"os", "grpc", "yaml", "cni.contract.spec"}, "cni.plugin.y": {"yaml"}}
    eager = {"cni.plugin.x": {"os"}, "cni.plugin.y": {"yaml"}}
    assert L.cni_is_stdlib_only(graph, eager) == [
        "cni.plugin.x imports grpc: cni may import only the standard library and cni",
        "cni.plugin.y imports yaml: cni may import only the standard library and cni",
    ]


def test_b_cni_layers() -> None:
    graph = {
        "cni.contract.a": {"cni.rules.builder", "cni.contract.b"},
        "cni.rules.builder": {"cni.kernel.tables"},
        "cni.kernel.tables": {"cni.plugin.entry", "cni.contract.errors"},
        "cni.plugin.entry": {"node_agent.lab", "cni.kernel.spawn"},
        "cni.netlink.nft_messages": {"cni.netlink.netlink_parse", "cni.rules.nft_text"},
    }
    assert L.cni_layers(graph) == [
        "cni.contract.a imports cni.rules.builder: cni.contract imports only cni.contract",
        "cni.netlink.nft_messages imports cni.rules.nft_text: cni.netlink imports only cni.netlink",
        "cni.rules.builder imports cni.kernel.tables: cni.rules imports only cni.contract/cni.netlink/cni.rules",
        "cni.kernel.tables imports cni.plugin.entry: "
        "cni.kernel imports only cni.contract/cni.netlink/cni.rules/cni.kernel",
        "cni.plugin.entry imports node_agent.lab: cni.plugin never imports node_agent",
    ]


def test_c_protocol_layer() -> None:
    graph = {
        "node_agent.protocol.convert": {"grpc", "node_agent.protocol.workload", "node_agent.proxy.hub"},
        "node_agent.kernel.policy_routes_read": {"cni.kernel.spawn", "cni.plugin.log"},
    }
    rule = (
        "node_agent.protocol/kernel import only cni.contract, cni.netlink, cni.kernel, node_agent.protocol, "
        "node_agent.kernel"
    )
    assert L.protocol_layer(graph) == [
        f"node_agent.kernel.policy_routes_read imports cni.plugin.log: {rule}",
        f"node_agent.protocol.convert imports node_agent.proxy.hub: {rule}",
    ]


def test_d_refproxy_layer() -> None:
    graph = {"node_agent.refproxy.agent_session": {"node_agent.protocol.convert", "node_agent.proxy.hub", "grpc"}}
    assert L.refproxy_layer(graph) == [
        "node_agent.refproxy.agent_session imports node_agent.proxy.hub: "
        "node_agent.refproxy imports only contract/protocol/kernel"
    ]


def test_e_product_boundaries() -> None:
    graph = {
        "node_agent.commands.lab": {"node_agent.lab.scenario"},
        "node_agent.lab.scenario": {"node_agent.lab.simnode"},
        "node_agent.agent.daemon": {"node_agent.lab.netns", "node_agent.commands.agent", "node_agent.refproxy.main"},
        "cni.plugin.entry": {"tests.unit.agent_fakes"},
        "bench.agent_enrol": {"node_agent.lab.agent_run"},
    }
    assert L.product_boundaries(graph) == [
        "cni.plugin.entry imports tests.unit.agent_fakes: nothing imports tests",
        "node_agent.agent.daemon imports node_agent.commands.agent: "
        "agent-side packages never import commands or refproxy",
        "node_agent.agent.daemon imports node_agent.lab.netns: only node_agent.commands.lab imports the lab",
        "node_agent.agent.daemon imports node_agent.refproxy.main: "
        "agent-side packages never import commands or refproxy",
    ]


def test_f_bench_imports_no_tests() -> None:
    graph = {"bench.agent_enrol": {"tests.kernel.agent_kit", "node_agent.lab.agent_run"}}
    assert L.bench_imports_no_tests(graph) == [
        "bench.agent_enrol imports tests.kernel.agent_kit: bench imports no tests"
    ]


def test_g_module_size() -> None:
    lines = {"node_agent.reconcile.loop": 978, "cni.plugin.entry": 450, "bench.redirect_overhead": 507}
    assert L.module_size(lines) == ["node_agent.reconcile.loop has 978 lines: a product module has at most 450"]


def test_h_no_lookup_by_name() -> None:
    dynamic = {"node_agent.cli": ["line 34: import_module(f'node_agent.commands.{module}')"], "bench.x": ["line 1: x"]}
    hooks = {"node_agent.backends.select": ["line 9: module-level __getattr__"]}
    assert L.no_lookup_by_name(dynamic, hooks) == [
        "node_agent.cli line 34: import_module(f'node_agent.commands.{module}'): import our modules explicitly, "
        "not by name",
        "node_agent.backends.select line 9: module-level __getattr__: declare the interface instead of forwarding "
        "attributes",
    ]


CONTRACT_TESTS: list[Callable[[], None]] = [
    test_a_cni_imports_only_the_standard_library,
    test_b_cni_layers,
    test_c_protocol_layer,
    test_d_refproxy_layer,
    test_e_product_boundaries,
    test_f_bench_imports_no_tests,
    test_g_module_size,
    test_h_no_lookup_by_name,
]


def test_every_contract_has_its_own_test() -> None:
    assert len(CONTRACT_TESTS) == len(L.all_contracts(L.Facts()))
