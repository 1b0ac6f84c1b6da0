#!/bin/sh
# Standard guest workload for tests/test_guest.py, run by busybox sh as root with the
# 9p share as the current directory. It prints one "key=value" line per check with the
# observed value, and a "FAIL" line on stderr for each value that differs from the
# expected one. It leaves its files in vm-workload/ for the host to inspect, and exits
# with the number of failed checks.

failures=0

# check KEY EXPECTED ACTUAL
check() {
    echo "$1=$3"
    if [ "$2" != "$3" ]; then
        echo "FAIL $1: expected '$2', got '$3'" >&2
        failures=$((failures + 1))
    fi
}

# yes_if COMMAND...: print "yes" when the command succeeds, else "no".
yes_if() {
    if "$@"; then echo yes; else echo no; fi
}

rm -rf vm-workload
mkdir vm-workload || exit 1
cd vm-workload || exit 1

: >created.txt
check create yes "$(yes_if test -f created.txt)"

printf 'hello from the guest\n' >file.txt
check write_size 21 "$(stat -c %s file.txt)"
check read "hello from the guest" "$(cat file.txt)"

printf 'second line\n' >>file.txt
check append_lines 2 "$(wc -l <file.txt)"
check append_size 33 "$(stat -c %s file.txt)"

mv file.txt renamed.txt
check rename_old_gone yes "$(yes_if test ! -e file.txt)"
check rename_new "second line" "$(tail -n 1 renamed.txt)"

ln renamed.txt hardlink.txt
check link_count 2 "$(stat -c %h renamed.txt)"
check link_same_inode yes "$(yes_if test "$(stat -c %i renamed.txt)" = "$(stat -c %i hardlink.txt)")"

ln -s renamed.txt symlink.txt
check readlink renamed.txt "$(readlink symlink.txt)"
check symlink_read "hello from the guest" "$(head -n 1 symlink.txt)"

: >unlinked.txt
rm unlinked.txt
check unlink yes "$(yes_if test ! -e unlinked.txt)"

: >mode.txt
chmod 640 mode.txt
check chmod 640 "$(stat -c %a mode.txt)"

: >chown.txt
chown 1000:1000 chown.txt
check chown 1000:1000 "$(stat -c %u:%g chown.txt)"
chown 0:0 chown.txt
check chown_back 0:0 "$(stat -c %u:%g chown.txt)"
: >owned.txt
chown 1000:1000 owned.txt
check owned 1000:1000 "$(stat -c %u:%g owned.txt)"

printf '0123456789abcdef' >truncate.txt
truncate -s 10 truncate.txt
check truncate_shrink 10 "$(stat -c %s truncate.txt)"
check truncate_content 0123456789 "$(cat truncate.txt)"
truncate -s 1000 truncate.txt
check truncate_grow 1000 "$(stat -c %s truncate.txt)"

# The guest has no TZ, so the date is UTC: 2001-02-03 04:05:06 UTC is 981173106.
touch -d '2001-02-03 04:05:06' mtime.txt
check mtime 981173106 "$(stat -c %Y mtime.txt)"

mkdir made.d
check mkdir yes "$(yes_if test -d made.d)"
mkdir removed.d
rmdir removed.d
check rmdir yes "$(yes_if test ! -e removed.d)"

mkfifo fifo
check mkfifo yes "$(yes_if test -p fifo)"
check fifo_type fifo "$(stat -c %F fifo)"

# Columns of "df -k -P": filesystem, 1K-blocks, used, available, capacity, mount.
df_line=$(df -k -P . | tail -n 1)
check df_filesystem share "$(echo "$df_line" | awk '{ print $1 }')"
echo "df_total_kb=$(echo "$df_line" | awk '{ print $2 }')"
check df_total_positive yes "$(yes_if test "$(echo "$df_line" | awk '{ print $2 }')" -gt 0)"

dd if=/dev/urandom of=big.bin bs=1048576 count=32 2>/dev/null
check big_size 33554432 "$(stat -c %s big.bin)"
echo "big_sha256=$(sha256sum big.bin | cut -d ' ' -f 1)"

mkdir many.d
i=0
while [ $i -lt 1000 ]; do
    : >"many.d/entry-$i"
    i=$((i + 1))
done
check many_entries 1000 "$(ls many.d | wc -l)"

echo "failures=$failures"
exit "$failures"
