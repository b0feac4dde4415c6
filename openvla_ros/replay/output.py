"""The output folder: where the report goes, and the rules that keep openvla-replay from ever
deleting what it did not write.

- `--out` must not be, contain or lie inside an input bag, nor be the current folder or one
  above it; an existing file (or symbolic link) is refused.
- Everything is written into `<out>.incomplete`, created exclusively, with a marker file
  (MARKER, signed with WRITTEN_BY) written first; the folder is renamed to `<out>` when complete.
- An existing `<out>` is used only when it is an empty folder, or replaced with `--force` when it
  carries our marker. A leftover `<out>.incomplete` (a killed run) is replaced only with
  `--force` and only when it carries our marker. Anything else: one ReplayError, nothing touched.

check_out() runs before any work (it only looks); create_incomplete() and publish() write.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .bag import ReplayError

MARKER = "openvla_replay.json"
WRITTEN_BY = "openvla-replay"
INCOMPLETE_SUFFIX = ".incomplete"


def _abs(p: Path) -> Path:
    """Absolute, with symbolic links in existing parents resolved, the last component kept."""
    p = Path(os.path.abspath(p.expanduser()))
    return p.parent.resolve() / p.name if p.name else p


def bag_extent(bag: str | os.PathLike) -> Path:
    """The folder (or file) that makes up the input bag: a .db3/.mcap file inside a rosbag2
    folder (metadata.yaml beside it) stands for the whole folder."""
    p = Path(bag).expanduser().resolve()
    if p.is_file() and (p.parent / "metadata.yaml").is_file():
        return p.parent
    return p


def _bags(bag) -> list:
    """One bag (a path) or several (a list of paths) -> a list of paths, duplicates removed."""
    bags = [bag] if isinstance(bag, (str, os.PathLike)) else list(bag)
    return list(dict.fromkeys(Path(b).expanduser().resolve() for b in bags))


def default_out(bag) -> Path:
    """./<bag>_openvla_replay; several bags: ./<bag1>+<bag2>..._openvla_replay (the first one and a
    count when the names are long)."""
    names = [p.name for p in _bags(bag)]
    joined = "+".join(names)
    if len(joined) > 120:
        joined = f"{names[0]}+{len(names) - 1}_more"
    return Path.cwd() / f"{joined}_openvla_replay"


def is_ours(folder: Path) -> bool:
    """True when `folder` is a real folder holding our marker file (not a link) with our signature."""
    marker = folder / MARKER
    try:
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
            return False
        if marker.stat().st_size > 65536:
            return False
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == WRITTEN_BY


def _overlap(path: Path, bag: Path) -> str | None:
    if path == bag:
        return "is"
    if bag in path.parents:
        return "lies inside"
    if path in bag.parents:
        return "contains"
    return None


def incomplete_path(out: Path) -> Path:
    return out.with_name(out.name + INCOMPLETE_SUFFIX)


def check_out(out_arg: str | None, bag, force: bool) -> tuple[Path, Path]:
    """(out, tmp) for this run, or ReplayError; reads the file system, writes nothing. bag: one
    input bag, or a list of them (several streams): --out may overlap none of them."""
    try:
        return _check_out(out_arg, bag, force)
    except OSError as e:  # e.g. a folder we may not list
        raise ReplayError(f"cannot use --out {out_arg}: {e.strerror or e}: {e.filename}") from None


def _check_out(out_arg: str | None, bag, force: bool) -> tuple[Path, Path]:
    if out_arg is not None and not str(out_arg).strip():
        raise ReplayError("--out is empty: give a folder name")
    out = _abs(Path(out_arg)) if out_arg is not None else default_out(bag)
    given = f"--out {out_arg}" if out_arg is not None else f"the default output folder {out}"
    if not out.name:
        raise ReplayError(f"{given}: the file system root cannot be the output folder")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ReplayError(f"{given} is the current folder or one above it; choose a new folder name")
    tmp = incomplete_path(out)
    for extent in (bag_extent(b) for b in _bags(bag)):
        for path, what in ((out, given), (tmp, f"{given}: its working folder {tmp}")):
            how = _overlap(path.resolve(), extent)
            if how:
                raise ReplayError(f"{what} {how} the input bag {extent}; write the report elsewhere"
                                  + ("" if out_arg is not None else " (pass --out)"))
    if out.is_symlink():
        raise ReplayError(f"{given} is a symbolic link; give the real folder")
    if out.exists():
        if not out.is_dir():
            raise ReplayError(f"{given} exists and is not a folder")
        if any(out.iterdir()):
            if not is_ours(out):
                raise ReplayError(f"output folder {out} exists and is not empty, and was not written by "
                                  f"openvla-replay (no {MARKER}): it is never replaced; choose another --out")
            if not force:
                raise ReplayError(f"output folder {out} exists and is not empty (an earlier openvla-replay report; "
                                  "use --force to replace it)")
    if tmp.exists() or tmp.is_symlink():
        if not is_ours(tmp):
            raise ReplayError(f"{tmp} exists and was not written by openvla-replay; it is never replaced: "
                              "move it away or choose another --out")
        if not force:
            raise ReplayError(f"{tmp} is left from an interrupted openvla-replay run (or one still running); "
                              "use --force to replace it")
    # the first existing ancestor must be a folder we may write in
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ReplayError(f"{given}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReplayError(f"{given}: no permission to write in {parent}")
    return out, tmp


def create_incomplete(tmp: Path, force: bool, bag) -> None:
    """Create `tmp` exclusively and sign it; a leftover of ours is replaced only with force.
    bag: the input bag, or a list of them (the marker's "bag" is the first, "bags" all)."""
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.mkdir()
        except FileExistsError:
            if not (force and is_ours(tmp)):
                raise ReplayError(f"{tmp} exists and was not written by this run; it is left untouched") from None
            shutil.rmtree(tmp)
            tmp.mkdir()
        (tmp / MARKER).write_text(json.dumps({
            "written_by": WRITTEN_BY, "bag": str(_bags(bag)[0]), "bags": [str(b) for b in _bags(bag)],
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise ReplayError(f"cannot create the output folder {tmp}: {e.strerror or e}") from None


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`. An empty `out` is replaced; a non-empty one only with
    force and our marker (checked again: it may have appeared during the run). rename(2) itself
    never replaces a non-empty folder, so nothing else is lost even in a race. On refusal `tmp`
    stays, complete, and the error says where."""
    try:
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise ReplayError(f"{out} appeared during the run and is not a folder; the report is in {tmp}")
        if out.is_dir() and any(out.iterdir()):
            if not (force and is_ours(out)):
                raise ReplayError(f"output folder {out} appeared during the run and is not ours to replace; "
                                  f"the report is in {tmp}")
            shutil.rmtree(out)
        os.rename(tmp, out)  # replaces an empty folder; fails on a non-empty one
    except ReplayError:
        raise
    except OSError as e:
        raise ReplayError(f"cannot move the report to {out} ({e.strerror or e}); it is in {tmp}") from None
