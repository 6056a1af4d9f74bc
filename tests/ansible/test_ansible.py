"""Ansible provisioning (ansible/): lint, syntax, and real applies of the role to this machine.

The applies install into a throwaway directory tree (and a throwaway system user when run as root),
with systemd, firewall and apt steps switched off by their variables, and reuse this environment's
installed dependencies (`pip --no-deps` plus a .pth), so no GB-sized download happens.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from appliance.config import RigConfig, load_rig_config
from appliance.stream.zmq_security import load_key_pair, write_key_pair

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
ROLE_DIR = ANSIBLE_DIR / "roles" / "deblur_appliance"

# ansible-core and ansible-lint come with this interpreter's environment (dev extra), which the README's
# test command runs without activating: look for them beside the interpreter first.
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        shutil.which("ansible-playbook", path=TOOL_PATH) is None,
        reason="ansible-playbook is not on PATH (pip install -e '.[dev]' installs ansible-core and ansible-lint)",
    ),
]

_RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
_HEADER = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?:deblur_appliance : )?(?P<name>.+?)\] \**$")


@dataclass
class PlaybookRun:
    """One ansible-playbook run: exit status, output, its recap and the tasks it changed."""

    returncode: int
    output: str
    recap: dict[str, int]
    changed_tasks: list[str]
    handlers_run: list[str]


def _ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=TOOL_PATH, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg")
    )
    return env


def _parse_run(returncode: int, output: str) -> PlaybookRun:
    recaps = list(_RECAP.finditer(output))
    recap = {k: int(v) for k, v in recaps[-1].groupdict().items() if k != "host"} if recaps else {}
    changed, handlers, current = [], [], None
    for line in output.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group("name")
            if line.startswith("RUNNING HANDLER"):
                handlers.append(current)
        elif line.startswith("changed: [") and current is not None:
            changed.append(current)
    return PlaybookRun(returncode, output, recap, changed, handlers)


def _playbook(inventory: Path, extra_vars: Path, *args: str) -> PlaybookRun:
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "site.yml", "-e", f"@{extra_vars}", *args],
        cwd=ANSIBLE_DIR, env=_ansible_env(), capture_output=True, text=True, timeout=300,
    )
    return _parse_run(proc.returncode, proc.stdout + proc.stderr)


@dataclass
class Rig:
    """A throwaway rig on this machine: its directories, variables and the runs applied to it."""

    root: Path
    user: str
    group: str
    variables: dict
    source: Path
    inventory: Path
    vars_file: Path
    first: PlaybookRun | None = None
    second: PlaybookRun | None = None
    third: PlaybookRun | None = None
    cpu_config: RigConfig | None = None  # rig.yaml as the first two applies left it

    @property
    def venv_python(self) -> Path:
        return Path(self.variables["deblur_appliance_venv_dir"]) / "bin" / "python"

    @property
    def rig_yaml(self) -> Path:
        return Path(self.variables["deblur_appliance_config_dir"]) / "rig.yaml"

    @property
    def unit_file(self) -> Path:
        return Path(self.variables["deblur_appliance_systemd_unit_dir"]) / "em-deblur-appliance.service"

    def write_vars(self, **overrides: object) -> Path:
        self.vars_file.write_text(yaml.safe_dump({**self.variables, **overrides}), encoding="utf-8")
        return self.vars_file


def _copy_package_source(dest: Path) -> None:
    # pip builds a source tree in place (build/, *.egg-info): build a copy, never the checkout.
    shutil.copytree(REPO / "appliance", dest / "appliance", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)


def _make_rig(root: Path) -> Rig:
    as_root = os.geteuid() == 0
    if as_root:
        user = group = f"deblurci{uuid.uuid4().hex[:8]}"
    else:  # no useradd without root: the service "user" is the one running the tests
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
    source = root / "src"
    _copy_package_source(source)
    # The rig's and the controller's CURVE keys, as `python -m appliance keys generate` leaves them on the
    # control node.
    keys = root / "keys"
    for name in ("server", "controller"):
        write_key_pair(keys, name)
    sysroot = root / "rig"
    variables = {
        "deblur_appliance_user": user,
        "deblur_appliance_group": group,
        "deblur_appliance_create_user": as_root,
        "deblur_appliance_install_dir": str(sysroot / "opt"),
        "deblur_appliance_venv_dir": str(sysroot / "opt" / "venv"),
        "deblur_appliance_config_dir": str(sysroot / "etc"),
        "deblur_appliance_state_dir": str(sysroot / "var-lib"),
        "deblur_appliance_output_dir": str(sysroot / "data" / "output"),
        "deblur_appliance_log_dir": str(sysroot / "log"),
        "deblur_appliance_systemd_unit_dir": str(sysroot / "systemd"),
        "deblur_appliance_logrotate_dir": str(sysroot / "logrotate.d"),
        "deblur_appliance_manage_packages": False,
        "deblur_appliance_manage_systemd": False,
        "deblur_appliance_manage_firewall": False,
        "deblur_appliance_require_gpu": False,
        "deblur_appliance_nvidia_smi": str(root / "no-such-nvidia-smi"),  # CPU-only, also on GPU hosts
        "deblur_appliance_python": sys.executable,
        "deblur_appliance_venv_site_dirs": [sysconfig.get_paths()["purelib"]],
        "deblur_appliance_source": "path",
        "deblur_appliance_source_path": str(source),
        "deblur_appliance_pip_extra_args": ["--no-deps"],
        "deblur_appliance_log_mode": "file",
        "deblur_appliance_rig_name": "ci-rig",
        "deblur_appliance_environment": {"OMP_NUM_THREADS": "1", "CI_LABEL": "ci 100%"},
        "deblur_appliance_curve_server_secret_key_file": str(keys / "server.key_secret"),
        "deblur_appliance_curve_controller_key_files": [str(keys / "controller.key")],
    }
    for unit_dir in ("systemd", "logrotate.d"):  # stand-ins for /etc/systemd/system, /etc/logrotate.d
        (sysroot / unit_dir).mkdir(parents=True)
    inventory = root / "inventory.ini"
    inventory.write_text(
        "[rigs]\n"
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable} ansible_become=false\n",
        encoding="utf-8",
    )
    rig = Rig(root, user, group, variables, source, inventory, root / "vars.yml")
    rig.write_vars()
    return rig


def _remove_user(rig: Rig) -> None:
    if rig.variables["deblur_appliance_create_user"]:
        subprocess.run(["userdel", rig.user], capture_output=True, check=False)
        subprocess.run(["groupdel", rig.group], capture_output=True, check=False)


def _nft_can_check() -> bool:
    """Whether this machine can validate an nftables ruleset (nft installed, and root for netlink)."""
    return shutil.which("nft") is not None and os.geteuid() == 0


def _fake_nvidia_smi(path: Path) -> Path:
    # Stands in for the driver's CLI on machines without GPUs: the exact output of
    # `nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader` on a 2-GPU rig.
    path.write_text(
        "#!/bin/sh\n"
        "echo '0, NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB'\n"
        "echo '1, NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB'\n",
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory):
    """Apply the playbook twice to a fresh throwaway rig, then once more with a code and config change."""
    root = tmp_path_factory.mktemp("ansible-rig")
    rig = _make_rig(root)
    try:
        rig.first = _playbook(rig.inventory, rig.vars_file)
        if rig.first.returncode == 0:
            rig.second = _playbook(rig.inventory, rig.vars_file)
            rig.cpu_config = load_rig_config(rig.rig_yaml)
        # A code edit, two GPUs found and a firewall, pushed with tags: only these parts may change.
        (rig.source / "appliance" / "_ci_marker.py").write_text("CI_EDIT = True\n", encoding="utf-8")
        rig.write_vars(
            deblur_appliance_require_gpu=True,
            deblur_appliance_nvidia_smi=str(_fake_nvidia_smi(root / "nvidia-smi")),
            deblur_appliance_max_in_flight=16,
            deblur_appliance_manage_firewall=_nft_can_check(),
            deblur_appliance_controller_address="192.0.2.10",
            deblur_appliance_monitoring_address="192.0.2.50",
            deblur_appliance_calibration_file=str(root / "rig-calibration.json"),
        )
        rig.third = (
            _playbook(rig.inventory, rig.vars_file, "--tags", "install,config,firewall")
            if rig.second is not None and rig.second.returncode == 0
            else None
        )
        yield rig
    finally:
        _remove_user(rig)
        shutil.rmtree(root, ignore_errors=True)


def _assert_systemd_accepts(unit: Path) -> None:
    """systemd-analyze verify the unit where systemd is installed (it is, on every rig)."""
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _require_ok(run: PlaybookRun | None) -> PlaybookRun:
    assert run is not None, "an earlier apply of this rig failed"
    assert run.returncode == 0 and run.recap.get("failed") == 0, run.output[-4000:]
    return run


def test_role_passes_ansible_lint_production_profile():
    proc = subprocess.run(
        ["ansible-lint", "--offline", "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR, env=_ansible_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_playbook_passes_syntax_check():
    proc = subprocess.run(
        ["ansible-playbook", "-i", "inventory.example.ini", "site.yml", "--syntax-check"],
        cwd=ANSIBLE_DIR, env=_ansible_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_group_vars_document_every_role_variable_with_its_default():
    defaults = yaml.safe_load((ROLE_DIR / "defaults" / "main.yml").read_text(encoding="utf-8"))
    specs = yaml.safe_load((ROLE_DIR / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    documented = {
        m.group(1): yaml.safe_load(m.group(2))
        for m in re.finditer(
            r"^# (deblur_appliance_\w+): (.*)$",
            (ANSIBLE_DIR / "group_vars" / "rigs.yml").read_text(encoding="utf-8"),
            re.MULTILINE,
        )
    }
    assert documented == defaults
    assert set(specs["argument_specs"]["main"]["options"]) == set(defaults)


def test_first_apply_installs_and_second_apply_changes_nothing(rig):
    first = _require_ok(rig.first)
    assert first.recap["changed"] > 0
    second = _require_ok(rig.second)
    assert second.recap["changed"] == 0, f"second apply changed: {second.changed_tasks}"
    assert second.handlers_run == []


def test_apply_installs_the_package_into_the_venv(rig):
    _require_ok(rig.first)
    proc = subprocess.run(
        # -I: without the current directory on sys.path, which may hold this checkout's appliance/.
        [str(rig.venv_python), "-I", "-c", "import appliance; print(appliance.__file__)"],
        capture_output=True, text=True, check=True,
    )
    # The venv's own copy, not this checkout's editable install.
    assert Path(proc.stdout.strip()).is_relative_to(rig.variables["deblur_appliance_venv_dir"])


def test_rendered_rig_yaml_is_a_valid_cpu_only_rig_config(rig):
    _require_ok(rig.second)
    first_config = rig.cpu_config
    assert first_config.rig_name == "ci-rig"
    assert first_config.ingest.tile_endpoint == "tcp://0.0.0.0:5555"
    assert first_config.ingest.feedback_endpoint == "tcp://0.0.0.0:5556"
    assert first_config.output.directory == Path(rig.variables["deblur_appliance_output_dir"])
    for deployment in (first_config.detector, first_config.deblur):
        assert deployment.num_replicas == 1 and deployment.num_gpus_per_replica == 0.0
    assert first_config.ray.num_gpus == 0
    # No monitoring host: the metrics endpoint stays on loopback.
    assert first_config.metrics.enabled and first_config.metrics.address == "127.0.0.1:9464"
    assert first_config.detector.calibration is None  # deblur_appliance_calibration_file "": no calibration


def test_curve_keys_are_pinned_in_rig_yaml_and_the_secret_is_private_to_the_service_user(rig):
    _require_ok(rig.second)
    security = rig.cpu_config.security
    keys = rig.root / "keys"
    assert security.curve and not security.allow_unauthenticated_network
    assert security.controller_public_keys == [load_key_pair(keys / "controller.key").public.decode()]
    installed = Path(security.server_secret_key_file)
    assert installed == Path(rig.variables["deblur_appliance_config_dir"]) / "keys" / "server.key_secret"
    assert load_key_pair(installed) == load_key_pair(keys / "server.key_secret")
    assert installed.stat().st_mode & 0o777 == 0o600 and installed.parent.stat().st_mode & 0o777 == 0o700
    assert (installed.owner(), installed.group()) == (rig.user, rig.group)
    assert security.ray_token_file == Path(rig.variables["deblur_appliance_state_dir"]) / "ray_auth_token"


def test_code_config_and_gpu_changes_reinstall_rerender_and_notify_a_restart(rig):
    third = _require_ok(rig.third)
    expected = ["Install em-deblur-appliance into the virtualenv", "Record what is installed", "Write rig.yaml"]
    handlers = ["Restart the appliance"]
    if _nft_can_check():
        expected += ["Write the nftables rules for the appliance's ports", "Write the systemd unit that loads them"]
        handlers = ["Reload systemd units", "Reload the appliance firewall", *handlers]
    assert sorted(third.changed_tasks) == sorted(expected)
    assert third.handlers_run == handlers
    installed = Path(rig.variables["deblur_appliance_venv_dir"]).glob("lib/python*/site-packages/appliance")
    assert [p for p in installed if (p / "_ci_marker.py").exists()], "edited source was not reinstalled"
    config = load_rig_config(rig.rig_yaml)
    # 2 GPUs found: 2 deblur replicas x 0.4 GPU and 1 detector replica x 0.2 GPU on each.
    assert (config.deblur.num_replicas, config.deblur.num_gpus_per_replica) == (4, 0.4)
    assert (config.detector.num_replicas, config.detector.num_gpus_per_replica) == (2, 0.2)
    assert config.ray.num_gpus == 2
    assert config.ingest.max_in_flight == 16
    # A monitoring host: the endpoint listens where the ZeroMQ sockets do (the firewall limits who reaches it).
    assert config.metrics.address == "0.0.0.0:9464"
    # A calibration file on the rig: rendered into detector.calibration (the service checks the file at start).
    assert config.detector.calibration == rig.root / "rig-calibration.json"


def test_firewall_admits_only_the_controller_to_the_appliance_ports(rig):
    if not _nft_can_check():
        pytest.skip("nft not installed or not root: cannot validate the ruleset (apt-get install nftables)")
    _require_ok(rig.third)
    ruleset = Path(rig.variables["deblur_appliance_config_dir"]) / "firewall.nft"
    text = ruleset.read_text(encoding="utf-8")
    rules = [line.strip() for line in text.splitlines() if line.startswith("        ") and "#" not in line]
    assert "type filter hook input priority 0; policy drop;" in rules
    accepted = [rule for rule in rules if rule.endswith("accept")]
    assert accepted == [
        'iifname "lo" accept',
        "ct state established,related accept",
        "meta l4proto { icmp, ipv6-icmp } accept",
        "tcp dport 22 accept",
        "tcp dport { 5555, 5556 } ip saddr 192.0.2.10 accept",
        "tcp dport 9464 ip saddr 192.0.2.50 accept",
    ]
    # Ray's well-known ports (GCS 6379, dashboard 8265, client 10001, dashboard agent 52365, metrics
    # export 8080, workers 10002-19999) appear nowhere: the drop policy covers them.
    opened = {int(port) for rule in accepted for port in re.findall(r"\b(\d{2,5})\b", rule.split("saddr")[0])}
    assert opened == {22, 5555, 5556, 9464}
    proc = subprocess.run(["nft", "--check", "--file", str(ruleset)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    unit = Path(rig.variables["deblur_appliance_systemd_unit_dir"]) / "em-deblur-appliance-firewall.service"
    assert f"ExecStart=/usr/sbin/nft --file {ruleset}" in unit.read_text(encoding="utf-8")
    _assert_systemd_accepts(unit)


def test_service_and_data_directories_belong_to_the_service_user(rig):
    _require_ok(rig.first)
    for key in ("deblur_appliance_state_dir", "deblur_appliance_output_dir", "deblur_appliance_log_dir"):
        path = Path(rig.variables[key])
        assert (path.owner(), path.group()) == (rig.user, rig.group), path
        assert path.stat().st_mode & 0o007 == 0, f"{path} is accessible to others"
    assert rig.rig_yaml.group() == rig.group and rig.rig_yaml.stat().st_mode & 0o777 == 0o640


def test_systemd_unit_runs_serve_and_drains_on_stop(rig):
    _require_ok(rig.first)
    unit = rig.unit_file.read_text(encoding="utf-8")
    assert f"ExecStart={rig.venv_python} -m appliance serve --config {rig.rig_yaml}\n" in unit
    for line in ("Restart=on-failure", "KillSignal=SIGTERM", "KillMode=mixed", "TimeoutStopSec=120",
                 f"User={rig.user}", f"StandardOutput=append:{rig.variables['deblur_appliance_log_dir']}/",
                 'Environment="OMP_NUM_THREADS=1"\n', 'Environment="CI_LABEL=ci 100%%"\n'):
        assert line in unit
    logrotate = (Path(rig.variables["deblur_appliance_logrotate_dir"]) / "em-deblur-appliance").read_text()
    assert "copytruncate" in logrotate
    _assert_systemd_accepts(rig.unit_file)


def _refused_in_preflight(root: Path, **overrides: object) -> PlaybookRun:
    """Apply a fresh rig with `overrides`; assert the run failed and changed nothing; return it."""
    rig = _make_rig(root)
    try:
        run = _playbook(rig.inventory, rig.write_vars(**overrides))
    finally:
        _remove_user(rig)
    assert run.returncode != 0
    assert run.recap["changed"] == 0
    assert not (root / "rig" / "opt").exists()
    return run


def test_network_bind_without_curve_fails_before_changing_anything(tmp_path):
    run = _refused_in_preflight(tmp_path, deblur_appliance_curve=False)
    assert "need CURVE" in run.output and "deblur_appliance_allow_unauthenticated_network" in run.output


def test_required_gpu_without_driver_fails_before_changing_anything(tmp_path):
    run = _refused_in_preflight(tmp_path, deblur_appliance_require_gpu=True)
    assert "GPUs are required" in run.output and "Install the NVIDIA driver" in run.output


def _render_role_templates(root: Path, variables: dict) -> tuple[Path, Path]:
    """rig.yaml and firewall.nft as the role writes them for `variables` (over its defaults), 2 GPUs found.

    A one-play playbook that templates the role's own files, without installing anything.
    """
    out = root / "rendered"
    out.mkdir()
    (root / "vars.yml").write_text(yaml.safe_dump(variables), encoding="utf-8")
    role_files = [str(ROLE_DIR / "defaults" / "main.yml"), str(ROLE_DIR / "vars" / "main.yml"), str(root / "vars.yml")]
    tasks = [
        {"name": name, "ansible.builtin.template": {"src": str(ROLE_DIR / "templates" / f"{name}.j2"), "dest": str(out / name)}}
        for name in ("rig.yaml", "firewall.nft")
    ]
    play = [{"hosts": "localhost", "gather_facts": False, "vars_files": role_files,
             "vars": {"deblur_appliance__gpu_count": 2}, "tasks": tasks}]
    (root / "render.yml").write_text(yaml.safe_dump(play, sort_keys=False), encoding="utf-8")
    proc = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
         str(root / "render.yml")],
        cwd=ANSIBLE_DIR, env=_ansible_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "rig.yaml", out / "firewall.nft"


def test_several_microscopes_render_a_valid_rig_yaml_and_a_firewall_per_controller(tmp_path):
    keys = tmp_path / "keys"
    for name in ("server", "scope-a", "scope-b"):
        write_key_pair(keys, name)
    variables = {
        "deblur_appliance_rig_name": "box-01",
        "deblur_appliance_output_dir": "/srv/out",
        "deblur_appliance_curve_server_secret_key_file": str(keys / "server.key_secret"),
        "deblur_appliance_calibration_file": "/etc/em/rig-calibration.json",
        "deblur_appliance_deblur_model_file": "/etc/em/deblur-rig.onnx",
        "deblur_appliance_monitoring_address": "192.0.2.50",
        "deblur_appliance_deblur_torch_compile": "default",
        "deblur_appliance_tile_shape": [2400, 2048],
        "deblur_appliance_microscopes": [
            {"name": "scope-a", "controller_address": "192.0.2.10", "tile_port": 5555, "feedback_port": 5556,
             "curve_controller_key_files": [str(keys / "scope-a.key")], "calibration_file": "/etc/em/scope-a.json"},
            {"name": "scope-b", "controller_address": "2001:db8::11", "tile_port": 5565, "feedback_port": 5566,
             "curve_controller_key_files": [str(keys / "scope-b.key")], "output_dir": "/data/scope-b"},
        ],
    }
    rig_yaml, ruleset = _render_role_templates(tmp_path, variables)
    config = load_rig_config(rig_yaml)
    a, b = config.served_microscopes()
    assert (a.name, a.tile_endpoint, a.feedback_endpoint) == ("scope-a", "tcp://0.0.0.0:5555", "tcp://0.0.0.0:5556")
    assert (b.tile_endpoint, b.feedback_endpoint) == ("tcp://0.0.0.0:5565", "tcp://0.0.0.0:5566")
    assert (a.output_directory, b.output_directory) == (Path("/srv/out/scope-a"), Path("/data/scope-b"))
    # Its own calibration, else the rig's; its own controller key only.
    assert (a.detector_calibration, b.detector_calibration) == (
        Path("/etc/em/scope-a.json"), Path("/etc/em/rig-calibration.json"))
    assert a.controller_public_keys == [load_key_pair(keys / "scope-a.key").public.decode()]
    assert b.controller_public_keys == [load_key_pair(keys / "scope-b.key").public.decode()]
    # The GPUs are shared: replicas as for one microscope (2 GPUs).
    assert (config.deblur.num_replicas, config.ray.num_gpus) == (4, 2)
    # The fused deblur network, warmed up at start on the rig's tile shape.
    assert (config.deblur.torch_compile, config.deblur.warmup_tile_shape) == ("default", (2400, 2048))
    # The deblur model adapted to the rig (models/deblur/adapt.py), shared by both microscopes.
    assert config.deblur.model_path == Path("/etc/em/deblur-rig.onnx")
    rules = [line.strip() for line in ruleset.read_text(encoding="utf-8").splitlines()
             if line.startswith("        ") and "#" not in line]
    opened = [rule for rule in rules if "saddr" in rule]
    assert opened == [
        "tcp dport { 5555, 5556 } ip saddr 192.0.2.10 accept",
        "tcp dport { 5565, 5566 } ip6 saddr 2001:db8::11 accept",
        "tcp dport 9464 ip saddr 192.0.2.50 accept",
    ]
    if _nft_can_check():
        proc = subprocess.run(["nft", "--check", "--file", str(ruleset)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_one_microscope_renders_as_before(tmp_path):
    keys = tmp_path / "keys"
    for name in ("server", "controller"):
        write_key_pair(keys, name)
    rig_yaml, ruleset = _render_role_templates(tmp_path, {
        "deblur_appliance_rig_name": "rig-1",
        "deblur_appliance_controller_address": "192.0.2.10",
        "deblur_appliance_curve_server_secret_key_file": str(keys / "server.key_secret"),
        "deblur_appliance_curve_controller_key_files": [str(keys / "controller.key")],
    })
    raw = yaml.safe_load(rig_yaml.read_text(encoding="utf-8"))
    assert "microscopes" not in raw and raw["ingest"]["tile_endpoint"] == "tcp://0.0.0.0:5555"
    (only,) = load_rig_config(rig_yaml).served_microscopes()
    assert (only.name, only.feedback_endpoint) == ("rig-1", "tcp://0.0.0.0:5556")
    assert load_rig_config(rig_yaml).deblur.model_path is None  # the bundled model
    deblur = load_rig_config(rig_yaml).deblur
    assert (deblur.torch_compile, deblur.warmup_tile_shape) == ("off", None)  # the role's defaults
    assert "tcp dport { 5555, 5556 } ip saddr 192.0.2.10 accept" in ruleset.read_text(encoding="utf-8")
