# The package's install test on this kernel, where the host shares a clean Debian 12 (9p, tag
# `debian`; only the VMs that run it have one): dpkg installs the package there, then the
# same checks as the host's install test, in a chroot with this VM's /proc, /sys and cgroup2.
if modprobe virtio_pci 2>/dev/null; modprobe 9pnet_virtio 2>/dev/null && modprobe 9p 2>/dev/null && mkdir -p /debian \
    && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 debian /debian 2>/dev/null; then
    echo "NBT-VM-INSTALL $(ls /debian | wc -l) entries in the shared Debian 12"
    mount -t proc proc /debian/proc; mount -t sysfs sys /debian/sys; mount -t devtmpfs dev /debian/dev
    mount -t tmpfs run /debian/run
    mount -t cgroup2 none /debian/sys/fs/cgroup; mount -t bpf bpf /debian/sys/fs/bpf
    # The receipt store on a tmpfs: SQLite's shared memory wants mmap, which 9p does not give.
    mkdir -p /debian/var/lib/nbt && mount -t tmpfs nbt /debian/var/lib/nbt
    # man-db's index cache (gdbm) fails on 9p in the same way.
    mount -t tmpfs man /debian/var/cache/man
    # Under emulation and over 9p, dpkg's fsync of each file and man-db's index rebuild at each
    # install and removal took over 5 minutes: off, as container images have them (the man
    # page is still found: `man` looks pages up without the index).
    echo force-unsafe-io > /debian/etc/dpkg/dpkg.cfg.d/nbt-vm-unsafe-io
    rm -f /debian/var/lib/man-db/auto-update
    cp /install-checks.sh /debian/tmp/
    chroot /debian /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 /bin/sh /tmp/install-checks.sh
else
    echo "NBT-DIST-TEST share FAIL the clean Debian 12 shared by the host could not be mounted: $(modprobe 9pnet_virtio 2>&1; modprobe 9p 2>&1; mount -t 9p -o trans=virtio,version=9p2000.L debian /debian 2>&1)"
fi

