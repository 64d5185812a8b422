"""`headrace lab run|up|status|down`: the local kernel lab (see node_agent.lab.scenario)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

DEFAULT_DIR = "/var/run/headrace-lab"


def _require_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the lab creates network namespaces: run it as root")


@click.group()
def lab() -> None:
    """Run or manage the local kernel lab (a simulated node in its own netns; nothing in the host netns)."""


@lab.command("run")
@click.option("--dir", "lab_dir", default=DEFAULT_DIR, show_default=True, type=click.Path(path_type=Path))
def run_cmd(lab_dir: Path) -> None:
    """Build the lab, walk through enrol / sidecar / unenrol with real traffic, tear it all down."""
    from node_agent.lab import scenario

    _require_root()
    the_lab = scenario.create(lab_dir)
    runner = scenario.Runner(total=9)
    ok = False
    try:
        scenario.run_scenario(the_lab, runner)
        ok = True
    except scenario.StepFailed:
        ok = False
    finally:
        names = [the_lab.node.netns.name] + [p.netns.name for p in the_lab.node.pods.values()]

        def teardown() -> str:
            the_lab.teardown()
            left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
            still = [n for n in names if n in left]
            if still:
                raise scenario.StepFailed(f"netns left behind: {still}")
            return f"removed {len(names)} netns, the bridge, the processes and {lab_dir}"

        try:
            runner.step("tear down, leaving the machine as it was", teardown)
        except scenario.StepFailed:
            ok = False
        runner.summary()
    if not ok or not all(r.ok for r in runner.results):
        sys.exit(1)


@lab.command("up")
@click.option("--dir", "lab_dir", default=DEFAULT_DIR, show_default=True, type=click.Path(path_type=Path))
def up_cmd(lab_dir: Path) -> None:
    """Build the lab and leave it running (agent, proxy, pods) to poke at."""
    from node_agent.lab import scenario

    _require_root()
    the_lab = scenario.create(lab_dir)
    runner = scenario.Runner(total=2)
    try:
        scenario.bring_up(the_lab, runner)
    except scenario.StepFailed:
        the_lab.teardown()
        sys.exit(1)
    click.echo(f"\nlab is up in {lab_dir}. Try:")
    click.echo(f"  headrace status --cni-socket {the_lab.cni_socket}")
    click.echo(f"  label namespace shop ambient: edit {the_lab.node.objects_dir}/namespace-shop.json")
    for key, pod in the_lab.pods.items():
        click.echo(f"  {key:<7} {pod.namespace}/{pod.name:<7} {pod.ipv4:<15} nsenter --net={pod.netns.path}")
    click.echo(f"  proxy connection log: {the_lab.proxy_log}")
    click.echo("  headrace lab down")


@lab.command("status")
@click.option("--dir", "lab_dir", default=DEFAULT_DIR, show_default=True, type=click.Path(path_type=Path))
def status_cmd(lab_dir: Path) -> None:
    """Show the lab's processes and the pods as the agent sees them."""
    from node_agent.lab import scenario

    if not (lab_dir / scenario.STATE_FILE).exists():
        raise click.ClickException(f"no lab in {lab_dir}")
    the_lab = scenario.Lab.load(lab_dir)
    for proc in the_lab.procs:
        click.echo(f"{proc.name:<12} pid {proc.pid:<8} {'running' if proc.alive() else 'STOPPED'}  log {proc.log}")
    click.echo("")
    status = the_lab.status()
    click.echo(f"{'pod':<16} {'ip':<15} {'mode':<8} {'state':<9} netns")
    for pod in the_lab.pods.values():
        st = status.get(f"{pod.namespace}/{pod.name}", {})
        click.echo(
            f"{pod.namespace + '/' + pod.name:<16} {pod.ipv4:<15} {st.get('mode', '?'):<8} "
            f"{st.get('state', '?'):<9} {pod.netns.path}"
        )


@lab.command("down")
@click.option("--dir", "lab_dir", default=DEFAULT_DIR, show_default=True, type=click.Path(path_type=Path))
def down_cmd(lab_dir: Path) -> None:
    """Stop the lab's processes and remove its pods, netns and files."""
    from node_agent.lab import scenario

    _require_root()
    if not (lab_dir / scenario.STATE_FILE).exists():
        raise click.ClickException(f"no lab in {lab_dir}")
    scenario.Lab.load(lab_dir).teardown()
    click.echo(f"lab in {lab_dir} removed")
