#!/bin/sh
# Guest benchmark workload, run by busybox sh as root in the 9p share. bench/guest.py
# prepends the settings: dirs, files (per dir), tarball (a tar file in the share) and
# entries (the number of paths that unpacking it creates).
# Each phase prints "time_NAME_cs=N": its wall time in centiseconds from /proc/uptime,
# because busybox date has no %N. Checks print "FAIL ..." and count as failures.

failures=0

# uptime_cs: set $now to the guest's uptime in centiseconds, without a fork.
uptime_cs() {
    read -r up _ </proc/uptime
    now=${up%.*}${up#*.}
    # Leading zeros would make the shell read the number as octal.
    while [ "${now#0}" != "$now" ]; do
        now=${now#0}
    done
    now=${now:-0}
}

begin() {
    uptime_cs
    started=$now
}

finish() {
    uptime_cs
    echo "time_$1_cs=$((now - started))"
}

# expect NAME EXPECTED ACTUAL
expect() {
    echo "$1=$3"
    if [ "$2" != "$3" ]; then
        echo "FAIL $1: expected '$2', got '$3'"
        failures=$((failures + 1))
    fi
}

rm -rf bench-files bench-untar
mkdir bench-files || exit 1

begin
d=0
while [ $d -lt "$dirs" ]; do
    mkdir -p "bench-files/d$d/sub"
    f=0
    while [ $f -lt "$files" ]; do
        echo "file $d $f" >"bench-files/d$d/sub/f$f"
        f=$((f + 1))
    done
    d=$((d + 1))
done
finish create
expect created $((dirs * files)) "$(find bench-files -type f | wc -l)"

# ls -l calls lstat on every entry, in one process.
begin
ls -lR bench-files >/dev/null
finish stat

# One mv per directory renames all its files, so the phase measures renames,
# not process start-up.
begin
d=0
while [ $d -lt "$dirs" ]; do
    mkdir "bench-files/d$d/moved"
    mv "bench-files/d$d/sub/"* "bench-files/d$d/moved/"
    d=$((d + 1))
done
finish rename
expect renamed $((dirs * files)) "$(find bench-files -path '*/moved/*' -type f | wc -l)"

begin
rm -rf bench-files
finish delete
expect deleted yes "$(if [ -e bench-files ]; then echo no; else echo yes; fi)"

mkdir bench-untar || exit 1
begin
tar -xf "$tarball" -C bench-untar || failures=$((failures + 1))
finish untar
expect untar_entries "$entries" "$(find bench-untar -mindepth 1 | wc -l)"

begin
rm -rf bench-untar
finish untar_delete

echo "failures=$failures"
exit "$failures"
