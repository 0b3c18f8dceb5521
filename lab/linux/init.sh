#!/bin/busybox sh
# /init of the real Linux lab guest (lab/linux/build.py packs it with busybox and Debian's
# virtio modules). It loads the drivers, makes traffic on every virtio device, and reports on
# the serial console, one `VRA-LINUX <what> ...` line per fact, what Linux sees:
#   dev   name= id= status= driver= pci=     one per /sys/bus/virtio/devices/* entry
#   irq   <a /proc/interrupts line>          the virtio lines
#   phase report | ready | round N | final | done   (dev and irq lines follow report, final)
# The host breaks a device after `phase ready`; the rounds that follow keep using every device
# (readers of a dead device block: they run in the background and are never waited for).
# Status is read (sysfs) only at `ready` and `done`: a Linux driver never reads it by itself,
# and the rounds in between are what the agent must judge without that read.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

ROUNDS=6
for arg in $(cat /proc/cmdline); do
    case "$arg" in vra.rounds=*) ROUNDS=${arg#vra.rounds=} ;; esac
done

say() { echo "VRA-LINUX $*" > /dev/ttyS0; }

say phase boot
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         virtio-rng failover net_failover virtio_net virtio_blk; do
    out=$(insmod /lib/modules/$m.ko 2>&1) || say error insmod $m: $out
done

report() {
    for d in /sys/bus/virtio/devices/*; do
        [ -e "$d" ] || continue
        drv=none
        [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
        pci=$(basename "$(dirname "$(readlink -f "$d")")")
        say dev name=$(basename "$d") id=$(cat "$d/device") status=$(cat "$d/status") \
            driver=$drv pci=$pci
    done
    grep virtio /proc/interrupts | while read -r line; do say irq $line; done
}

# wait (bounded) for the drivers to bind
n=0
while [ $n -lt 50 ]; do
    bound=1
    for d in /sys/bus/virtio/devices/*; do [ -e "$d/driver" ] || bound=0; done
    [ $bound = 1 ] && break
    sleep 0.1
    n=$((n + 1))
done

NET=
for i in /sys/class/net/*; do
    [ "$(basename "$(readlink -f "$i/device/driver" 2>/dev/null)")" = virtio_net ] && NET=$(basename "$i")
done
if [ -n "$NET" ]; then
    ip link set lo up
    ip link set "$NET" up
    ip addr add 10.0.2.15/24 dev "$NET"
fi

traffic() {
    # $1: round number (block offsets differ per round so the page cache never answers)
    if [ -e /dev/hwrng ]; then
        (timeout -s KILL 3 dd if=/dev/hwrng of=/dev/null bs=16 count=2 2>/dev/null &)
    fi
    if [ -n "$NET" ]; then
        (ping -c 1 -W 1 10.0.2.2 > /dev/null 2>&1 &)
    fi
    if [ -e /dev/vda ]; then
        # O_DIRECT: the page cache (filled by the partition scan's readahead) never answers
        (dd if=/dev/vda of=/dev/null bs=4096 count=4 skip=$(($1 * 8)) iflag=direct 2>/dev/null &)
    fi
}

traffic 0
sleep 1
traffic 1
sleep 1
say phase report
report
say phase ready
sleep 2
r=2
while [ $r -lt $((ROUNDS + 2)) ]; do
    traffic $r
    sleep 1
    say phase round $r
    grep virtio /proc/interrupts | while read -r line; do say irq $line; done
    r=$((r + 1))
done
say phase final
report
say phase done
poweroff -f
