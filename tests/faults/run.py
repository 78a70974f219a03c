#!/usr/bin/env python
"""Fault-injection runner: applies each fault of tests/faults/faults.py to a scratch copy of the repository, one at
a time, runs the tests that must catch it there, and reports which faults the test suite catches.

    python tests/faults/run.py                 # every fault (and the clean check first)
    python tests/faults/run.py --only NAME ... # some faults
    python tests/faults/run.py --list          # the faults and their selections
    python tests/faults/run.py --probe [--only NAME ...]   # confirm faults change their op's output

Per run: the repository's files (`git ls-files -co --exclude-standard`) are synced into a scratch copy outside it
(default $TMPDIR/ditengine-faults-$UID, kept between runs), whose native extension is built there with
`setup.py build_ext --inplace` (ninja: after the first, clean build only changed sources recompile), and whose
package layout (pyproject's package-dir: ditengine -> engine, ditengine.kernels -> kernels, ditengine.bench ->
bench) is a folder of symbolic links put first on the tests' PYTHONPATH; a pytest plugin checks in the test
process that ditengine and its extension were imported from the scratch copy. Then:

1. the clean check: each distinct selection runs once on the unpatched copy and must pass (a selection that
   fails anyway cannot show that it catches anything: its faults are reported "dirty");
2. each fault: patch the file (its `old` text must occur exactly once, else "stale"); a fault in csrc/ rebuilds
   the extension (one object and the link); run `python -m pytest -q -x -p no:cacheprovider <selection>` in the
   copy; restore the file (and, for csrc/, the build artifacts saved after the clean build, so no rebuild back).

Results: caught (the selection failed), passed (the fault survived), stale, dirty, timeout, error, n/a (the
faulty path runs only on CPUs this one is not, `Fault.needs`). The exit status is 0 only when every fault that
ran was caught.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from faults import FAULTS, Fault  # noqa: E402

GUARD_MODULE = "ditengine_faults_guard"
PROBE_PRELUDE = """\
import os, sys, json
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DITENGINE_AUTOTUNE", "0")
sys.path.insert(0, "tests")
import torch
import ditengine as de
torch.manual_seed(0)
"""
PROBE_EPILOGUE = """
assert de.__file__.startswith(os.environ["DITENGINE_FAULTS_ROOT"]), de.__file__
with open(os.environ["DITENGINE_FAULTS_PROBE_OUT"], "w") as f:
    json.dump(out.detach().double().flatten().tolist(), f)
"""


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- the scratch copy ------------------------------------------------------------------------------------------
def package_dirs(repo: Path) -> dict[str, str]:
    """pyproject's [tool.setuptools.package-dir]: {"ditengine": "engine", "ditengine.kernels": "kernels", ...}."""
    import tomllib

    with open(repo / "pyproject.toml", "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    if "ditengine" not in dirs:
        raise SystemExit("run.py: pyproject.toml has no package-dir for ditengine")
    return dirs


def repo_files(repo: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                         capture_output=True).stdout.decode()
    return sorted(p for p in out.split("\0") if p and (repo / p).is_file())


@dataclass
class Scratch:
    root: Path                      # everything the runner keeps
    repo: Path = field(init=False)  # the copy of the repository
    pkg: Path = field(init=False)   # the import root: ditengine/ as links, the guard plugin
    state: Path = field(init=False)

    def __post_init__(self):
        self.repo, self.pkg, self.state = self.root / "repo", self.root / "pkg", self.root / "state"

    def extension(self, dirs: dict[str, str]) -> Path | None:
        found = sorted((self.repo / dirs["ditengine"]).glob("_C.*.so")) + \
            sorted((self.repo / dirs["ditengine"]).glob("_C.*.pyd"))
        return found[0] if found else None


def sync(src: Path, scratch: Scratch, dirs: dict[str, str]) -> int:
    """Copy the repository's files into the scratch copy: changed files only (with a fresh mtime, so ninja rebuilds
    what they feed); files no longer in the repository are removed, except the build outputs. Returns how many
    files changed."""
    files = repo_files(src)
    wanted = set(files)
    changed = 0
    for rel in files:
        s, d = src / rel, scratch.repo / rel
        data = s.read_bytes()
        if d.is_file() and not d.is_symlink() and d.read_bytes() == data:
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.is_symlink() or d.exists():
            d.unlink()
        d.write_bytes(data)
        shutil.copymode(s, d)
        changed += 1
    engine = scratch.repo / dirs["ditengine"]
    for path in sorted(scratch.repo.rglob("*"), reverse=True):
        rel = path.relative_to(scratch.repo)
        if rel.parts[0] == "build" or "__pycache__" in rel.parts or rel.parts[0].endswith(".egg-info"):
            if path.name == "__pycache__" and path.is_dir():
                shutil.rmtree(path)
            continue
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
            continue
        if path.parent == engine and path.name.startswith("_C."):
            continue  # the extension built here
        if rel.as_posix() not in wanted:
            path.unlink()
            changed += 1
    return changed


def make_layout(scratch: Scratch, dirs: dict[str, str]) -> None:
    """scratch.pkg/ditengine: a link to every entry of the ditengine package dir, and each mapped subpackage
    (ditengine.kernels -> kernels/) linked at its place; the guard plugin beside it."""
    if scratch.pkg.exists():
        shutil.rmtree(scratch.pkg)
    top = scratch.pkg / "ditengine"
    top.mkdir(parents=True)
    for entry in sorted((scratch.repo / dirs["ditengine"]).iterdir()):
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in sorted(dirs.items()):
        if name == "ditengine":
            continue
        if not name.startswith("ditengine."):
            raise SystemExit(f"run.py: package-dir {name!r} is not a ditengine subpackage")
        link = top.joinpath(*name.split(".")[1:])
        if link.exists() or link.is_symlink():
            raise SystemExit(f"run.py: {link} would shadow {dirs['ditengine']}/{link.name}")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(scratch.repo / folder)
    shutil.copyfile(HERE / "guard_plugin.py", scratch.pkg / f"{GUARD_MODULE}.py")


# -- the native extension ----------------------------------------------------------------------------------------
def _tool_version(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "absent"


def native_stamp(scratch: Scratch) -> str:
    """What the extension is built from: csrc/, setup.py, the interpreter, torch, the compiler and ninja (a new
    ninja reads the old one's log as changed commands and recompiles everything: a fresh base build then)."""
    from importlib.metadata import version

    h = hashlib.sha256()
    for p in sorted((scratch.repo / "csrc").rglob("*")) + [scratch.repo / "setup.py"]:
        if p.is_file():
            h.update(p.relative_to(scratch.repo).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    try:
        torch_version = version("torch")
    except Exception:  # no torch: the build installs nothing native
        torch_version = "absent"
    cxx = (os.environ.get("CXX") or "c++").split()[0]
    tools = [sys.executable, torch_version, str(shutil.which("ninja")), _tool_version("ninja", "--version"),
             _tool_version(cxx, "--version")]
    h.update("\0".join(tools).encode())
    return h.hexdigest()


def build(scratch: Scratch, log_name: str) -> tuple[float, str]:
    """`setup.py build_ext --inplace --force` in the copy: ninja recompiles the changed objects, then links.
    Returns (seconds, log path); raises RuntimeError with the log's tail on failure."""
    logf = scratch.state / log_name
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
    t0 = time.monotonic()
    with open(logf, "w") as f:
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--force"], cwd=scratch.repo,
                              env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - t0
    if proc.returncode:
        tail = logf.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"build failed (exit {proc.returncode}, {seconds:.0f} s; log {logf}):\n{tail}")
    return seconds, str(logf)


def build_artifacts(scratch: Scratch, dirs: dict[str, str]) -> list[Path]:
    """What a build writes: build/ and the extension placed in the package dir."""
    out = [p for p in (scratch.repo / "build").rglob("*") if p.is_file()] if (scratch.repo / "build").exists() else []
    so = scratch.extension(dirs)
    return out + ([so] if so else [])


def save_pristine(scratch: Scratch, dirs: dict[str, str]) -> None:
    """A copy of the clean build's artifacts (mtimes kept), restored after each csrc fault instead of a rebuild."""
    pristine = scratch.state / "pristine"
    if pristine.exists():
        shutil.rmtree(pristine)
    manifest = {}
    for p in build_artifacts(scratch, dirs):
        rel = p.relative_to(scratch.repo).as_posix()
        (pristine / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, pristine / rel)
        st = p.stat()
        manifest[rel] = [st.st_size, st.st_mtime_ns]
    (scratch.state / "pristine.json").write_text(json.dumps(manifest))


def restore_pristine(scratch: Scratch, dirs: dict[str, str]) -> int:
    """Put the clean build's artifacts back (changed ones copied, new ones removed); returns how many changed."""
    pristine = scratch.state / "pristine"
    manifest = json.loads((scratch.state / "pristine.json").read_text())
    changed = 0
    for p in build_artifacts(scratch, dirs):
        rel = p.relative_to(scratch.repo).as_posix()
        if rel not in manifest:
            p.unlink()
            changed += 1
    for rel, (size, mtime) in manifest.items():
        p = scratch.repo / rel
        if p.is_file():
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) == (size, mtime):
                continue
            p.unlink()  # a fresh inode: never write into a library some process may still map
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pristine / rel, p)
        changed += 1
    return changed


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- faults --------------------------------------------------------------------------------------------------------
class Stale(Exception):
    pass


def undo_fault(fault: Fault, scratch, dirs, raw: bytes, st: os.stat_result, so, so_digest) -> None:
    """Revert the fault's file and, for a csrc/ fault, put the clean build's artifacts back (checked by digest)."""
    revert(fault, scratch.repo, raw, st)
    if fault.native and so is not None:
        restore_pristine(scratch, dirs)
        if file_digest(so) != so_digest:
            raise SystemExit(f"run.py: the clean extension was not restored after {fault.name}")


def cpu_has(feature: str) -> bool:
    """Whether this CPU takes the path a fault's `needs` names."""
    import torch

    if feature == "amx":
        return torch.cpu._is_amx_tile_supported()
    raise ValueError(f"Fault.needs: unknown CPU feature {feature!r}")


def apply_fault(fault: Fault, repo: Path) -> tuple[bytes, os.stat_result]:
    """Patch the file; returns its original bytes and stat for `revert`. Raises Stale when `old` does not occur
    exactly once."""
    path = repo / fault.path
    if not path.is_file():
        raise Stale(f"{fault.path}: no such file")
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    n = text.count(fault.old)
    if n != 1:
        raise Stale(f"{fault.path}: the old text occurs {n} times (expected once)")
    st = path.stat()
    path.write_bytes(text.replace(fault.old, fault.new).encode("utf-8"))
    return raw, st


def revert(fault: Fault, repo: Path, raw: bytes, st: os.stat_result) -> None:
    path = repo / fault.path
    path.write_bytes(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def check_faults(faults: list[Fault]) -> None:
    names = [f.name for f in faults]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"run.py: duplicate fault names {sorted(dupes)}")
    for f in faults:
        if f.old == f.new or not f.old or not f.tests:
            raise SystemExit(f"run.py: fault {f.name}: needs distinct old and new text and a test selection")
        if Path(f.path).is_absolute() or ".." in Path(f.path).parts:
            raise SystemExit(f"run.py: fault {f.name}: path must be repository-relative, got {f.path}")


# -- running tests ---------------------------------------------------------------------------------------------------
def child_env(scratch: Scratch) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(scratch.pkg), PYTHONDONTWRITEBYTECODE="1", DITENGINE_FAULTS_ROOT=str(scratch.root))
    return env


@dataclass
class Outcome:
    status: str        # passed / failed / timeout / error
    seconds: float
    summary: str       # pytest's last line, or why it is an error
    first_failure: str = ""
    native: bool | None = None


def run_selection(scratch: Scratch, selection: tuple, timeout: float, tag: str) -> Outcome:
    guard_out = scratch.state / "guard.json"
    guard_out.unlink(missing_ok=True)
    logf = scratch.state / "logs" / f"{tag}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", GUARD_MODULE, *selection]
    env = child_env(scratch) | {"DITENGINE_FAULTS_GUARD_OUT": str(guard_out)}
    t0 = time.monotonic()
    with open(logf, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=scratch.repo, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return Outcome("timeout", time.monotonic() - t0, f"killed after {timeout:.0f} s (log {logf})")
    seconds = time.monotonic() - t0
    text = logf.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else ""
    failure = next((ln.split(" ", 1)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))), "")
    try:
        guard = json.loads(guard_out.read_text())
    except (OSError, ValueError):
        guard = None
    if guard is None:
        return Outcome("error", seconds, f"exit {rc}, no guard report (collection failed?): {summary} (log {logf})",
                       failure)
    if guard["bad"]:
        return Outcome("error", seconds, f"ditengine imported from outside the scratch copy: {guard['modules']}")
    if rc == 0:
        return Outcome("passed", seconds, summary, native=guard["native"])
    if rc == 1:
        return Outcome("failed", seconds, summary, failure, native=guard["native"])
    return Outcome("error", seconds, f"pytest exit {rc}: {summary} (log {logf})", failure, native=guard["native"])


def run_probe(scratch: Scratch, code: str, timeout: float, tag: str):
    """Runs a fault's probe in the copy; returns (values, seconds) or raises RuntimeError."""
    out = scratch.state / "probe.json"
    out.unlink(missing_ok=True)
    script = scratch.state / f"probe-{tag}.py"
    script.write_text(PROBE_PRELUDE + code + PROBE_EPILOGUE)
    env = child_env(scratch) | {"DITENGINE_FAULTS_PROBE_OUT": str(out)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=scratch.repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"probe failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return json.loads(out.read_text()), time.monotonic() - t0


def compare(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"changed (shape: {len(a)} -> {len(b)} values)"
    diffs = [abs(x - y) if math.isfinite(x) and math.isfinite(y) else (0.0 if repr(x) == repr(y) else math.inf)
             for x, y in zip(a, b)]
    worst = max(diffs, default=0.0)
    if worst == 0.0:
        return "UNCHANGED"
    scale = max((abs(x) for x in a if math.isfinite(x)), default=0.0)
    return f"changed (max |diff| {worst:.3g}, max |clean| {scale:.3g}, {sum(d > 0 for d in diffs)}/{len(a)} values)"


# -- main ------------------------------------------------------------------------------------------------------------
def fmt_selection(fault: Fault) -> str:
    return " ".join(fault.tests) + (f" -k {fault.k!r}" if fault.k else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these faults only")
    ap.add_argument("--list", action="store_true", help="list the faults and exit")
    ap.add_argument("--probe", action="store_true",
                    help="instead of the tests, run each fault's probe clean and patched: is the output changed?")
    ap.add_argument("--no-clean-check", dest="clean_check", action="store_false",
                    help="skip running the selections on the unpatched copy first")
    ap.add_argument("--scratch", type=Path,
                    default=Path(os.environ.get("DITENGINE_FAULTS_SCRATCH")
                                 or Path(tempfile.gettempdir()) / f"ditengine-faults-{os.getuid()}"),
                    help="where the scratch copy lives (kept between runs; default %(default)s)")
    ap.add_argument("--fresh", action="store_true", help="delete the scratch copy first (a clean build follows)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    check_faults(FAULTS)
    faults = FAULTS
    if args.only:
        unknown = sorted(set(args.only) - {f.name for f in FAULTS})
        if unknown:
            ap.error(f"unknown fault(s) {unknown}; --list shows them")
        faults = [f for f in FAULTS if f.name in args.only]
    if args.list:
        for f in faults:
            log(f"{f.name}\n    {f.path}{' (C++: rebuilds)' if f.native else ''}: {f.why}\n    {fmt_selection(f)}")
        log(f"{len(faults)} faults")
        return 0
    if args.probe:
        faults = [f for f in faults if f.probe]

    root = args.scratch.resolve()
    if root.is_relative_to(REPO) or REPO.is_relative_to(root):
        ap.error(f"--scratch {root} must lie outside the repository {REPO}")
    if args.fresh and root.exists():
        shutil.rmtree(root)
    scratch = Scratch(root)
    scratch.state.mkdir(parents=True, exist_ok=True)
    scratch.repo.mkdir(parents=True, exist_ok=True)
    lock = open(scratch.state / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"run.py: another run holds {scratch.state / 'lock'}; pass another --scratch")

    t_start = time.monotonic()
    dirs = package_dirs(REPO)
    marker = scratch.state / "in-progress"
    if marker.exists():  # an interrupted run may have left a fault's build artifacts (sync reverts the sources)
        log(f"an earlier run stopped inside fault {marker.read_text()!r}: restoring the clean build")
        if (scratch.state / "pristine.json").exists():
            restore_pristine(scratch, dirs)
        marker.unlink()
    n = sync(REPO, scratch, dirs)
    log(f"scratch copy {scratch.repo}: {n} file(s) updated from {REPO}")

    stamp = native_stamp(scratch)
    stamp_file = scratch.state / "native.stamp"
    build_seconds = None
    if not stamp_file.exists() or stamp_file.read_text() != stamp or scratch.extension(dirs) is None:
        log("building the native extension in the scratch copy (from clean the first time, then only what changed) ...")
        try:
            build_seconds, build_log = build(scratch, "build-clean.log")
        except RuntimeError as err:
            log(str(err))
            return 2
        so = scratch.extension(dirs)
        log(f"  built in {build_seconds:.0f} s ({build_log}): {so or 'no extension (pure-Python install)'}")
        if so is not None:
            save_pristine(scratch, dirs)
        stamp_file.write_text(stamp)
    so = scratch.extension(dirs)
    so_digest = file_digest(so) if so else None
    make_layout(scratch, dirs)

    results = []
    clean: dict[tuple, Outcome] = {}
    if args.probe:
        return probe_faults(scratch, dirs, faults, args, so_digest)
    if args.clean_check:
        selections = list(dict.fromkeys(f.selection for f in faults))
        log(f"\nclean check: {len(selections)} selection(s) on the unpatched copy")
        for i, sel in enumerate(selections):
            o = run_selection(scratch, sel, args.timeout, f"clean-{i:02d}")
            clean[sel] = o
            log(f"  {o.status:8s} {o.seconds:6.1f} s  {' '.join(sel)}  [{o.summary}]")

    log(f"\n{len(faults)} fault(s)")
    for fault in faults:
        res = {"name": fault.name, "path": fault.path, "selection": fmt_selection(fault), "build_s": None}
        if fault.needs and not cpu_has(fault.needs):
            res.update(status="n/a", seconds=0.0, detail=f"the faulty path runs only on a CPU with {fault.needs}")
            results.append(res)
            log(f"  {'n/a':8s} {0.0:6.1f} s  {fault.name}: {res['detail']}")
            continue
        c = clean.get(fault.selection)
        if c is not None and c.status != "passed":
            res.update(status="dirty", seconds=0.0, detail=f"the selection {c.status} unpatched: {c.summary}")
            results.append(res)
            log(f"  {'dirty':8s} {0.0:6.1f} s  {fault.name}: {res['detail']}")
            continue
        t0 = time.monotonic()
        marker.write_text(fault.name)
        try:
            raw, st = apply_fault(fault, scratch.repo)
        except Stale as err:
            marker.unlink()
            res.update(status="stale", seconds=0.0, detail=str(err))
            results.append(res)
            log(f"  {'stale':8s} {0.0:6.1f} s  {fault.name}: {err}")
            continue
        try:
            if fault.native:
                if so is None:
                    raise RuntimeError("no native extension is built here: a csrc/ fault cannot run")
                res["build_s"], _ = build(scratch, f"build-{fault.name}.log")
            o = run_selection(scratch, fault.selection, args.timeout, fault.name)
            status = {"failed": "caught", "passed": "passed"}.get(o.status, o.status)
            if fault.native and o.native is False and status in ("caught", "passed"):
                status, o.summary = "error", "the tests ran without the native extension: " + o.summary
            res.update(status=status, detail=o.summary, first_failure=o.first_failure)
        except RuntimeError as err:
            res.update(status="error", detail=str(err))
        finally:
            undo_fault(fault, scratch, dirs, raw, st, so, so_digest)
            marker.unlink()
        res["seconds"] = time.monotonic() - t0
        results.append(res)
        built = f" (build {res['build_s']:.0f} s)" if res["build_s"] else ""
        log(f"  {res['status']:8s} {res['seconds']:6.1f} s  {fault.name}{built}: "
            f"{res.get('first_failure') or res['detail']}")

    total = time.monotonic() - t_start
    counts = {s: sum(r["status"] == s for r in results) for s in ("caught", "passed", "stale", "dirty", "timeout",
                                                                    "error", "n/a")}
    log(f"\n{'fault':45s} {'result':8s} {'time':>8s}")
    for r in results:
        log(f"{r['name']:45s} {r['status']:8s} {r['seconds']:7.1f}s")
    log(f"\n{', '.join(f'{v} {k}' for k, v in counts.items() if v)}; total {total / 60:.1f} min"
        + (f"; clean native build {build_seconds:.0f} s" if build_seconds else ""))
    report = {"results": results, "counts": counts, "total_s": total, "clean_build_s": build_seconds,
              "clean": {" ".join(k): vars(v) for k, v in clean.items()}}
    (scratch.state / "last-run.json").write_text(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if results and counts["caught"] == len(results) - counts["n/a"] else 1


def probe_faults(scratch: Scratch, dirs, faults: list[Fault], args, so_digest) -> int:
    """--probe: each fault's probe clean and patched; every fault must change its probe's output."""
    so = scratch.extension(dirs)
    marker = scratch.state / "in-progress"
    ok = True
    for fault in faults:
        t0 = time.monotonic()
        try:
            clean, _ = run_probe(scratch, fault.probe, args.timeout, fault.name + "-clean")
            marker.write_text(fault.name)
            raw, st = apply_fault(fault, scratch.repo)
        except (Stale, RuntimeError, subprocess.TimeoutExpired) as err:
            marker.unlink(missing_ok=True)
            log(f"  {'error':9s} {fault.name}: {err}")
            ok = False
            continue
        try:
            if fault.native:
                build(scratch, f"build-{fault.name}.log")
            patched, _ = run_probe(scratch, fault.probe, args.timeout, fault.name)
            verdict = compare(clean, patched)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            verdict = f"error: {err}"
        finally:
            undo_fault(fault, scratch, dirs, raw, st, so, so_digest)
            marker.unlink()
        ok &= verdict.startswith("changed")
        log(f"  {time.monotonic() - t0:6.1f} s  {fault.name}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
