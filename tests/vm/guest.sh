# Stage 2 of the VM tier's guest, run as PID 1 by the host's /bin/sh once stage 1 (tests/vm/init) has made the host's
# root filesystem the guest's root (read-only 9p + tmpfs overlay). The host's job.sh sets PODNET_TOP (the checkout),
# PODNET_VM_MODULES (the unpacked kernel's module tree), PODNET_VM_PYTHON (a host venv's interpreter) and the pytest
# arguments, then sources this file.
# Results go to the read-write share on /run/podnet-vm: rc, report.xml, pytest.log. The guest then exits qemu.
set -u
# The venv first, as tox and an activated venv have it (console scripts: podnet-agent, agentctl).
export PATH="$(dirname "$PODNET_VM_PYTHON")":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PODNET_VM_GUEST=1
out=/run/podnet-vm

finish() {
    echo "$1" > "$out/rc"
    sync
    # isa-debug-exit ends qemu at once (its exit status is (byte << 1) | 1); the rc file is the real result.
    code=$1
    [ "$code" -gt 127 ] && code=127
    printf "\\$(printf '%03o' "$code")" | dd of=/dev/port bs=1 seek=244 count=1 status=none
    echo o > /proc/sysrq-trigger  # not reached unless the debug-exit device is missing
}

mkdir -p /dev/shm /dev/pts /run/lock /lib/modules
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t devpts devpts /dev/pts
# Module autoloading (bridge, veth, iptables tables, ipset types) goes through the host's kmod against the guest
# kernel's own module tree, which the runner unpacked and depmod-ed on the host.
mount --bind "$PODNET_VM_MODULES" /lib/modules || { echo "podnet-vm: cannot bind the module tree"; finish 124; }
echo /sbin/modprobe > /proc/sys/kernel/modprobe
hostname podnet-vm
ip link set lo up
# A node that uses IPIP has the module loaded (Calico's tunl0 exists in every namespace from then on).
modprobe ipip || { echo "podnet-vm: modprobe ipip failed"; finish 124; }

echo "podnet-vm: kernel $(uname -r), running pytest $*"
cd "$PODNET_TOP" || finish 124
# dash has no pipefail: the status travels through a file.
{
    "$PODNET_VM_PYTHON" -m pytest -p no:cacheprovider --junitxml="$out/report.xml" "$@"
    echo $? > "$out/pytest.rc"
} 2>&1 | tee "$out/pytest.log"
finish "$(cat "$out/pytest.rc" 2>/dev/null || echo 124)"
