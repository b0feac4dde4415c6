"""The stand-in SFPI compiler (test/ttnn_mock/riscv-tt-elf-g++) produces what tt-metal's JIT
build expects on a mock device, with either assembler/linker it accepts: PyPI `ziglang` (the
venv's default, no root needed) or Debian's binutils-riscv64-unknown-elf.

- compile steps (-c, and -x c++-header for the PCH) -> an ELF32 RISC-V relocatable object with
  weak `_start` / `kernel_launch` and relocations in .text (tt-metal rejects kernel ELFs without);
- kernel links (tt-metal's own linker script, --just-symbols of the firmware, --emit-relocs)
  -> an ELF32 RISC-V executable whose entry is `_start` and that keeps its .text relocations;
- firmware links -> the wheel's prebuilt firmware ELF, byte for byte;
- and ttnn itself opens a mock N300 and runs an op with the objects built this way.
"""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ttnn_mock import mock_env  # noqa: E402

EM_RISCV, ET_REL, ET_EXEC = 243, 1, 2
SHT_SYMTAB, SHT_RELA = 2, 4
STB_WEAK = 2


def read_elf(path: Path) -> dict:
    """The few ELF32 facts tt-metal relies on: class, type, machine, entry, sections, symbols."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert data[4] == 1 and data[5] == 1, f"{path}: not ELF32 little-endian (class {data[4]}, data {data[5]})"
    e_type, e_machine, _, e_entry, _, e_shoff, _, _, _, _, e_shentsize, e_shnum, e_shstrndx = \
        struct.unpack_from("<HHIIIIIHHHHHH", data, 16)
    raw = [struct.unpack_from("<IIIIIIIIII", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    strtab_off = raw[e_shstrndx][4]

    def cstr(off):
        return data[off:data.index(b"\0", off)].decode()

    sections = [{"name": cstr(strtab_off + s[0]), "type": s[1], "addr": s[3], "offset": s[4], "size": s[5],
                 "link": s[6], "info": s[7]} for s in raw]
    symbols = {}
    for sec in sections:
        if sec["type"] != SHT_SYMTAB:
            continue
        names = sections[sec["link"]]["offset"]
        for off in range(sec["offset"], sec["offset"] + sec["size"], 16):
            st_name, st_value, _, st_info, _, st_shndx = struct.unpack_from("<IIIBBH", data, off)
            if st_name:
                symbols[cstr(names + st_name)] = {"value": st_value, "bind": st_info >> 4, "shndx": st_shndx}
    relocations = {sections[s["info"]]["name"]: s["size"] // 12 for s in sections if s["type"] == SHT_RELA}
    comment = next((data[s["offset"]:s["offset"] + s["size"]] for s in sections if s["name"] == ".comment"), b"")
    return {"type": e_type, "machine": e_machine, "entry": e_entry, "sections": {s["name"]: s for s in sections},
            "symbols": symbols, "relocations": relocations, "comment": comment.decode(errors="replace")}


def _toolchains():
    zig = mock_env.zig_binary()
    binutils = all(mock_env.shutil.which(t) for t in mock_env.BINUTILS_TOOLS)
    return [
        pytest.param(f"zig:{zig}" if zig else None, id="ziglang", marks=pytest.mark.skipif(
            zig is None, reason="ziglang not installed in this venv (requirements/dev.txt; run `make setup`)")),
        pytest.param("binutils", id="binutils", marks=pytest.mark.skipif(
            not binutils, reason=f"{mock_env.BINUTILS_TOOLS[0]} not on PATH (optional alternative: "
                                 f"apt-get install {mock_env.BINUTILS_PACKAGE})")),
    ]


def _stand_in(toolchain: str, args: list[str], tmp_path: Path, **env):
    full_env = {"PATH": "/usr/bin:/bin", "MOCK_RISCV_TOOLCHAIN": toolchain,
                "ZIG_GLOBAL_CACHE_DIR": str(tmp_path / "zig_cache"), **env}
    return subprocess.run(["bash", str(mock_env.STAND_IN), *args], env=full_env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def _wormhole_build() -> Path:
    pkg = mock_env.ttnn_package_dir()
    if pkg is None:
        pytest.skip("ttnn is not installed")
    for build in sorted((pkg / "tt_metal" / "pre-compiled").glob("*/")):
        if (build / "erisc").is_dir() and (build / "trisc0" / "trisc0.elf").is_file():
            return build
    pytest.fail(f"no prebuilt wormhole firmware in {pkg}/tt_metal/pre-compiled")


def _assert_dummy_object(path: Path):
    obj = read_elf(path)
    assert (obj["type"], obj["machine"]) == (ET_REL, EM_RISCV), obj
    for name in ("_start", "kernel_launch"):
        assert obj["symbols"][name]["bind"] == STB_WEAK, (name, obj["symbols"].get(name))
    assert obj["relocations"].get(".text", 0) >= 2, obj["relocations"]


@pytest.mark.parametrize("toolchain", _toolchains())
def test_stand_in_compiles_and_links_what_tt_metal_expects(toolchain, tmp_path):
    version = _stand_in(toolchain, ["--version"], tmp_path)
    assert version.returncode == 0 and "riscv-tt-elf-g++" in version.stdout

    # compile a kernel (with a dependency file) and a precompiled header
    (tmp_path / "kernel.cpp").write_text("void kernel_main() {}\n")
    obj, dep = tmp_path / "trisck.o", tmp_path / "trisck.d"
    cc = _stand_in(toolchain, ["-O3", "-mcpu=tt-wh-tensix", "-flto", "-MD", "-MF", str(dep), "-c", "kernel.cpp",
                               "-o", str(obj)], tmp_path)
    assert cc.returncode == 0, cc.stderr
    _assert_dummy_object(obj)
    assert dep.read_text().startswith(f"{obj}:")
    pch = tmp_path / "pch.h.gch"
    cc = _stand_in(toolchain, ["-x", "c++-header", "-Os", "pch.h", "-o", str(pch)], tmp_path)
    assert cc.returncode == 0, cc.stderr
    _assert_dummy_object(pch)

    # kernel link: tt-metal's linker script and options. The script places the kernel after the
    # firmware's __fw_export_* symbols (tt-metal passes them with --just-symbols of a firmware ELF
    # it weakens itself, which the mock op below covers; here they come from the prebuilt firmware).
    pkg, build = mock_env.ttnn_package_dir(), _wormhole_build()
    script = pkg / "runtime" / "hw" / "toolchain" / "wormhole" / "kernel_trisc0.ld"
    substitutes = pkg / "runtime" / "hw" / "lib" / "wormhole" / "substitutes.o"
    elf = tmp_path / "kernels" / "trisc0" / "trisc0.elf"
    elf.parent.mkdir(parents=True)
    exports = {k: v["value"] for k, v in read_elf(build / "trisc0" / "trisc0.elf")["symbols"].items()
               if k.startswith("__fw_export_")}
    assert exports, "prebuilt trisc0 firmware exports no __fw_export_* symbols"
    defsyms = [f"-Wl,--defsym={k}={v:#x}" for k, v in sorted(exports.items())]
    link = _stand_in(toolchain, ["-O3", "-mcpu=tt-wh-tensix", *defsyms, "-Wl,-z,max-page-size=16", "-Wl,-z,common-page-size=16", "-nostartfiles",
                                 f"-T{script}", "-Wl,--emit-relocs", str(substitutes), str(obj), "-o", str(elf)],
                     tmp_path)
    assert link.returncode == 0, link.stderr
    exe = read_elf(elf)
    assert (exe["type"], exe["machine"]) == (ET_EXEC, EM_RISCV), exe
    text = exe["sections"][".text"]
    assert exe["entry"] == exe["symbols"]["_start"]["value"], exe["entry"]
    assert text["addr"] <= exe["entry"] < text["addr"] + text["size"], (hex(exe["entry"]), text)
    assert exe["relocations"].get(".text", 0) >= 2, exe["relocations"]  # --emit-relocs kept them
    # and the toolchain asked for did the link (LLD stamps .comment; GNU ld does not)
    assert ("Linker: LLD" in exe["comment"]) == toolchain.startswith("zig:"), exe["comment"]

    # firmware link: the prebuilt wormhole firmware of that processor
    fw = tmp_path / "firmware" / "ncrisc" / "ncrisc.1234.elf"
    fw.parent.mkdir(parents=True)
    link = _stand_in(toolchain, [f"-T{pkg / 'runtime/hw/toolchain/wormhole/firmware_ncrisc.ld'}", str(obj),
                                 "-o", str(fw)], tmp_path, MOCK_PRECOMPILED_DIR=str(build.parent))
    assert link.returncode == 0, link.stderr
    prebuilt = [p for p in build.parent.glob("*/ncrisc/ncrisc.elf") if (p.parents[1] / "erisc").is_dir()]
    assert fw.read_bytes() in [p.read_bytes() for p in prebuilt]


def test_toolchain_choice_prefers_the_venv_and_accepts_binutils(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in mock_env.BINUTILS_TOOLS:
        (fake_bin / tool).write_text("#!/bin/sh\n")
        (fake_bin / tool).chmod(0o755)
    zig = tmp_path / "zig"
    monkeypatch.delenv("OPENVLA_MOCK_RISCV", raising=False)

    monkeypatch.setenv("PATH", str(fake_bin))
    monkeypatch.setattr(mock_env, "zig_binary", lambda: zig)
    assert mock_env.riscv_toolchain() == f"zig:{zig}"  # both there: the venv's ziglang
    assert mock_env.riscv_toolchain("binutils") == "binutils"
    monkeypatch.setenv("OPENVLA_MOCK_RISCV", "binutils")
    assert mock_env.riscv_toolchain() == "binutils"
    monkeypatch.delenv("OPENVLA_MOCK_RISCV")

    monkeypatch.setattr(mock_env, "zig_binary", lambda: None)
    assert mock_env.riscv_toolchain() == "binutils"  # no ziglang: Debian's binutils

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert mock_env.riscv_toolchain() is None
    if mock_env.ttnn_package_dir() is not None:
        why = mock_env.missing_prerequisites()
        assert "ziglang" in why and mock_env.BINUTILS_PACKAGE in why, why


MOCK_OP = """
import ttnn, torch
dev = ttnn.open_device(device_id=0)
a = ttnn.from_torch(torch.ones(32, 32), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=dev)
out = ttnn.to_torch(ttnn.add(a, a))
ttnn.close_device(dev)
print("OP_OK", tuple(out.shape))
"""


@pytest.mark.skipif(mock_env.missing_prerequisites() is not None,
                    reason=f"mock TT-NN devices unavailable: {mock_env.missing_prerequisites()}")
def test_ttnn_runs_an_op_on_a_mock_device_with_the_stand_in(tmp_path):
    env = mock_env.mock_environment("N300", tmp_path)
    env["MOCK_SFPI_LOG"] = str(tmp_path / "sfpi.log")
    proc = subprocess.run([sys.executable, "-c", MOCK_OP], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0 and "OP_OK (32, 32)" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    calls = (tmp_path / "sfpi.log").read_text().splitlines()
    assert any(" -c " in f" {c} " for c in calls) and any("/kernels/" in c and "-T" in c for c in calls), calls[:5]
    kernels = list((tmp_path / "jit_cache").rglob("kernels/**/*.elf"))
    assert kernels, "tt-metal built no kernel ELF"
    for k in kernels[:3]:
        assert read_elf(k)["machine"] == EM_RISCV
