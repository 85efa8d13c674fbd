"""Build the sdist and the wheel, install the wheel into a fresh venv and run the command.

Nothing is downloaded: the build uses the installed setuptools (no build isolation) and
the wheel is installed with ``--no-deps --no-index``. The new venv sees the torch,
lightning and pip of the environment running the tests through a ``.pth`` file that lists
that environment's site-packages folders (``--system-site-packages`` would not do: from
inside a venv it exposes the base interpreter's packages, not the venv's). Paths in a
``.pth`` file are appended to ``sys.path`` without reading the ``.pth`` files inside them,
so the repository's editable install does not leak in: ``grad_guard.__file__`` has to
point into the venv.
"""

import glob
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from types import SimpleNamespace

import pytest

import grad_guard

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
TIMEOUT = 300

pytestmark = pytest.mark.slow


def _run(*args: str, cwd: str, timeout: int = TIMEOUT) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _copy_project(dest: str) -> None:
    """What the build needs, without caches or the editable install's egg-info."""
    os.makedirs(dest)
    for name in os.listdir(ROOT):
        if name in ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in") or name.startswith(
            ("README", "LICENSE", "CHANGELOG")
        ):
            shutil.copy2(os.path.join(ROOT, name), dest)
    shutil.copytree(
        os.path.join(ROOT, "src"),
        os.path.join(dest, "src"),
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )


def _make_venv(venv: str, cwd: str) -> tuple[str, str]:
    """A bare venv (no pip, no system site) that also sees this environment's packages.

    Returns the venv's ``bin`` folder and its python.
    """
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=cwd)
    bin_dir = os.path.join(venv, "Scripts" if os.name == "nt" else "bin")
    python = os.path.join(bin_dir, "python")
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = _run(python, "-c", code, cwd=cwd).strip()
    # site.getsitepackages() is the running venv's site-packages (plus the base ones when
    # that venv was made with --system-site-packages), or the system's outside a venv
    here = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(purelib, "_grad_guard_test_env.pth"), "w") as pth:
        pth.write("".join(f"{p}\n" for p in here))
    return bin_dir, python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The venv's python and bin folder, the sdist's and wheel's file names, the work dir."""
    work = str(tmp_path_factory.mktemp("packaging"))
    project, dist = os.path.join(work, "project"), os.path.join(work, "dist")
    _copy_project(project)

    # sdist first, then the wheel built *from the unpacked sdist*, as `python -m build`
    # does: a file missing from the sdist breaks the wheel
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist_name = _run(sys.executable, "-c", code, dist, cwd=project).strip().splitlines()[-1]
    sdist = os.path.join(dist, sdist_name)
    with tarfile.open(sdist) as tar:
        sdist_names = tar.getnames()
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(os.path.join(work, "unpacked"), **safe)
    (unpacked,) = glob.glob(os.path.join(work, "unpacked", "*"))
    _run(
        sys.executable, "-m", "pip", "wheel", unpacked, "--no-deps", "--no-build-isolation",
        "--no-index", "-w", dist, "-q", cwd=work,
    )  # fmt: skip
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
        (entry_points,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()

    venv = os.path.join(work, "venv")
    # no pip of its own: the running environment's pip, visible through the .pth file,
    # installs into whichever environment runs it; --ignore-installed because that pip
    # also sees the editable grad-guard of the running environment
    bin_dir, python = _make_venv(venv, work)
    _run(
        python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
        wheel, cwd=work,
    )  # fmt: skip
    return SimpleNamespace(
        python=python,
        bin_dir=bin_dir,
        sdist_names=sdist_names,
        wheel_names=wheel_names,
        scripts=scripts,
        work=work,
    )


def test_sdist_and_wheel_hold_the_package(installed):
    copied = os.path.join(installed.work, "project", "src")
    modules = {
        os.path.relpath(path, copied).replace(os.sep, "/")
        for path in glob.glob(os.path.join(copied, "grad_guard", "**", "*.py"), recursive=True)
    }
    assert {"grad_guard/__init__.py", "grad_guard/loop/guard.py", "grad_guard/core/stats.py"} <= modules
    wheel_names = set(installed.wheel_names)
    assert modules <= wheel_names, sorted(modules - wheel_names)
    assert "grad_guard/py.typed" in wheel_names
    assert not any(n.startswith(("tests/", "examples/")) for n in wheel_names)
    assert "grad-guard = grad_guard.cli:main" in installed.scripts
    top = installed.sdist_names[0].split("/")[0]
    for name in ("pyproject.toml", "README.md", "src/grad_guard/py.typed", "src/grad_guard/cli.py"):
        assert f"{top}/{name}" in installed.sdist_names, name


def test_wheel_imports_from_the_venv_and_runs_the_command(installed):
    python, bin_dir, work = installed.python, installed.bin_dir, installed.work
    code = (
        "import sys, grad_guard, grad_guard.loop, grad_guard.core.clip; "
        "print(grad_guard.__file__); print(grad_guard.__version__); "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning') if m in sys.modules)); "
        "from grad_guard import GradientNormMonitor; print(GradientNormMonitor.__module__)"
    )
    path, version, lightning_modules, callback_module = _run(python, "-c", code, cwd=work).split(
        "\n"
    )[:4]
    venv = os.path.dirname(bin_dir)
    assert os.path.realpath(path).startswith(os.path.realpath(venv)), path
    assert version == grad_guard.__version__
    assert lightning_modules == "[]"  # `import grad_guard` stays light in the installed copy too
    assert callback_module == "grad_guard.callbacks.monitor"

    out = _run(os.path.join(bin_dir, "grad-guard"), "--version", cwd=work)
    assert grad_guard.__version__ in out


def test_demo_quick_runs_in_the_venv(installed):
    assert any(n.startswith("grad_guard/demo") for n in installed.wheel_names)
    # cwd is the work folder, so whatever the demo writes stays under tmp
    out = _run(os.path.join(installed.bin_dir, "grad-guard"), "demo", "--quick", cwd=installed.work)
    assert out.strip(), "the demo printed nothing"
