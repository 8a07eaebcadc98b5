"""scripts/install-systemd: units systemd accepts, an idempotent merge into
containerd's config.toml that keeps everything else, clear failures."""

from __future__ import annotations

import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazystore import deploy
from lazystore.cli import main
from lazystore.deploy import DeployConfig, DeployError, Targets

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-systemd"
LAZYSTORE = Path(sys.executable).with_name("lazystore")
ADDRESS = "/run/lazystore-snapshotter.sock"
PROXY = {"type": "snapshot", "address": ADDRESS}

# A containerd 1.6 config as an administrator might have it: comments, a
# runtime, a registry mirror, another proxy plugin.
EXISTING = """\
# containerd config, edited by hand
version = 2
root = "/var/lib/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["https://mirror.example.org"]

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
"""


def config(**kw: Any) -> DeployConfig:
    return DeployConfig(executable=str(LAZYSTORE), **kw)


def without(data: dict[str, Any], *path: str) -> dict[str, Any]:
    """*data* without the key at *path* (and tables it leaves empty)."""
    if len(path) == 1:
        return {k: v for k, v in data.items() if k != path[0]}
    out = dict(data)
    out[path[0]] = without(data[path[0]], *path[1:])
    if not out[path[0]]:
        del out[path[0]]
    return out


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".bak-*"))


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


# ------------------------------------------------------------- unit files


def systemd_verify(*units: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Unknown keys and bad values are only warnings: accept none of them.
    assert proc.stderr.strip() == "", proc.stderr


def exec_start_words(unit_text: str) -> list[str]:
    """The words of a unit file's ExecStart= line (systemd quoting, %% and $$)."""
    exec_start = next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$")
            for w in shlex.split(exec_start.removeprefix("ExecStart="))]


def test_installed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    deploy.install(config(cache_size="20G"), targets)
    systemd_verify(targets.unit_dir / deploy.DAEMON_UNIT,
                   targets.unit_dir / deploy.SNAPSHOTTER_UNIT)


def test_units_with_unusual_paths_pass_verify(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    cfg = config(mount_point="/mnt/lazy store", cache_dir="/srv/cache 100%",
                 snapshotter_root="/srv/snap $x", substituters=["http://127.0.0.1:1/a b"],
                 snapshotter_address="/run/lazy sn/sn.sock",
                 extra_args=['--store-dir', '/nix/"store"'])
    deploy.install(cfg, targets)
    systemd_verify(targets.unit_dir / deploy.DAEMON_UNIT,
                   targets.unit_dir / deploy.SNAPSHOTTER_UNIT)
    text = (targets.unit_dir / deploy.DAEMON_UNIT).read_text()
    assert exec_start_words(text) == deploy.daemon_argv(cfg)


def test_containerd_dropin_passes_verify(tmp_path: Path) -> None:
    shipped = Path("/lib/systemd/system/containerd.service")
    if not shipped.exists():
        pytest.skip("containerd.service is not installed")
    targets = Targets.under(tmp_path)
    deploy.install(config(), targets)
    shutil.copy(shipped, targets.unit_dir / "containerd.service")
    dropin = targets.unit_dir / deploy.CONTAINERD_DROPIN
    assert "After=lazystore-snapshotter.service" in dropin.read_text()
    systemd_verify(targets.unit_dir / "containerd.service")


def test_unit_contents() -> None:
    daemon = deploy.daemon_unit(config())
    assert "Type=notify\n" in daemon and "Restart=on-failure\n" in daemon
    assert "DeviceAllow=/dev/fuse rw\n" in daemon and "CAP_SYS_ADMIN" in daemon
    assert "ProtectSystem" not in daemon and "PrivateTmp" not in daemon
    assert "WantedBy=multi-user.target\n" in daemon
    assert "FileDescriptorStoreMax=4\n" in daemon and "Environment=FDSTORE=4\n" in daemon
    snapshotter = deploy.snapshotter_unit(config())
    assert "Requires=" not in snapshotter  # a daemon restart leaves it running
    for line in ("Wants=lazystore.service", "After=lazystore.service",
                 "Before=containerd.service", "Type=notify", "Restart=on-failure"):
        assert line + "\n" in snapshotter


# ------------------------------------------------------ containerd config


def test_merge_keeps_everything_and_adds_the_proxy_plugin() -> None:
    merged = deploy.merge_containerd_config(EXISTING, ADDRESS)
    assert merged is not None
    assert merged.startswith(EXISTING), "appended: comments and layout survive"
    data = tomllib.loads(merged)
    assert data["proxy_plugins"]["lazystore"] == PROXY
    assert without(data, "proxy_plugins", "lazystore") == tomllib.loads(EXISTING)
    assert deploy.merge_containerd_config(merged, ADDRESS) is None


def test_merge_agrees_with_the_snapshotter_stanza() -> None:
    proc = subprocess.run([str(LAZYSTORE), "snapshotter", "--print-containerd-config",
                           "--address", "/run/x.sock"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stanza = tomllib.loads(proc.stdout)
    merged = deploy.merge_containerd_config("version = 2\n", "/run/x.sock")
    assert merged is not None
    assert tomllib.loads(merged)["proxy_plugins"] == stanza["proxy_plugins"]


def test_cri_default_snapshotter_rewrites_when_it_must() -> None:
    merged = deploy.merge_containerd_config(EXISTING, ADDRESS, cri_default=True)
    assert merged is not None
    data = tomllib.loads(merged)
    cri = data["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == "lazystore"
    assert cri["default_runtime_name"] == "runc"
    rest = without(without(data, "proxy_plugins", "lazystore"),
                   "plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter")
    assert rest == tomllib.loads(EXISTING)
    assert deploy.merge_containerd_config(merged, ADDRESS, cri_default=True) is None


def test_cri_default_in_a_version_1_config() -> None:
    merged = deploy.merge_containerd_config('root = "/var/lib/containerd"\n', ADDRESS,
                                            cri_default=True)
    assert merged is not None
    data = tomllib.loads(merged)
    assert data["plugins"]["cri"]["containerd"]["snapshotter"] == "lazystore"
    assert data["proxy_plugins"]["lazystore"] == PROXY
    assert data["root"] == "/var/lib/containerd"


def test_stale_address_is_replaced_other_keys_kept() -> None:
    old = EXISTING + '\n[proxy_plugins.lazystore]\n  type = "snapshot"\n  address = "/old.sock"\n'
    merged = deploy.merge_containerd_config(old, ADDRESS)
    assert merged is not None
    data = tomllib.loads(merged)
    assert data["proxy_plugins"]["lazystore"] == PROXY
    assert data["proxy_plugins"]["stargz"] == tomllib.loads(EXISTING)["proxy_plugins"]["stargz"]
    assert without(data, "proxy_plugins", "lazystore") == tomllib.loads(EXISTING)


@pytest.mark.parametrize("text", ["", "# nothing configured yet\n"])
def test_empty_config_becomes_version_2(text: str) -> None:
    merged = deploy.merge_containerd_config(text, ADDRESS)
    assert merged is not None and merged.startswith(text)
    assert tomllib.loads(merged) == {"version": 2, "proxy_plugins": {"lazystore": PROXY}}


@pytest.mark.parametrize(
    ("existing", "cri_default"),
    [(EXISTING, False), (EXISTING, True), ('root = "/var/lib/containerd"\n', True)],
    ids=["append", "rewrite-cri-default", "version-1"],
)
def test_real_containerd_reads_the_merged_config(
    tmp_path: Path, existing: str, cri_default: bool
) -> None:
    if shutil.which("containerd") is None:
        pytest.skip("containerd is not installed")
    merged = deploy.merge_containerd_config(existing, ADDRESS, cri_default=cri_default)
    assert merged is not None
    path = tmp_path / "config.toml"
    path.write_text(merged)
    # `config dump` prints the configuration containerd would run with (as version 2).
    proc = subprocess.run(["containerd", "--config", str(path), "config", "dump"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    dumped = tomllib.loads(proc.stdout)
    assert dumped["proxy_plugins"]["lazystore"] == PROXY
    cri = dumped["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert (cri["snapshotter"] == "lazystore") == cri_default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('version = "two"\n', "unknown version 'two'"),
        ("version = [2]\n", "unknown version [2]"),
        ("version = true\n", "unknown version True"),
        ('proxy_plugins = "lazystore"\n', "proxy_plugins is not a table"),
        ('proxy_plugins.lazystore = "x"\n', "proxy_plugins.lazystore is not a table"),
        ('version = 2\nplugins."io.containerd.grpc.v1.cri" = 5\n',
         'plugins."io.containerd.grpc.v1.cri" is not a table'),
    ],
)
def test_config_of_the_wrong_shape_is_refused(text: str, message: str) -> None:
    with pytest.raises(DeployError, match=re.escape(message)):
        deploy.merge_containerd_config(text, ADDRESS, cri_default=True)


def test_cri_default_in_a_version_3_config() -> None:
    """containerd 2 (config version 3) splits the CRI plugin: the snapshotter
    belongs to its images part."""
    text = 'version = 3\n[plugins."io.containerd.cri.v1.images"]\n  max_concurrent_downloads = 3\n'
    merged = deploy.merge_containerd_config(text, ADDRESS, cri_default=True)
    assert merged is not None
    data = tomllib.loads(merged)
    assert data["plugins"] == {"io.containerd.cri.v1.images": {
        "max_concurrent_downloads": 3, "snapshotter": "lazystore"}}
    assert data["proxy_plugins"]["lazystore"] == PROXY


def test_invalid_toml_is_refused() -> None:
    with pytest.raises(DeployError, match="not valid TOML"):
        deploy.merge_containerd_config("[plugins\nversion = 2\n", ADDRESS)


# ---------------------------------------------------------------- install


def test_install_is_idempotent_and_backs_up(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    targets.containerd_config.parent.mkdir(parents=True)
    targets.containerd_config.write_text(EXISTING)
    first = deploy.install(config(), targets)
    assert [c.action for c in first] == ["created", "created", "created", "updated"]
    [backup] = backups(targets.containerd_config)
    assert backup.read_text() == EXISTING
    written = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    second = deploy.install(config(), targets)
    assert [c.action for c in second] == ["unchanged"] * 4
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == written


def test_changed_options_update_units_with_backup(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    deploy.install(config(), targets)
    unit = targets.unit_dir / deploy.DAEMON_UNIT
    before = unit.read_text()
    changes = deploy.install(config(cache_size="5G"), targets)
    assert changes[0].action == "updated"
    assert "--cache-size 5G" in unit.read_text()
    assert [b.read_text() for b in backups(unit)] == [before]


def test_metrics_addresses_reach_the_units(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    deploy.install(config(metrics_address="127.0.0.1:9464",
                          snapshotter_metrics_address="[::1]:9465"), targets)
    assert "--metrics-address 127.0.0.1:9464" in (
        targets.unit_dir / deploy.DAEMON_UNIT).read_text()
    assert "--metrics-address \"[::1]:9465\"" in (
        targets.unit_dir / deploy.SNAPSHOTTER_UNIT).read_text()
    deploy.install(config(), targets)
    assert "--metrics-address" not in (targets.unit_dir / deploy.DAEMON_UNIT).read_text()
    deploy.install(config(registry=True, registry_metrics_address="127.0.0.1:9466",
                          cri_default_snapshotter=True, image_service=True,
                          image_service_metrics_address="127.0.0.1:9467"), targets)
    assert "--metrics-address 127.0.0.1:9466" in (
        targets.unit_dir / deploy.REGISTRY_UNIT).read_text()
    assert "--metrics-address 127.0.0.1:9467" in (
        targets.unit_dir / deploy.IMAGE_SERVICE_UNIT).read_text()


def test_symlinked_config_keeps_its_link(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    real = tmp_path / "managed" / "containerd.toml"
    real.parent.mkdir()
    real.write_text(EXISTING)
    targets.containerd_config.parent.mkdir(parents=True)
    targets.containerd_config.symlink_to(real)
    deploy.install(config(), targets)
    assert targets.containerd_config.is_symlink()
    assert tomllib.loads(real.read_text())["proxy_plugins"]["lazystore"] == PROXY


def test_bad_containerd_config_writes_nothing(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    targets.containerd_config.parent.mkdir(parents=True)
    targets.containerd_config.write_text("version = [\n")
    with pytest.raises(DeployError, match=str(targets.containerd_config)):
        deploy.install(config(), targets)
    assert not targets.unit_dir.exists()
    assert targets.containerd_config.read_text() == "version = [\n"


def test_config_that_is_not_utf8_writes_nothing(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    targets.containerd_config.parent.mkdir(parents=True)
    targets.containerd_config.write_bytes(b"version = 2\n# \xff\n")
    with pytest.raises(DeployError, match="not UTF-8"):
        deploy.install(config(), targets)
    assert not targets.unit_dir.exists()


def test_unit_that_is_not_utf8_is_replaced_and_backed_up_byte_for_byte(tmp_path: Path) -> None:
    targets = Targets.under(tmp_path)
    unit = targets.unit_dir / deploy.DAEMON_UNIT
    unit.parent.mkdir(parents=True)
    unit.write_bytes(b"[Unit]\nDescription=\xff\n")
    assert deploy.install(config(containerd=False), targets)[0].action == "updated"
    assert unit.read_text() == deploy.daemon_unit(config())
    assert [b.read_bytes() for b in backups(unit)] == [b"[Unit]\nDescription=\xff\n"]


@pytest.mark.parametrize(
    ("option", "path"),
    [("snapshotter_root", "/tmp/snapshots"), ("snapshotter_address", "/var/tmp/sn.sock"),
     ("control_socket", "/root/ctl.sock"), ("mount_point", "/home/lazystore"),
     ("snapshotter_root", "/run/user/0/x")],
)
def test_paths_the_snapshotters_sandbox_hides_are_refused(option: str, path: str) -> None:
    """ProtectHome= and PrivateTmp= would hide them from the snapshotter."""
    with pytest.raises(DeployError, match="below .* which the snapshotter's sandbox"):
        config(**{option: path})
    config(**{option: path}, snapshotter=False, containerd=False)  # the daemon alone may


@pytest.mark.parametrize("target", ["etc/containerd/config.toml",
                                    "etc/systemd/system/lazystore-snapshotter.service"])
def test_fifo_in_place_of_a_file_is_refused_not_read(tmp_path: Path, target: str) -> None:
    targets = Targets.under(tmp_path)
    (tmp_path / target).parent.mkdir(parents=True)
    os.mkfifo(tmp_path / target)  # reading it would wait for a writer for ever
    with pytest.raises(DeployError, match="is not a regular file"):
        deploy.install(config(), targets)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_relative_paths_are_refused() -> None:
    with pytest.raises(DeployError, match="cache dir must be an absolute path"):
        config(cache_dir="var/cache")


def test_script_prints_what_it_changed(tmp_path: Path) -> None:
    first = run_script("--root", tmp_path, "--exec", LAZYSTORE, "--cri-default-snapshotter")
    assert first.returncode == 0, first.stderr
    unit_dir = tmp_path / "etc/systemd/system"
    assert first.stdout.splitlines() == [
        f"created {unit_dir / 'lazystore.service'}",
        f"created {unit_dir / 'lazystore-snapshotter.service'}",
        f"created {unit_dir / 'containerd.service.d/lazystore.conf'}",
        f"created {tmp_path / 'etc/containerd/config.toml'}",
    ]
    data = tomllib.loads((tmp_path / "etc/containerd/config.toml").read_text())
    assert data["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "lazystore"
    second = run_script("--root", tmp_path, "--exec", LAZYSTORE, "--cri-default-snapshotter")
    assert second.returncode == 0, second.stderr
    assert all(line.startswith("unchanged ") for line in second.stdout.splitlines())


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """`lazystore install-systemd ARGS` in this process: status, stdout, stderr."""
    status = main(["install-systemd", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_dry_run_and_no_snapshotter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "--root", tmp_path, "--exec", LAZYSTORE, "--dry-run")
    assert status == 0
    assert len(out.splitlines()) == 4
    assert all(line.startswith("would be created ") for line in out.splitlines())
    assert not any(tmp_path.iterdir())
    status, out, _ = cli(capsys, "--root", tmp_path, "--exec", LAZYSTORE, "--no-snapshotter")
    assert status == 0
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["lazystore.service"]


def test_cli_refuses_a_missing_program_on_this_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --dry-run: were the check missing, nothing would be written to this host's /etc.
    status, out, err = cli(capsys, "--dry-run", "--exec", tmp_path / "no-lazystore")
    assert status == 1 and out == ""
    missing = tmp_path / "no-lazystore"
    assert err.strip() == f"lazystore: error: --exec {missing}: not an executable file"
    # Below a staging root the program may come later.
    status, out, _ = cli(capsys, "--root", tmp_path, "--dry-run", "--exec", missing)
    assert status == 0 and out.startswith("would be created ")


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "etc/containerd").mkdir(parents=True)
    (tmp_path / "etc/containerd/config.toml").write_text("[[broken\n")
    status, out, err = cli(capsys, "--root", tmp_path, "--exec", LAZYSTORE)
    assert status == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazystore: error: ")
    assert "config.toml" in lines[0] and "not valid TOML" in lines[0]
    assert not (tmp_path / "etc/systemd").exists()


# ------------------------------------------------------- the TOML writer

_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
    st.datetimes(timezones=st.just(datetime.UTC)).map(lambda d: d.replace(microsecond=0)),
    st.dates(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_toml_writer_round_trips(data: dict[str, Any]) -> None:
    assert tomllib.loads(deploy.toml_dumps(data)) == data


@pytest.mark.parametrize(
    "arg", ["plain", "a b", 'q"uote', "back\\slash", "100%", "$HOME", "", "it's", ";"]
)
def test_exec_quote_round_trips(arg: str) -> None:
    [word] = shlex.split(deploy.exec_quote(arg))
    assert word.replace("%%", "%").replace("$$", "$") == arg


# ------------------------------------------------------- staying in --root


def test_paths_given_with_root_are_below_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    status, out, _ = cli(capsys, "--root", root, "--exec", LAZYSTORE,
                         "--unit-dir", "/usr/lib/systemd/system",
                         "--containerd-config", "/opt/containerd.toml")
    assert status == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "root/opt/containerd.toml",
        "root/usr/lib/systemd/system/containerd.service.d/lazystore.conf",
        "root/usr/lib/systemd/system/lazystore-snapshotter.service",
        "root/usr/lib/systemd/system/lazystore.service",
    ]
    assert all(line.startswith(f"created {root}/") for line in out.splitlines())


@pytest.mark.parametrize("link", ["etc/containerd/config.toml", "etc/systemd"])
def test_symlink_out_of_root_is_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], link: str
) -> None:
    """An absolute link in a staged image means the image's file, not the host's."""
    root, host = tmp_path / "root", tmp_path / "host"
    (host / "etc/containerd").mkdir(parents=True)
    (host / "etc/containerd/config.toml").write_text(EXISTING)
    (host / "etc/systemd").mkdir()
    (root / link).parent.mkdir(parents=True)
    (root / link).symlink_to(host / link)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    status, out, err = cli(capsys, "--root", root, "--exec", LAZYSTORE)
    assert status == 1 and out == ""
    assert "outside" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not any((host / "etc/systemd").iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trusted-public-key", "garbage"], "trusted public key 'garbage'"),
        (["--trusted-public-key", "k-1:c2hvcnQ="], "trusted public key 'k-1:c2hvcnQ='"),
        (["--substituter", "cache.example.org"], "is not an http, https or file URL"),
        (["--substituter", "ftp://cache.example.org"], "is not an http, https or file URL"),
        (["--cache-size", "lots"], "invalid size 'lots'"),
        (["--metrics-address", "9464"], "metrics address '9464': expected HOST:PORT"),
        (["--snapshotter-metrics-address", "host:"],
         "snapshotter metrics address 'host:': expected HOST:PORT"),
    ],
)
def test_what_the_daemon_would_refuse_is_refused_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    try:
        status = main(["install-systemd", "--root", str(tmp_path), "--exec", str(LAZYSTORE),
                       *args])
    except SystemExit as exc:  # argparse: usage and one error line, status 2
        status = exc.code
    out, err = capsys.readouterr()
    assert status in (1, 2) and out == ""
    assert message in err.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("extra, sandboxed", [
    ((), True),
    (("--registry-cache-dir", "/srv/registry cache"), True),
    (("--registry-expression", "/etc/images.nix"), False),
])
def test_script_installs_the_registry_unit(
    tmp_path: Path, extra: tuple[str, ...], sandboxed: bool,
) -> None:
    proc = run_script("--root", tmp_path, "--exec", LAZYSTORE, "--registry",
                      "--registry-listen", "0.0.0.0:5001", "--substituter", "https://c.example",
                      *extra)
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / "etc/systemd/system" / deploy.REGISTRY_UNIT
    assert f"created {unit}" in proc.stdout.splitlines()
    systemd_verify(unit)
    text = unit.read_text()
    words = exec_start_words(text)
    cache_dir = extra[1] if extra[:1] == ("--registry-cache-dir",) else \
        "/var/cache/lazystore-registry"
    assert words == [str(LAZYSTORE), "registry", "--listen", "0.0.0.0:5001",
                     "--cache-dir", cache_dir, "--substituter", "https://c.example",
                     *(["--expression", extra[1]] if "--registry-expression" in extra else [])]
    assert ("ProtectSystem=strict" in text) == sandboxed


@pytest.mark.parametrize("listen", ["5000", "localhost", ":5000", "a b:1"])
def test_registry_listen_address_is_checked(listen: str) -> None:
    with pytest.raises(DeployError, match="listen address"):
        config(registry=True, registry_listen=listen)


def test_script_installs_the_image_service_unit(tmp_path: Path) -> None:
    proc = run_script("--root", tmp_path, "--exec", LAZYSTORE, "--cri-default-snapshotter",
                      "--image-service", "--image-service-address", "/run/k8s/lazystore.sock")
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / "etc/systemd/system" / deploy.IMAGE_SERVICE_UNIT
    assert f"created {unit}" in proc.stdout.splitlines()
    systemd_verify(unit)
    text = unit.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart=")) == [
        str(LAZYSTORE), "image-service", "--address", "/run/k8s/lazystore.sock",
        "--runtime-endpoint", "/run/containerd/containerd.sock",
        "--control-socket", "/run/lazystore.sock", "--mount-point", "/run/lazystore"]
    assert "CapabilityBoundingSet=\n" in text and "ProtectSystem=strict" in text
    assert "ReadWritePaths=/run/k8s\n" in text and "ExecStartPre=+" in text
    assert "Before=kubelet.service\n" in text and "Requires=lazystore.service\n" in text
    data = tomllib.loads((tmp_path / "etc/containerd/config.toml").read_text())
    cri = data["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "lazystore", "disable_snapshot_annotations": False}


def test_image_service_needs_lazystore_as_the_cri_snapshotter(tmp_path: Path) -> None:
    proc = run_script("--root", tmp_path, "--exec", LAZYSTORE, "--image-service")
    assert proc.returncode == 1
    assert "needs lazystore as the CRI snapshotter" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing written"


def test_real_containerd_reads_the_image_service_settings(tmp_path: Path) -> None:
    if shutil.which("containerd") is None:
        pytest.skip("containerd is not installed")
    merged = deploy.merge_containerd_config(EXISTING, ADDRESS, cri_default=True,
                                            cri_annotations=True)
    assert merged is not None
    path = tmp_path / "config.toml"
    path.write_text(merged)
    proc = subprocess.run(["containerd", "--config", str(path), "config", "dump"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cri = tomllib.loads(proc.stdout)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == "lazystore" and cri["disable_snapshot_annotations"] is False
    assert deploy.merge_containerd_config(merged, ADDRESS, True, True) is None
