"""The wheel: what it holds, and that an install of it runs the `gatekit` command.

The wheel is built without build isolation (with the setuptools of the test environment: the dev
extra brings setuptools >= 77) from a copy of the sources, so the work tree gets no build/ folder.
"""
import configparser
import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import gatekit

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("build")


def build_wheel(tmp_path_factory, environment: dict[str, str] | None = None) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source)
    for folder in ("gatekit", "adapters"):
        # Not the gate kernel built in place by the editable install: the wheel build must compile its own.
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
                   check=True, capture_output=True, text=True, env=environment)
    (path,) = out.glob("gatekit-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory)


def has_c_compiler() -> bool:
    return shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is not None


def installed_package(init: Path) -> str:
    """Where a source folder's package lands in the wheel: adapters/ installs as gatekit/adapters."""
    folder = init.parent.relative_to(ROOT).as_posix()
    return f"gatekit/{folder}" if folder.startswith("adapters") else folder


def test_wheel_holds_every_package_the_licence_and_the_version(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {installed_package(init) for folder in ("gatekit", "adapters") for init in (ROOT / folder).rglob("__init__.py")}
    assert {"gatekit", "gatekit/adapters", "gatekit/integrations", "gatekit/cli", "gatekit/losses"} <= packages
    for package in packages:  # a new subpackage must be listed in pyproject's packages
        assert f"{package}/__init__.py" in names, package
    for module in ("gatekit/adapters/cifar_resnet.py", "gatekit/integrations/lightning.py", "gatekit/export.py"):
        assert module in names
    assert not any(name.startswith(("tests/", "adapters/", "benchmarks/")) for name in names)
    if has_c_compiler():  # the C gate kernel, compiled
        assert any(name.startswith("gatekit/_gate_kernel.") and name.endswith((".so", ".pyd")) for name in names)


def test_a_wheel_builds_without_a_c_compiler_and_leaves_the_kernel_out(tmp_path_factory):
    wheel = build_wheel(tmp_path_factory, {**os.environ, "CC": "false"})  # every compile fails
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "gatekit/gate.py" in names
    assert not any(name.endswith((".so", ".pyd")) for name in names)  # the gates then use torch's operators
    dist_info = f"gatekit-{gatekit.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA"))
    assert metadata["Version"] == gatekit.__version__ and metadata["License-Expression"] == "MIT"
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"lightning", "tensorboard", "export", "docs", "dev"} <= extras
    assert not any("lightning" in requirement and "extra" not in requirement
                   for requirement in metadata.get_all("Requires-Dist"))  # optional stays optional


def test_wheel_declares_the_console_script_and_the_builtin_adapters(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(f"gatekit-{gatekit.__version__}.dist-info/entry_points.txt").decode())
    assert entry_points["console_scripts"]["gatekit"] == "gatekit.cli:main"
    adapters = dict(entry_points["gatekit.adapters"])
    assert adapters["cifar_resnet"] == "gatekit.adapters.cifar_resnet"
    modules = {path.stem for path in (ROOT / "adapters").glob("[!_]*.py")}
    assert set(adapters) == modules  # every built-in adapter module registers


def test_wheel_installs_into_a_fresh_venv_and_the_command_runs(wheel, tmp_path):
    """A new venv gets the wheel alone; torch and the other dependencies come from this environment.

    21 s on the 2-core CI machine when idle, 61 s when other jobs load it: kept in CI.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True)
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    # Appended after the venv's own site-packages, so the wheel's gatekit wins over an editable one.
    Path(site_packages, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    environment = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run(
        [str(python), "-c", "import gatekit, gatekit._fused_gate as f; print(gatekit.__file__, gatekit.__version__, "
         "f.kernel_available())"], check=True, capture_output=True, text=True, cwd=tmp_path, env=environment).stdout
    assert where.startswith(site_packages) and where.split()[1] == gatekit.__version__
    assert where.split()[2] == str(has_c_compiler())  # the wheel's own kernel loads
    command = venv / "bin" / "gatekit"
    usage = subprocess.run([str(command), "--help"], check=True, capture_output=True, text=True, cwd=tmp_path,
                           env=environment).stdout
    assert "profile" in usage and "sites" in usage
    version = subprocess.run([str(command), "--version"], check=True, capture_output=True, text=True, cwd=tmp_path,
                             env=environment).stdout
    assert version.strip() == f"gatekit {gatekit.__version__}"
    sites = subprocess.run([str(command), "sites", "cifar/resnet20"], check=True, capture_output=True, text=True,
                           cwd=tmp_path, env=environment).stdout
    assert "layer3.2" in sites and len(sites.splitlines()) == 10  # header + 9 blocks


def test_command_prints_the_version(capsys):
    from gatekit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"gatekit {gatekit.__version__}"
