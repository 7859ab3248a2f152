#!/usr/bin/env bash
# Benchmark: objfs (local store) vs the native directory vs `rclone mount` of a local
# directory, side by side in one run, on the same disk. Prints absolute figures and
# ratios. Not part of the test suite. Run as root: scripts/bench.sh
#   BENCH_MB=1024       size of the sequential write/read files
#   BENCH_RSS_MB=4096   size written for the peak-RSS check
#   BENCH_FILES=20000   files for the create / ls -l workload
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

MB=${BENCH_MB:-1024}
RSS_MB=${BENCH_RSS_MB:-4096}
NFILES=${BENCH_FILES:-20000}

need=()
command -v rclone >/dev/null || need+=(rclone)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v bc >/dev/null || need+=(bc)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked -q
OBJFS=$PWD/target/release/objfs

W=$(mktemp -d /var/tmp/objfs-bench.XXXXXX)
NATIVE=$W/native STORE=$W/store MNT=$W/objfs RSRC=$W/rclone-src RMNT=$W/rclone RCACHE=$W/rclone-cache
mkdir -p "$NATIVE" "$MNT" "$RSRC" "$RMNT" "$RCACHE"

cleanup() {
    set +e
    mountpoint -q "$MNT" && { "$OBJFS" umount "$MNT" || umount -l "$MNT"; }
    mountpoint -q "$W/rss" && { "$OBJFS" umount "$W/rss" || umount -l "$W/rss"; }
    mountpoint -q "$RMNT" && { fusermount3 -u "$RMNT" || umount -l "$RMNT"; }
    rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

objfs_mount() { "$OBJFS" mount "$STORE" "$MNT" --log-file "$W/objfs.log" "$@" >/dev/null; }
objfs_remount() { "$OBJFS" umount "$MNT"; objfs_mount; }
rclone_mount() {
    env -u AWS_CA_BUNDLE rclone mount "$RSRC" "$RMNT" --vfs-cache-mode full \
        --cache-dir "$RCACHE" --daemon --log-file "$W/rclone.log"
    for _ in $(seq 100); do mountpoint -q "$RMNT" && return; sleep 0.1; done
    echo "rclone mount did not come up" >&2; exit 1
}
rclone_remount_cold() {
    # rclone uploads in the background after close; wait until the backend has the
    # whole file before dropping its cache, or the "cold" read would find nothing.
    for _ in $(seq 1200); do
        [ "$(stat -c %s "$RSRC/big" 2>/dev/null)" = $((MB << 20)) ] && break
        sleep 0.5
    done
    fusermount3 -u "$RMNT"; rm -rf "${RCACHE:?}"/*; rclone_mount
}

echo "== preparing ${MB} MiB of random data and a source tree"
head -c $((MB << 20)) /dev/urandom > "$W/src.bin"
SRCROOT=$(ls -d ~/.cargo/registry/src/*/ | head -1)
( cd "$SRCROOT" && ls ) | sed -n "1,200p" > "$W/dirs"
tar -C "$SRCROOT" -cf "$W/src.tar" -T "$W/dirs"
TARFILES=$(tar -tf "$W/src.tar" | grep -vc '/$')
cat "$W/src.bin" > /dev/null

objfs_mount
rclone_mount

declare -A R
FAILED=()
run() { # name dir command...   (a failing command is timed anyway and reported)
    local name=$1 dir=$2; shift 2
    local t0 t1
    t0=$(now)
    if ! ( cd "$dir" && "$@" ) >/dev/null 2>&1; then FAILED+=("$name"); fi
    t1=$(now)
    R[$name]=$(secs "$t0" "$t1")
}

echo "== sequential write ${MB} MiB (dd bs=1M conv=fsync)"
for fs in native objfs rclone; do
    case $fs in native) d=$NATIVE;; objfs) d=$MNT;; rclone) d=$RMNT;; esac
    drop_caches
    run "write_$fs" "$d" dd if="$W/src.bin" of=big bs=1M conv=fsync
done

echo "== cold sequential read ${MB} MiB (after remount, caches dropped)"
objfs_remount
rclone_remount_cold
for fs in native objfs rclone; do
    case $fs in native) d=$NATIVE;; objfs) d=$MNT;; rclone) d=$RMNT;; esac
    drop_caches
    run "read_$fs" "$d" dd if=big of=/dev/null bs=1M
done

echo "== create ${NFILES} empty files, then ls -l"
for fs in native objfs rclone; do
    case $fs in native) d=$NATIVE;; objfs) d=$MNT;; rclone) d=$RMNT;; esac
    mkdir "$d/many"
    run "create_$fs" "$d/many" bash -c "seq 1 $NFILES | xargs touch"
    run "ls_$fs" "$d/many" ls -l
done

echo "== extract a tarball of ${TARFILES} files, then cp -a it back out"
for fs in native objfs rclone; do
    case $fs in native) d=$NATIVE;; objfs) d=$MNT;; rclone) d=$RMNT;; esac
    mkdir "$d/x"
    run "untar_$fs" "$d/x" tar -xf "$W/src.tar"
    run "cpout_$fs" "$d" cp -a x "$W/out-$fs"
done

echo "== peak daemon RSS writing ${RSS_MB} MiB with --memory-limit 256M"
mkdir -p "$W/rss"
"$OBJFS" mount "$W/rss-store" "$W/rss" --memory-limit 256M --log-file "$W/rss.log" >/dev/null
PID=$(pgrep -f "objfs mount $W/rss-store" | head -1)
( for _ in $(seq $((RSS_MB / MB))); do cat "$W/src.bin"; done ) | dd of="$W/rss/big" bs=1M conv=fsync status=none
PEAK_KB=$(awk '/VmHWM/ {print $2}' /proc/"$PID"/status)
"$OBJFS" umount "$W/rss"

mbps() { echo "$MB / $1" | bc -l; }
ratio() { echo "$1 / $2" | bc -l; }
printf '\n%-34s %12s %12s %12s %10s %10s\n' workload native objfs rclone obj/nat obj/rcl
line() { # label unit native objfs rclone higher-is-better(1/0)
    local n=$3 o=$4 r=$5
    if [ "$6" = 1 ]; then
        printf '%-34s %12.1f %12.1f %12.1f %9.2fx %9.2fx\n' "$1 ($2)" "$n" "$o" "$r" "$(ratio "$o" "$n")" "$(ratio "$o" "$r")"
    else
        printf '%-34s %12.2f %12.2f %12.2f %9.2fx %9.2fx\n' "$1 ($2)" "$n" "$o" "$r" "$(ratio "$o" "$n")" "$(ratio "$o" "$r")"
    fi
}
line "seq write ${MB}M, conv=fsync" "MB/s" "$(mbps "${R[write_native]}")" "$(mbps "${R[write_objfs]}")" "$(mbps "${R[write_rclone]}")" 1
line "cold seq read ${MB}M" "MB/s" "$(mbps "${R[read_native]}")" "$(mbps "${R[read_objfs]}")" "$(mbps "${R[read_rclone]}")" 1
line "create ${NFILES} files" "s" "${R[create_native]}" "${R[create_objfs]}" "${R[create_rclone]}" 0
line "ls -l ${NFILES} files" "s" "${R[ls_native]}" "${R[ls_objfs]}" "${R[ls_rclone]}" 0
line "tar x ${TARFILES} files" "s" "${R[untar_native]}" "${R[untar_objfs]}" "${R[untar_rclone]}" 0
line "cp -a ${TARFILES} files out" "s" "${R[cpout_native]}" "${R[cpout_objfs]}" "${R[cpout_rclone]}" 0
printf '%-34s %12s %12s\n' "peak RSS, ${RSS_MB}M write, 256M limit" "-" "$((PEAK_KB / 1024)) MiB"
echo
[ ${#FAILED[@]} -eq 0 ] || echo "commands that reported errors (timed anyway): ${FAILED[*]}"
echo "For time rows a ratio below 1 is faster than the peer; for MB/s rows above 1."
echo "rclone's write figure flatters it: its fsync returns before its upload completes,"
echo "while objfs's data is in its store when dd returns."
