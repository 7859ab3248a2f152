#!/usr/bin/env bash
# Benchmark: objfs (local store) vs the native directory vs `rclone mount` of a local
# directory, side by side in one run, on the same disk. Prints absolute figures and
# ratios. Not part of the test suite. Run as root: scripts/bench.sh
# Column "uring" is objfs with --io-uring (requests through io_uring queues where the
# kernel has them: this script turns the fuse module's enable_uring switch on; "objfs"
# is the default, /dev/fuse). Column "floor" is examples/floorfs.rs: an in-memory FUSE
# filesystem over /dev/fuse that does no storage work, i.e. what FUSE itself costs on
# this machine through fuser.
#   BENCH_MB=1024       size of the sequential write/read files
#   BENCH_RSS_MB=4096   size written for the peak-RSS check
#   BENCH_FILES=20000   files for the create / ls -l workload
#   BENCH_ROUNDS=3      rounds of every workload; the table shows medians
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

MB=${BENCH_MB:-1024}
RSS_MB=${BENCH_RSS_MB:-4096}
NFILES=${BENCH_FILES:-20000}
ROUNDS=${BENCH_ROUNDS:-3}

need=()
command -v rclone >/dev/null || need+=(rclone)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v bc >/dev/null || need+=(bc)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked -q
cargo build --release --locked -q --example floorfs
OBJFS=$PWD/target/release/objfs
FLOORFS=$PWD/target/release/examples/floorfs

W=$(mktemp -d /var/tmp/objfs-bench.XXXXXX)
NATIVE=$W/native STORE=$W/store MNT=$W/objfs RSRC=$W/rclone-src RMNT=$W/rclone RCACHE=$W/rclone-cache
FLOOR=$W/floor USTORE=$W/store-uring UMNT=$W/uring
mkdir -p "$NATIVE" "$MNT" "$RSRC" "$RMNT" "$RCACHE" "$FLOOR" "$UMNT"
[ -e /sys/module/fuse ] || modprobe fuse 2>/dev/null || true
if [ -w /sys/module/fuse/parameters/enable_uring ]; then
    echo Y > /sys/module/fuse/parameters/enable_uring
fi

cleanup() {
    set +e
    mountpoint -q "$MNT" && { "$OBJFS" umount "$MNT" || umount -l "$MNT"; }
    mountpoint -q "$UMNT" && { "$OBJFS" umount "$UMNT" || umount -l "$UMNT"; }
    mountpoint -q "$W/rss" && { "$OBJFS" umount "$W/rss" || umount -l "$W/rss"; }
    mountpoint -q "$RMNT" && { fusermount3 -u "$RMNT" || umount -l "$RMNT"; }
    mountpoint -q "$FLOOR" && { umount "$FLOOR" || umount -l "$FLOOR"; }
    rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

objfs_mount() { "$OBJFS" mount "$STORE" "$MNT" --log-file "$W/objfs.log" "$@" >/dev/null; }
uring_mount() { "$OBJFS" mount "$USTORE" "$UMNT" --io-uring --log-file "$W/uring.log" >/dev/null; }
objfs_remount() { "$OBJFS" umount "$MNT"; objfs_mount; "$OBJFS" umount "$UMNT"; uring_mount; }
rclone_mount() {
    env -u AWS_CA_BUNDLE rclone mount "$RSRC" "$RMNT" --vfs-cache-mode full \
        --cache-dir "$RCACHE" --daemon --log-file "$W/rclone.log"
    for _ in $(seq 100); do mountpoint -q "$RMNT" && return; sleep 0.1; done
    echo "rclone mount did not come up" >&2; exit 1
}
rclone_wait_upload() {
    # rclone uploads in the background after close; wait (untimed) until the backend
    # has the whole file, so the upload neither overlaps the next measurement nor
    # leaves the "cold" read with nothing to read.
    for _ in $(seq 1200); do
        [ "$(stat -c %s "$RSRC/$1" 2>/dev/null)" = $((MB << 20)) ] && return
        sleep 0.5
    done
}
rclone_remount_cold() {
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
uring_mount
echo "uring: $(grep -o 'FUSE transport: .*' "$W/uring.log" | tail -1)"
rclone_mount
"$FLOORFS" "$FLOOR" 2>"$W/floorfs.log" &
for _ in $(seq 100); do mountpoint -q "$FLOOR" && break; sleep 0.1; done
mountpoint -q "$FLOOR" || { echo "floorfs did not come up" >&2; exit 1; }
# The same 4 MiB readahead objfs sets on its own mount (1 MiB read requests).
echo 4096 > "/sys/class/bdi/$(mountpoint -d "$FLOOR")/read_ahead_kb"

# Each transaction commits (fsync of the WAL); after ~1000 pages the WAL wraps and is
# overwritten in place: small overwrites inside blocks, then fsync.
SQLITE_PY="
import sqlite3
c = sqlite3.connect('t.db'); c.execute('pragma journal_mode=wal')
c.execute('create table t(x integer, y text)')
for i in range(2000):
    with c:
        for j in range(20): c.execute('insert into t values(?, ?)', (i * 20 + j, 'y' * 100))
"

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

dir_of() { case $1 in native) echo "$NATIVE";; objfs) echo "$MNT";; uring) echo "$UMNT";; rclone) echo "$RMNT";; floor) echo "$FLOOR";; esac; }
median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
keep_median() { # name: R[name] = median of R[name.1] .. R[name.ROUNDS]
    local vals=() r
    for r in $(seq "$ROUNDS"); do vals+=("${R[$1.$r]}"); done
    R[$1]=$(median "${vals[@]}")
}
FSES="native objfs uring rclone floor"

for r in $(seq "$ROUNDS"); do
    echo "== round $r of $ROUNDS: sequential write ${MB} MiB (dd bs=1M conv=fsync)"
    for fs in $FSES; do
        drop_caches
        cat "$W/src.bin" > /dev/null # the source comes from memory: time the destination
        run "write_$fs.$r" "$(dir_of $fs)" dd if="$W/src.bin" of="big$r" bs=1M conv=fsync
        if [ $fs = rclone ]; then rclone_wait_upload "big$r"; fi
    done

    echo "== round $r of $ROUNDS: cp of that file within the same filesystem"
    for fs in $FSES; do
        drop_caches
        run "copy_$fs.$r" "$(dir_of $fs)" cp "big$r" "copy$r"
        if [ $fs = rclone ]; then rclone_wait_upload "copy$r"; fi
        if [ $fs = floor ]; then : > "$FLOOR/copy$r"; else rm -f "$(dir_of $fs)/copy$r"; fi
    done

    echo "== round $r of $ROUNDS: cold sequential read ${MB} MiB (after remount, caches dropped)"
    objfs_remount
    rclone_remount_cold
    for fs in $FSES; do
        drop_caches
        run "read_$fs.$r" "$(dir_of $fs)" dd if="big$r" of=/dev/null bs=1M
    done
    : > "$FLOOR/big$r" # floorfs holds its files in memory

    echo "== round $r of $ROUNDS: create ${NFILES} empty files, then ls -l"
    for fs in $FSES; do
        d=$(dir_of $fs)
        mkdir "$d/many$r"
        run "create_$fs.$r" "$d/many$r" bash -c "seq 1 $NFILES | xargs touch"
        run "ls_$fs.$r" "$d/many$r" ls -l
    done

    echo "== round $r of $ROUNDS: extract a tarball of ${TARFILES} files, then cp -a it back out"
    for fs in $FSES; do
        d=$(dir_of $fs)
        mkdir "$d/x$r"
        run "untar_$fs.$r" "$d/x$r" tar -xf "$W/src.tar"
        run "cpout_$fs.$r" "$d" cp -a "x$r" "$W/out-$fs-$r"
    done

    echo "== round $r of $ROUNDS: SQLite in WAL mode, 2000 transactions of 20 inserts"
    for fs in native objfs; do
        d=$(dir_of $fs)
        mkdir "$d/sql$r"
        run "sqlite_$fs.$r" "$d/sql$r" python3 -c "$SQLITE_PY"
    done
done
for w in write copy read create ls untar cpout; do
    for fs in $FSES; do keep_median "${w}_$fs"; done
done
for fs in native objfs; do keep_median "sqlite_$fs"; done

echo "== peak daemon RSS writing ${RSS_MB} MiB with --memory-limit 256M"
mkdir -p "$W/rss"
"$OBJFS" mount "$W/rss-store" "$W/rss" --memory-limit 256M --log-file "$W/rss.log" >/dev/null
PID=$(pgrep -f "objfs mount $W/rss-store" | head -1)
( for _ in $(seq $((RSS_MB / MB))); do cat "$W/src.bin"; done ) | dd of="$W/rss/big" bs=1M conv=fsync status=none
PEAK_KB=$(awk '/VmHWM/ {print $2}' /proc/"$PID"/status)
"$OBJFS" umount "$W/rss"

mbps() { echo "$MB / $1" | bc -l; }
ratio() { echo "$1 / $2" | bc -l; }
printf '\n%-34s %10s %10s %10s %10s %10s %8s %8s %8s %8s %8s\n' workload native objfs uring rclone floor obj/nat uri/obj obj/rcl obj/flr flr/nat
line() { # label unit key higher-is-better(1/0)
    local n o d r f fmt
    if [ "$4" = 1 ]; then
        n=$(mbps "${R[$3_native]}") o=$(mbps "${R[$3_objfs]}") d=$(mbps "${R[$3_uring]}")
        r=$(mbps "${R[$3_rclone]}") f=$(mbps "${R[$3_floor]}")
        fmt='%-34s %10.1f %10.1f %10.1f %10.1f %10.1f %7.2fx %7.2fx %7.2fx %7.2fx %7.2fx\n'
    else
        n=${R[$3_native]} o=${R[$3_objfs]} d=${R[$3_uring]} r=${R[$3_rclone]} f=${R[$3_floor]}
        fmt='%-34s %10.2f %10.2f %10.2f %10.2f %10.2f %7.2fx %7.2fx %7.2fx %7.2fx %7.2fx\n'
    fi
    # shellcheck disable=SC2059
    printf "$fmt" "$1 ($2)" "$n" "$o" "$d" "$r" "$f" "$(ratio "$o" "$n")" "$(ratio "$d" "$o")" \
        "$(ratio "$o" "$r")" "$(ratio "$o" "$f")" "$(ratio "$f" "$n")"
}
line "seq write ${MB}M, conv=fsync" "MB/s" write 1
line "cp ${MB}M file within the fs" "s" copy 0
line "cold seq read ${MB}M" "MB/s" read 1
line "create ${NFILES} files" "s" create 0
line "ls -l ${NFILES} files" "s" ls 0
line "tar x ${TARFILES} files" "s" untar 0
line "cp -a ${TARFILES} files out" "s" cpout 0
printf '%-34s %10.2f %10.2f %10s %10s %10s %7.2fx\n' "SQLite WAL 2000 transactions (s)" \
    "${R[sqlite_native]}" "${R[sqlite_objfs]}" - - - "$(ratio "${R[sqlite_objfs]}" "${R[sqlite_native]}")"
printf '%-34s %12s %12s\n' "peak RSS, ${RSS_MB}M write, 256M limit" "-" "$((PEAK_KB / 1024)) MiB"
echo
[ ${#FAILED[@]} -eq 0 ] || echo "commands that reported errors (timed anyway): ${FAILED[*]}"
echo "Medians of $ROUNDS rounds. For time rows a ratio below 1 is faster than the peer; for MB/s rows above 1."
echo "uring: objfs with --io-uring (requests through io_uring queues); uri/obj compares it"
echo "with the default /dev/fuse. floor: an in-memory FUSE filesystem over /dev/fuse"
echo "(examples/floorfs.rs) doing no storage work; flr/nat is what FUSE alone costs here,"
echo "obj/flr what objfs adds on top."
echo "rclone's write figure flatters it: its fsync returns before its upload completes,"
echo "while objfs's data is in its store when dd returns."
