"""Run a pytest selection inside a qemu guest booted from Debian's stock kernel (the VM tier).

The host kernel lacks features podnet uses (IPIP's tunl0), so those tests run in a guest: Debian's generic kernel
under software emulation, the host's root filesystem shared read-only (9p) with a tmpfs overlay, so the guest runs
the host's venv and checkout as they are. The kernel and a small initramfs are prepared once into a cache outside
the checkout; each run is one boot, one pytest process. The guest writes pytest's status, log and JUnit report into a
read-write share; the host returns that status and copies the report. Standard library only: this runs before and
outside the project's venv.

    python3 tests/vm/runner.py [--junitxml FILE] [--timeout S] [-- PYTEST ARGS]   (default: -m needs_ipip tests)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import lzma
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent.parent
CACHE = Path(os.environ.get("PODNET_VM_CACHE", "/var/cache/podnet-vm"))
META_PACKAGE = "linux-image-amd64"  # Debian's generic kernel (the cloud flavour has no 9p)
BUSYBOX = Path("/bin/busybox")  # from busybox-static: the initramfs needs a binary with no shared libraries
# What stage 1 needs to mount the host root; everything else loads on demand from the module tree.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Every test that needs IPIP, wherever it lives; the netns suite's other tests stay on the host.
DEFAULT_SELECTION = ["-q", "-rs", "-m", "needs_ipip", "tests/vm", "tests/netns"]
NO_RESULT = 125  # our status when the guest produced no result (crash, hang, boot failure)


def log(msg: str) -> None:
    print(f"vm-test: {msg}", flush=True)


def run(*cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"vm-test: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# --- kernel -------------------------------------------------------------------------------------------------------


def kernel_package() -> tuple[str, str]:
    """The versioned kernel package the generic meta-package points at, and its candidate version (from apt's
    local lists, so a prepared cache needs no network)."""
    name = os.environ.get("PODNET_VM_KERNEL_PACKAGE")
    if not name:
        for line in run("apt-cache", "depends", META_PACKAGE).splitlines():
            dep = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
                name = dep
                break
    if not name:
        raise SystemExit(f"vm-test: cannot tell which kernel {META_PACKAGE} depends on (apt-get update?)")
    version = ""
    for line in run("apt-cache", "show", "--no-all-versions", name).splitlines():
        if line.startswith("Version:"):
            version = line.split(":", 1)[1].strip()
    if not version:
        raise SystemExit(f"vm-test: apt knows no version of {name}")
    return name, version


def extract_vmlinux(vmlinuz: Path, dest: Path) -> None:
    """The uncompressed ELF kernel: qemu boots it directly (PVH), which saves the guest decompressing bzImage
    under emulation (seconds). Debian compresses its kernel with xz."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    while start >= 0:
        with contextlib.suppress(lzma.LZMAError):
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
            if out[:4] == b"\x7fELF":
                dest.write_bytes(out)
                return
        start = data.find(b"\xfd7zXZ\x00", start + 1)
    raise SystemExit(f"vm-test: no xz-compressed ELF kernel inside {vmlinuz}")


def download(name: str, version: str, dest: Path) -> None:
    cmd = ("apt-get", "download", "-q", f"{name}={version}")
    if subprocess.run(cmd, cwd=dest, capture_output=True, check=False).returncode != 0:
        log("apt-get download failed; refreshing the package lists once")  # a stale list names a removed .deb
        run("apt-get", "update", "-qq")
        run(*cmd, cwd=dest)


def prepare_kernel(name: str, version: str) -> Path:
    """Download, unpack and depmod the kernel package once; returns its cache directory."""
    kdir = CACHE / f"{name}_{version}"
    if (kdir / "ready").exists():
        return kdir
    log(f"preparing {name} {version} into {kdir}")
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=CACHE))
    try:
        os.chmod(work, 0o755)  # apt's sandbox user downloads into it
        download(name, version, work)
        deb = next(work.glob("*.deb"))
        root = work / "root"
        run("dpkg-deb", "-x", str(deb), str(root))
        deb.unlink()
        kver = next((root / "lib/modules").iterdir()).name
        # The .deb ships no modules.dep: kmod's depmod writes the index modprobe (and the kernel's autoload) reads.
        run("depmod", "-b", str(root), kver)
        extract_vmlinux(root / f"boot/vmlinuz-{kver}", work / "vmlinux")
        (work / "kver").write_text(kver + "\n")
        (work / "ready").write_text(f"{name} {version}\n")
        if kdir.exists():
            shutil.rmtree(kdir)
        work.rename(kdir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return kdir


# --- initramfs ----------------------------------------------------------------------------------------------------


def module_load_order(moddir: Path, wanted: Iterable[str]) -> list[str]:
    """Module paths (relative to moddir) in an order insmod accepts: every dependency before its user."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.removesuffix(".ko").replace("-", "_")] = path
    builtin = {
        Path(line).name.removesuffix(".ko").replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise SystemExit(f"vm-test: the guest kernel has no module {name}")
    return order


class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks as initramfs; no root needed for device nodes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.buf += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.buf)


def prepare_initramfs(kdir: Path) -> Path:
    kver = (kdir / "kver").read_text().strip()
    moddir = kdir / "root/lib/modules" / kver
    init = (HERE / "init").read_bytes()
    busybox = BUSYBOX.read_bytes()
    modules = module_load_order(moddir, INITRAMFS_MODULES)
    digest = hashlib.sha256(init + busybox + "\n".join(modules).encode()).hexdigest()[:12]
    path = kdir / f"initramfs-{digest}.cpio"
    if path.exists():
        return path
    cpio = Cpio()
    for d in ("bin", "dev", "modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)  # init's stdio before devtmpfs is mounted
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", init, 0o755)
    for rel in modules:
        cpio.file(f"modules/{Path(rel).name}", (moddir / rel).read_bytes())
    cpio.file("modules/order", "".join(f"{Path(rel).name}\n" for rel in modules).encode())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(cpio.finish())
    tmp.rename(path)
    return path


# --- boot ---------------------------------------------------------------------------------------------------------


def qemu_command(kdir: Path, initramfs: Path, out: Path, memory: str, cpus: int) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("vm-test: qemu-system-x86_64 not found (scripts/vm-test installs qemu-system-x86)")
    # Kernel messages only on request (PODNET_VM_VERBOSE=1, for boot problems): printing them is slow under emulation.
    cmdline = "console=ttyS0 panic=-1 mitigations=off" + ("" if os.environ.get("PODNET_VM_VERBOSE") else " quiet")
    return [
        qemu,
        "-machine", "pc",
        # This machine's /dev/kvm does not boot Debian's kernel: software emulation (measured: boot to init ~3 s).
        "-accel", "tcg,thread=multi",
        "-cpu", "qemu64",
        "-smp", str(cpus),
        "-m", memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
        "-serial", "stdio",
        "-kernel", str(kdir / "vmlinux"),
        "-initrd", str(initramfs),
        "-append", cmdline,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={out},mount_tag=podnetout,security_model=none,multidevs=remap",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip


def write_job(out: Path, kdir: Path, python: str, pytest_args: list[str]) -> None:
    kver = (kdir / "kver").read_text().strip()
    job = [
        "# Written by tests/vm/runner.py: stage 2 of the guest (tests/vm/guest.sh) with this run's parameters.",
        f"PODNET_TOP={shlex.quote(str(TOP))}",
        f"PODNET_VM_MODULES={shlex.quote(str(kdir / 'root/lib/modules'))}",
        f"PODNET_VM_KVER={shlex.quote(kver)}",
        f"PODNET_VM_PYTHON={shlex.quote(python)}",
        "export PODNET_TOP PODNET_VM_MODULES PODNET_VM_KVER PODNET_VM_PYTHON",
        "set -- " + " ".join(shlex.quote(a) for a in pytest_args),
        f". {shlex.quote(str(HERE / 'guest.sh'))}",
    ]
    (out / "job.sh").write_text("\n".join(job) + "\n")


def boot(cmd: list[str], console: Path, timeout: float) -> int | None:
    """Run qemu, mirroring the guest console to our stdout and to ``console``; None if it timed out."""
    with open(console, "wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None

        def pump() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                logf.write(line)
                sys.stdout.buffer.write(line.replace(b"\r", b""))
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            status: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its handle
            proc.wait()
            status = None
        reader.join(timeout=5)
    return status


def selection(user_args: list[str]) -> list[str]:
    """Options alone (``-x``, ``-k name``: what ``scripts/test -- ARGS`` hands every suite) refine the default
    selection; naming a test path or node id replaces it."""
    names_tests = any("::" in a or (not a.startswith("-") and (TOP / a).exists()) for a in user_args)
    return user_args if names_tests else [*DEFAULT_SELECTION, *user_args]


LOCKUP_SIGNS = ("soft lockup", "rcu_preempt detected stalls")


def run_guest(args: argparse.Namespace, kdir: Path, initramfs: Path, pytest_args: list[str]) -> tuple[int, bool]:
    """One boot: the pytest status (NO_RESULT when the guest gave none) and whether the guest's kernel reported
    stuck CPUs on its console."""
    with tempfile.TemporaryDirectory(prefix="podnet-vm-out-") as tmp:
        out = Path(tmp)
        write_job(out, kdir, args.python, pytest_args)
        console = out / "console.log"
        log(f"booting {kdir.name} (pytest {' '.join(pytest_args)})")
        status = boot(qemu_command(kdir, initramfs, out, args.memory, args.cpus), console, args.timeout)
        rc_file = out / "rc"
        if status is None:
            log(f"guest timed out after {args.timeout:.0f} s")
            rc = NO_RESULT
        elif not rc_file.exists():
            log(f"guest ended (qemu status {status}) without a result")
            rc = NO_RESULT
        else:
            rc = int(rc_file.read_text().strip() or NO_RESULT)
        report = out / "report.xml"
        if args.junitxml and report.exists():
            Path(args.junitxml).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report, args.junitxml)
        hang = False
        if rc != 0:
            logdir = Path(args.log_dir)
            logdir.mkdir(parents=True, exist_ok=True)
            saved = logdir / f"console-{time.strftime('%Y%m%dT%H%M%S')}.log"
            shutil.copyfile(console, saved)
            log(f"guest console saved to {saved}")
            text = console.read_text(errors="replace") if console.exists() else ""
            hang = rc == NO_RESULT and any(sign in text for sign in LOCKUP_SIGNS)
    return rc, hang


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--junitxml", help="copy the guest's JUnit report here")
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("PODNET_VM_TIMEOUT", "540")),
        help="seconds from boot to result before the guest is killed (default 540: the tier's budget is 10 min)",
    )
    parser.add_argument(
        "--python",
        default=os.environ.get("PODNET_VM_PYTHON", str(TOP / ".venv/bin/python")),
        help="the host venv's interpreter the guest runs pytest with (default: the checkout's .venv)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=int(os.environ.get("PODNET_VM_CPUS", str(min(2, os.cpu_count() or 1)))),
        help="guest vCPUs, each an emulation thread on the host (default: up to 2)",
    )
    parser.add_argument("--memory", default=os.environ.get("PODNET_VM_MEMORY", "1536"), help="guest RAM, MiB")
    parser.add_argument(
        "--log-dir",
        default=os.environ.get("PODNET_VM_LOG_DIR", str(CACHE / "logs")),
        help="where the guest console is saved when the run fails",
    )
    parser.add_argument(
        "pytest_args",
        nargs="*",
        help="pytest options added to the default selection (the needs_ipip tests of tests/vm and tests/netns), "
        "or test paths that replace it",
    )
    args = parser.parse_args(argv)
    pytest_args = selection(args.pytest_args)
    if not os.access(args.python, os.X_OK):
        raise SystemExit(f"vm-test: no interpreter at {args.python} (run scripts/bootstrap, or pass --python)")

    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs must not prepare the same cache at once
        kdir = prepare_kernel(*kernel_package())
        initramfs = prepare_initramfs(kdir)
    prepared = time.monotonic()

    for attempt in (1, 2):
        rc, emulator_hang = run_guest(args, kdir, initramfs, pytest_args)
        elapsed = time.monotonic() - prepared
        if rc == 0 or not emulator_hang or attempt == 2:
            break
        # The guest's own kernel reported CPUs stuck (soft lockup / RCU stall) and the run produced no result: the
        # emulator, not a test, failed (seen once in three runs under TCG). One more boot; a test failure or a hang
        # without those reports is never retried.
        log("guest kernel reported a soft lockup under emulation and gave no result: booting once more")
    log(f"pytest status {rc}; prepare {prepared - started:.1f} s, boot + tests {elapsed:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
