"""Environment for running TT-NN on MOCK devices (no card): a throw-away runtime root that
mirrors the installed ttnn package plus our stand-in SFPI compiler, a private JIT cache, and a
mock cluster descriptor. Nothing in the venv, ~/.cache or /opt/tenstorrent is touched, so a real
card's installation and kernel cache cannot be polluted by the dummy binaries built here.

    env = mock_environment("N300", tmp_dir)   # -> dict for subprocess.run(env=...)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DESCRIPTORS = {"N300": HERE / "n300_cluster_desc.yaml", "T3K": HERE / "t3k_cluster_desc.yaml"}
STAND_IN = HERE / "riscv-tt-elf-g++"
# The stand-in's assembler + linker: PyPI `ziglang` (requirements/dev.txt: its clang assembles
# and its lld links rv32 ELF objects), else Debian's binutils-riscv64-unknown-elf.
ZIG_PACKAGE = "ziglang"
BINUTILS_PACKAGE = "binutils-riscv64-unknown-elf"
BINUTILS_TOOLS = ("riscv64-unknown-elf-as", "riscv64-unknown-elf-ld")


def ttnn_package_dir() -> Path | None:
    spec = importlib.util.find_spec("ttnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def zig_binary() -> Path | None:
    """The `zig` executable of the ziglang package (None: not installed)."""
    spec = importlib.util.find_spec(ZIG_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    zig = Path(list(spec.submodule_search_locations)[0]) / "zig"
    return zig if os.access(zig, os.X_OK) else None


def riscv_toolchain(prefer: str | None = None) -> str | None:
    """MOCK_RISCV_TOOLCHAIN for the stand-in: "zig:<path>" (ziglang, the venv's default),
    else "binutils" (Debian's riscv64-unknown-elf-as/-ld on PATH); None: neither is there.
    prefer ("zig" | "binutils", default $OPENVLA_MOCK_RISCV or "zig") picks one when both are."""
    prefer = prefer or os.environ.get("OPENVLA_MOCK_RISCV", "zig")
    zig = zig_binary()
    options = {"zig": f"zig:{zig}" if zig else None,
               "binutils": "binutils" if all(shutil.which(t) for t in BINUTILS_TOOLS) else None}
    if prefer not in options:
        raise ValueError(f"OPENVLA_MOCK_RISCV must be zig or binutils, got {prefer!r}")
    other = "binutils" if prefer == "zig" else "zig"
    return options[prefer] or options[other]


def missing_prerequisites() -> str | None:
    """Why mock-device tests cannot run here (None: they can)."""
    pkg = ttnn_package_dir()
    if pkg is None:
        return "ttnn is not installed"
    if not (pkg / "tt_metal" / "pre-compiled").is_dir():
        return f"{pkg}/tt_metal/pre-compiled (prebuilt firmware) missing from the ttnn wheel"
    if riscv_toolchain() is None:
        return (f"no RISC-V assembler/linker for the stand-in compiler: `{ZIG_PACKAGE}` is not in the venv "
                f"(run `make setup`) and {BINUTILS_TOOLS[0]} is not on PATH (apt-get install {BINUTILS_PACKAGE})")
    return None


def build_runtime_root(root: Path) -> Path:
    """root/ mirrors site-packages/ttnn (symlinks: tt_metal/, ttnn/, runtime/hw, ...) and adds
    runtime/sfpi/compiler/bin/riscv-tt-elf-g++ = the stand-in. TT_METAL_RUNTIME_ROOT points here."""
    pkg = ttnn_package_dir()
    root.mkdir(parents=True, exist_ok=True)
    for entry in pkg.iterdir():
        if entry.name in ("runtime", "__pycache__"):
            continue
        link = root / entry.name
        if not link.exists():
            link.symlink_to(entry)
    runtime = root / "runtime"
    runtime.mkdir(exist_ok=True)
    for entry in (pkg / "runtime").iterdir():
        if entry.name != "sfpi" and not (runtime / entry.name).exists():
            (runtime / entry.name).symlink_to(entry)
    bin_dir = runtime / "sfpi" / "compiler" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    compiler = bin_dir / "riscv-tt-elf-g++"
    shutil.copy2(STAND_IN, compiler)
    compiler.chmod(0o755)
    return root


def mock_environment(mesh: str, work_dir: str | Path) -> dict:
    work = Path(work_dir)
    root = build_runtime_root(work / "runtime_root")
    env = dict(os.environ)
    env.update({
        "TT_METAL_MOCK_CLUSTER_DESC_PATH": str(DESCRIPTORS[mesh]),
        "TT_METAL_RUNTIME_ROOT": str(root),
        "TT_METAL_CACHE": str(work / "jit_cache"),
        "MOCK_PRECOMPILED_DIR": str(ttnn_package_dir() / "tt_metal" / "pre-compiled"),
        "MOCK_RISCV_TOOLCHAIN": riscv_toolchain() or "binutils",
        "ZIG_GLOBAL_CACHE_DIR": str(work / "zig_cache"),
        "ZIG_LOCAL_CACHE_DIR": str(work / "zig_cache"),
        "TT_METAL_LOGGER_LEVEL": env.get("TT_METAL_LOGGER_LEVEL", "ERROR"),
        "LOGURU_LEVEL": env.get("LOGURU_LEVEL", "WARNING"),
        "OPENVLA_TTNN_CACHE": str(work / "weight_cache"),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("MESH_DEVICE", None)
    return env
