"""vagrant/: what can be checked without a hypervisor."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent.parent
VAGRANT = ROOT / "vagrant"


def vagrantfile() -> str:
    return (VAGRANT / "Vagrantfile").read_text()


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed: syntax not checked")
def test_vagrantfile_ruby_syntax():
    proc = subprocess.run(["ruby", "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_vagrantfile_structure_without_ruby():
    text = vagrantfile()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    opens = len(re.findall(r"\bdo\b(\s*\|[^|]*\|)?\s*$", code, re.MULTILINE))
    ends = len(re.findall(r"^\s*end\s*$", code, re.MULTILINE))
    assert opens == ends and opens >= 1
    assert code.count('"') % 2 == 0
    assert 'Vagrant.configure("2")' in code
    assert re.search(r'config\.vm\.box\s*=\s*"debian/bookworm64"', code)  # Debian 12


def provision_inline(name: str) -> str:
    pattern = r'config\.vm\.provision\s+"' + re.escape(name) + r'".*?inline:\s*"([^"]*)"'
    m = re.search(pattern, vagrantfile(), re.DOTALL)
    assert m, f"no inline provisioner {name!r}"
    return m.group(1)


def test_provisioning_uses_the_same_setup_as_make_test():
    assert "bash scripts/setup.sh" in provision_inline("setup")
    assert "make test" in provision_inline("test")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:\s*setup\b", makefile, re.MULTILINE), "make test must depend on setup"
    setup_recipe = re.search(r"^setup:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert setup_recipe and "scripts/setup.sh" in setup_recipe.group(1)
    assert (ROOT / "scripts" / "setup.sh").is_file()
    # the Vagrantfile's inline commands run from the synced repository root
    assert re.search(r'REPO_IN_VM\s*=\s*"/headrace"', vagrantfile())
    assert 'synced_folder "..", REPO_IN_VM' in vagrantfile()


def test_kind_provisioner_is_optional_and_uses_kind_up():
    assert "bash vagrant/kind-up.sh" in provision_inline("kind")
    assert re.search(r'provision\s+"kind".*run:\s*"never"', vagrantfile(), re.DOTALL)


def test_kind_config_parses_and_keeps_kindnet():
    cfg = yaml.safe_load((VAGRANT / "kind-config.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cfg.get("networking", {}).get("disableDefaultCNI", False) is False
    roles = [n["role"] for n in cfg["nodes"]]
    assert roles.count("control-plane") == 1 and "worker" in roles


def test_kind_up_script():
    script = VAGRANT / "kind-up.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "vagrant/kind-config.yaml" in text and "kubectl apply -k deploy" in text
    assert "-f deploy/Containerfile" in text
    kustomization = yaml.safe_load((ROOT / "deploy" / "kustomization.yaml").read_text())
    image = kustomization["images"][0]
    assert f'IMAGE="{image["name"]}:{image["newTag"]}"' in text


def test_readme_has_the_commands():
    readme = (VAGRANT / "README.md").read_text()
    for cmd in ("vagrant up", "vagrant provision --provision-with kind", "vagrant destroy"):
        assert cmd in readme


# Loads the Vagrantfile with a stand-in for Vagrant's config object that records every call; prints JSON.
RUBY_RECORDER = r"""
require "json"
class Rec
  def initialize(path, log) @path = path; @log = log end
  def method_missing(name, *args, **kw, &blk)
    n = name.to_s
    if n.end_with?("=")
      @log << {"call" => @path + [n.chomp("=")], "args" => args}
      return nil
    end
    @log << {"call" => @path + [n], "args" => args, "kw" => kw.transform_keys(&:to_s)} unless args.empty? && kw.empty?
    child = Rec.new(@path + [n], @log)
    blk.call(child) if blk
    child
  end
  def respond_to_missing?(*) true end
end
module Vagrant
  LOG = []
  def self.configure(version) yield Rec.new(["config"], LOG) end
end
load ARGV[0]
puts JSON.generate(Vagrant::LOG)
"""


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed: Vagrantfile not evaluated")
def test_vagrantfile_evaluates_with_expected_provisioners():
    import json

    proc = subprocess.run(["ruby", "-e", RUBY_RECORDER, str(VAGRANT / "Vagrantfile")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    calls = json.loads(proc.stdout)
    box = [c["args"] for c in calls if c["call"] == ["config", "vm", "box"]]
    assert box == [["debian/bookworm64"]]
    provs = {c["args"][0]: c["kw"] for c in calls if c["call"] == ["config", "vm", "provision"]}
    assert list(provs) == ["setup", "test", "kind"]
    assert provs["setup"]["inline"].endswith("cd /headrace && bash scripts/setup.sh")
    assert provs["test"]["inline"].endswith("cd /headrace && make test")
    assert provs["kind"]["run"] == "never"
    assert all(p["privileged"] is True for p in provs.values())
    synced = [c for c in calls if c["call"] == ["config", "vm", "synced_folder"]]
    assert synced[0]["args"] == ["..", "/headrace"] and synced[0]["kw"]["type"] == "rsync"
