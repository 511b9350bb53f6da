#!/usr/bin/env bash
# The control plane image's file system, assembled from one binary:
#
#   deploy/images/rootfs.sh BINARY OUT
#
# writes OUT/rootfs (everything owned by root) and OUT/data (the empty data
# directory, /var/lib/apitokens, owned by 65532 in the image). The build stage
# of deploy/images/Containerfile runs it on the release binary it compiled;
# scripts/images.sh runs it on the host and hands OUT to the same Containerfile
# in place of that stage (podman build --build-context build=DIR): one recipe
# for the runtime layout, whichever way it is built.
#
# What goes in:
#   /usr/local/bin/apitokens          BINARY, stripped
#   the shared libraries ldd lists    glibc (libc, libm, the loader) and libgcc_s,
#                                     copied from the machine that built BINARY
#                                     (the same Debian 12 glibc it was linked against)
#   /etc/passwd, /etc/group           root and apitokens (65532)
#   /etc/nsswitch.conf                hosts: files dns; glibc >= 2.34 has both built
#                                     in, so getaddrinfo (tokio-postgres resolving the
#                                     database's host) needs no libnss_* module
#   /etc/ssl/certs/ca-certificates.crt  the system roots (a PostgreSQL store with
#                                     sslmode=verify-full and no sslrootcert)
#   /tmp                              1777
# /etc/hosts and /etc/resolv.conf are left to the container runtime, which
# mounts its own.
set -euo pipefail
umask 022

[ $# -eq 2 ] || { echo "usage: $0 BINARY OUT" >&2; exit 2; }
binary=$1 out=$2
[ -x "$binary" ] || { echo "rootfs.sh: $binary: no such executable" >&2; exit 1; }
certs=/etc/ssl/certs/ca-certificates.crt
[ -r "$certs" ] || { echo "rootfs.sh: $certs missing (Debian's ca-certificates)" >&2; exit 1; }

rm -rf "$out/rootfs" "$out/data"
root=$out/rootfs
install -d -m 0755 "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/var/lib"
install -d -m 1777 "$root/tmp"
install -d -m 0755 "$out/data"

strip -o "$root/usr/local/bin/apitokens" "$binary"
chmod 0755 "$root/usr/local/bin/apitokens"

# ldd: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and the loader
# "/lib64/ld-linux-x86-64.so.2 (0x...)"; nothing for a static binary.
libs=$(ldd "$binary" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' || true)
if [ -z "$libs" ] && ! LC_ALL=C ldd "$binary" 2>&1 | grep -Eq 'not a dynamic executable|statically linked'; then
  echo "rootfs.sh: ldd $binary: no libraries listed" >&2; exit 1
fi
for lib in $libs; do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done

printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
  'apitokens:x:65532:65532:apitokens:/var/lib/apitokens:/sbin/nologin' >"$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'apitokens:x:65532:' >"$root/etc/group"
printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
install -m 0644 "$certs" "$root/etc/ssl/certs/ca-certificates.crt"
