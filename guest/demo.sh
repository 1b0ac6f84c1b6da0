#!/bin/sh
# Short demo workload: shows the shared dir from inside the guest, then writes, reads
# and lists a few files there. The files stay in the exported dir on the host.

echo "Guest kernel: $(uname -r)"
echo "The share is mounted at /mnt:"
grep ' /mnt ' /proc/mounts
echo

echo "Files in the share before the demo:"
ls -la
echo

mkdir -p demo
echo "Hello from the guest, written at $(date -u '+%Y-%m-%d %H:%M:%S') UTC" >demo/hello.txt
echo "Wrote demo/hello.txt; reading it back:"
cat demo/hello.txt
echo

seq 1 5 >demo/numbers.txt
echo "Wrote demo/numbers.txt with $(wc -l <demo/numbers.txt) lines."
ln -sf hello.txt demo/link-to-hello.txt
echo "Made demo/link-to-hello.txt -> $(readlink demo/link-to-hello.txt)"
echo

echo "Files in demo/ now:"
ls -la demo
echo
df -h .
