#!/bin/sh
# POSIX conformance workload for tests/test_guest_posix.py, run by busybox sh as root
# with the 9p share as the current directory. The share root must be searchable by
# others, because part of the checks run as the guest user "user" (uid 1000, gid 1000,
# also in group 1001), which this script adds to /etc/passwd and /etc/group.
#
# Each check prints one "key=value" line with a value that repeats from run to run:
# outcomes are "ok" or the errno name from the failing command's message, and inode
# numbers show only as "same" or "different". Lines starting with "timing" give each
# section's seconds and are not key=value lines. check() also compares the value
# with the POSIX or Linux result and prints a "FAIL" line for a mismatch, and the
# final "failures" line counts them. The script leaves its files in posix/ for the
# host to compare. Extended attributes are not covered, because busybox has no
# getfattr or setfattr.

failures=0

# check KEY EXPECTED ACTUAL
check() {
    echo "$1=$3"
    if [ "$2" != "$3" ]; then
        echo "FAIL $1: expected '$2', got '$3'" >&2
        failures=$((failures + 1))
    fi
}

# check_any KEY "EXPECTED..." ACTUAL: as check, for a check that accepts more than one
# value.
check_any() {
    for expected in $2; do
        if [ "$expected" = "$3" ]; then
            check "$1" "$3" "$3"
            return
        fi
    done
    check "$1" "one of: $2" "$3"
}

# show KEY VALUE: a value that the test compares between helpers, with no fixed
# expectation here.
show() {
    echo "$1=$2"
}

# yes_if COMMAND...: print "yes" when the command succeeds, else "no".
yes_if() {
    if "$@"; then echo yes; else echo no; fi
}

# outcome COMMAND...: run the command with its stdout discarded, then print "ok" if it
# succeeded, else the errno name that its error message (glibc's strerror text, or
# busybox's own wording) shows.
outcome() {
    if message=$("$@" 2>&1 >/dev/null); then
        echo ok
        return
    fi
    case $message in
    *"Permission denied"*) echo EACCES ;;
    *"Operation not permitted"*) echo EPERM ;;
    *"Directory not empty"*) echo ENOTEMPTY ;;
    *"File exists"*) echo EEXIST ;;
    *"Invalid argument"*) echo EINVAL ;;
    *"File name too long"*) echo ENAMETOOLONG ;;
    *"No such file or directory"*) echo ENOENT ;;
    *"Not a directory"*) echo ENOTDIR ;;
    *"Is a directory"* | *"is a directory"*) echo EISDIR ;;
    *"Too many levels of symbolic links"*) echo ELOOP ;;
    *"Operation not supported"*) echo EOPNOTSUPP ;;
    *"No such device or address"*) echo ENXIO ;;
    *) echo "failed:$(echo "$message" | tr '\n' ' ')" ;;
    esac
}

# as_user COMMAND_LINE: run a shell command line as uid 1000 with umask 022.
as_user() {
    su user -s /bin/sh -c "umask 022; $1"
}

# mode PATH: permission bits in octal, without leading zeros.
mode() {
    stat -c %a "$1"
}

# owner PATH: uid:gid, of the symlink itself for a symlink.
owner() {
    stat -c %u:%g "$1"
}

# inode_relation PATH1 PATH2: "same" when both names lead to one inode.
inode_relation() {
    if [ "$(stat -c %i "$1")" = "$(stat -c %i "$2")" ]; then
        echo same
    else
        echo different
    fi
}

# words COMMAND...: the command's output with each run of whitespace as one space.
words() {
    echo $("$@")
}

# Seconds since boot with two decimals, for the timing lines.
uptime_seconds() {
    cut -d ' ' -f 1 /proc/uptime
}

section_start=$(uptime_seconds)

# section NAME: print the time taken since the previous call, under NAME.
section() {
    now=$(uptime_seconds)
    echo "timing $1 $(awk "BEGIN { printf \"%.2f\", $now - $section_start }") s"
    section_start=$now
}

mkdir -p /etc
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'user:x:1000:1000:user:/tmp:/bin/sh' \
    >/etc/passwd
printf '%s\n' 'root:x:0:' 'user:x:1000:' 'extra:x:1001:user' >/etc/group
umask 022

check user_identity "uid=1000(user) gid=1000(user) groups=1000(user),1001(extra)" \
    "$(as_user id)"
# Kernel settings that decide some outcomes for another user's files below:
# protected_hardlinks, for example, decides whether the user may link to root's file.
for name in protected_hardlinks protected_symlinks protected_regular protected_fifos
do
    show "sysctl_$name" "$(cat /proc/sys/fs/$name)"
done

rm -rf posix
mkdir posix || exit 1
cd posix || exit 1
# home/ belongs to the user, and pub/ is world-writable and sticky, as /tmp is.
mkdir home pub
chown 1000:1000 home
chmod 1777 pub
section setup

# Modes of new objects under different umasks, and chmod results.
: >umask022.f
check mode_file_umask022 644 "$(mode umask022.f)"
(umask 077 && : >umask077.f)
check mode_file_umask077 600 "$(mode umask077.f)"
(umask 000 && : >umask000.f)
check mode_file_umask000 666 "$(mode umask000.f)"
mkdir umask022.d
check mode_dir_umask022 755 "$(mode umask022.d)"
(umask 077 && mkdir umask077.d)
check mode_dir_umask077 700 "$(mode umask077.d)"
(umask 000 && mkdir umask000.d)
check mode_dir_umask000 777 "$(mode umask000.d)"
(umask 027 && mkfifo umask027.p)
check mode_fifo_umask027 640 "$(mode umask027.p)"
mkdir -m 1750 m1750.d
check mode_mkdir_m1750 1750 "$(mode m1750.d)"
mknod -m 604 m604.p p
check mode_mknod_m604 604 "$(mode m604.p)"
: >chmod.f
modes=
for value in 0 1 4755 2755 6644 1777 7777 400 644; do
    chmod "$value" chmod.f
    modes="$modes $(mode chmod.f)"
done
check mode_chmod_sequence "0 1 4755 2755 6644 1777 7777 400 644" "${modes# }"
chmod u=rwx,g=rx,o= chmod.f
check mode_chmod_symbolic 750 "$(mode chmod.f)"
chmod 644 chmod.f
chmod a+x,g-r chmod.f
check mode_chmod_relative 715 "$(mode chmod.f)"
mkdir chmod.d
chmod 1777 chmod.d
check mode_chmod_dir_sticky 1777 "$(mode chmod.d)"
ln -s umask022.f mode.l
check mode_symlink 777 "$(mode mode.l)"
chmod 600 mode.l
check mode_chmod_through_symlink "600 777" "$(mode umask022.f) $(mode mode.l)"
chmod 644 umask022.f
echo zero >zero.f
chmod 0 zero.f
check root_reads_mode_0 zero "$(cat zero.f)"
section modes

# Owners of what the user creates. The test checks the same owners on the host.
as_user ': >home/own.f && mkdir home/own.d && ln -s own.f home/own.l &&
    mkfifo home/own.p && ln home/own.f home/own.hl'
check user_file_owner 1000:1000 "$(owner home/own.f)"
check user_file_mode 644 "$(mode home/own.f)"
check user_dir_owner 1000:1000 "$(owner home/own.d)"
check user_dir_mode 755 "$(mode home/own.d)"
check user_symlink_owner 1000:1000 "$(owner home/own.l)"
check user_fifo_owner 1000:1000 "$(owner home/own.p)"
check user_hardlink_nlink 2 "$(stat -c %h home/own.f)"
check user_mknod_char EPERM "$(outcome as_user 'mknod home/own.c c 1 3')"
check user_mknod_fifo ok "$(outcome as_user 'mknod home/own2.p p')"
: >root.f
check root_file_owner 0:0 "$(owner root.f)"
: >home/root-in-home.f
check root_file_in_user_dir_owner 0:0 "$(owner home/root-in-home.f)"
# Linking to another user's file depends on protected_hardlinks, printed above.
show user_link_root_file "$(outcome as_user 'ln root.f home/root.hl')"
section owners

# Access by the user to root's files and directories.
mkdir secret
echo inside >secret/inside.f
chmod 700 secret
echo data >private.f
chmod 600 private.f
echo data >public.f
check user_list_0700_dir EACCES "$(outcome as_user 'ls secret')"
check user_stat_in_0700_dir EACCES "$(outcome as_user 'stat secret/inside.f')"
check user_create_in_0700_dir EACCES "$(outcome as_user ': >secret/new.f')"
check user_cd_0700_dir EACCES "$(outcome as_user 'cd secret')"
check root_lists_0700_dir inside.f "$(ls secret)"
check user_read_0600_file EACCES "$(outcome as_user 'cat private.f')"
check user_write_0600_file EACCES "$(outcome as_user 'echo x >>private.f')"
check user_read_0644_file ok "$(outcome as_user 'cat public.f')"
check user_write_0644_file EACCES "$(outcome as_user 'echo x >>public.f')"
check user_truncate_0644_file EACCES "$(outcome as_user 'truncate -s 0 public.f')"
check user_create_in_root_dir EACCES "$(outcome as_user ': >new.f')"
check user_rm_in_root_dir EACCES "$(outcome as_user 'rm -f public.f')"
check user_mkdir_in_root_dir EACCES "$(outcome as_user 'mkdir new.d')"
check public_unchanged data "$(cat public.f)"
mkdir search-only.d
echo known >search-only.d/known.f
chmod 711 search-only.d
check user_list_0711_dir EACCES "$(outcome as_user 'ls search-only.d')"
check user_read_in_0711_dir known "$(as_user 'cat search-only.d/known.f')"
echo data >group.f
chown 0:1001 group.f
chmod 640 group.f
check user_read_supplementary_group ok "$(outcome as_user 'cat group.f')"
# The group class applies to a member even when "other" would allow more.
echo data >group-deny.f
chown 0:1000 group-deny.f
chmod 604 group-deny.f
check user_read_group_class_denied EACCES "$(outcome as_user 'cat group-deny.f')"
echo data >other-only.f
chmod 604 other-only.f
check user_read_other_class ok "$(outcome as_user 'cat other-only.f')"
mkdir group-write.d
chown 0:1001 group-write.d
chmod 770 group-write.d
check user_create_via_group_write ok "$(outcome as_user ': >group-write.d/user.f')"
check user_create_via_group_write_owner 1000:1000 "$(owner group-write.d/user.f)"
section access

# The user's writes, and what only an owner or root may change.
as_user 'echo one >home/write.f && echo two >>home/write.f'
check user_write_own_file "one two" "$(words cat home/write.f)"
as_user 'chmod 400 home/write.f'
check user_write_own_0400_file EACCES "$(outcome as_user 'echo x >>home/write.f')"
check root_write_0400_file ok "$(outcome sh -c 'echo three >>home/write.f')"
check user_file_after_writes "one two three" "$(words cat home/write.f)"
check user_chmod_root_file EPERM "$(outcome as_user 'chmod 777 public.f')"
check user_chmod_own_file ok "$(outcome as_user 'chmod 604 home/own.f')"
check user_chown_own_to_root EPERM "$(outcome as_user 'chown 0 home/own.f')"
check user_chown_root_file EPERM "$(outcome as_user 'chown 1000 public.f')"
check user_chgrp_own_to_member ok "$(outcome as_user 'chgrp 1001 home/own.f')"
check user_chgrp_result 1000:1001 "$(owner home/own.f)"
check user_chgrp_own_to_nonmember EPERM "$(outcome as_user 'chgrp 0 home/own.f')"
echo shared >pub/shared.f
chmod 666 pub/shared.f
check user_touch_date_foreign EPERM \
    "$(outcome as_user "touch -d '2001-02-03 04:05:06' pub/shared.f")"
check user_touch_now_foreign_writable ok "$(outcome as_user 'touch pub/shared.f')"
check user_touch_date_own ok \
    "$(outcome as_user "touch -d '2001-02-03 04:05:06' home/own.f")"
check user_touch_date_result 981173106 "$(stat -c %Y home/own.f)"
# Setting S_ISGID on a file of a group the owner is not in silently drops the bit.
: >home/sgid-strip.f
chown 1000:0 home/sgid-strip.f
check user_chmod_sgid_nonmember_group ok \
    "$(outcome as_user 'chmod 2755 home/sgid-strip.f')"
check user_sgid_nonmember_mode 755 "$(mode home/sgid-strip.f)"
as_user ': >home/sgid-keep.f && chmod 2755 home/sgid-keep.f'
check user_sgid_member_mode 2755 "$(mode home/sgid-keep.f)"
section ownership

# A sticky world-writable dir: only the file's owner, the dir's owner or root may
# remove or rename a file there.
echo root >pub/root.f
chmod 666 pub/root.f
as_user 'echo user >pub/user.f && echo user2 >pub/user2.f && echo user3 >pub/user3.f'
check sticky_user_rm_root_file EPERM "$(outcome as_user 'rm -f pub/root.f')"
check sticky_user_mv_root_file EPERM "$(outcome as_user 'mv -f pub/root.f pub/moved.f')"
check sticky_user_replace_root_file EPERM \
    "$(outcome as_user 'mv -f pub/user3.f pub/root.f')"
check sticky_user_write_root_file ok "$(outcome as_user 'echo more >>pub/root.f')"
check sticky_root_file_content "root more" "$(words cat pub/root.f)"
check sticky_user_rm_own_file ok "$(outcome as_user 'rm pub/user.f')"
check sticky_user_mv_own_file ok "$(outcome as_user 'mv pub/user3.f pub/user4.f')"
check sticky_root_rm_user_file ok "$(outcome rm pub/user2.f)"
check sticky_listing "root.f shared.f user4.f" "$(words ls pub)"
mkdir user-sticky.d
chown 1000:1000 user-sticky.d
chmod 1777 user-sticky.d
: >user-sticky.d/root.f
check sticky_dir_owner_rm_root_file ok \
    "$(outcome as_user 'rm -f user-sticky.d/root.f')"
mkdir open.d
chmod 777 open.d
: >open.d/root.f
check nonsticky_user_rm_root_file ok "$(outcome as_user 'rm -f open.d/root.f')"
section sticky

# A setgid dir of group 1001: new entries take its group, and new subdirs its setgid
# bit too. Only the user creates here, because root's create comes at the end.
mkdir sgid.d
chown 0:1001 sgid.d
chmod 2775 sgid.d
check sgid_dir_mode 2775 "$(mode sgid.d)"
as_user ': >sgid.d/file.f && mkdir sgid.d/sub.d && mkdir sgid.d/sub.d/nested.d &&
    ln -s file.f sgid.d/link.l && mkfifo sgid.d/fifo.p && : >sgid.d/sub.d/inner.f'
check sgid_file_owner 1000:1001 "$(owner sgid.d/file.f)"
check sgid_file_mode 644 "$(mode sgid.d/file.f)"
check sgid_subdir_owner 1000:1001 "$(owner sgid.d/sub.d)"
check sgid_subdir_mode 2755 "$(mode sgid.d/sub.d)"
check sgid_nested_subdir "2755 1000:1001" \
    "$(mode sgid.d/sub.d/nested.d) $(owner sgid.d/sub.d/nested.d)"
check sgid_nested_file 1000:1001 "$(owner sgid.d/sub.d/inner.f)"
check sgid_symlink_owner 1000:1001 "$(owner sgid.d/link.l)"
check sgid_fifo_owner 1000:1001 "$(owner sgid.d/fifo.p)"
as_user ': >home/moved-in.f && mv home/moved-in.f sgid.d/'
check sgid_renamed_in_keeps_group 1000:1000 "$(owner sgid.d/moved-in.f)"
as_user 'mkdir home/plain.d'
check plain_subdir_no_sgid "755 1000:1000" \
    "$(mode home/plain.d) $(owner home/plain.d)"
section setgid

# Writes, truncation and chown clear S_ISUID, and S_ISGID with group execute.
as_user 'echo a >home/suid.f && chmod 4755 home/suid.f'
check suid_set_by_user 4755 "$(mode home/suid.f)"
as_user 'echo b >>home/suid.f'
check suid_after_user_write 755 "$(mode home/suid.f)"
as_user 'echo a >home/sgid-x.f && chmod 2755 home/sgid-x.f && echo b >>home/sgid-x.f'
check sgid_exec_after_user_write 755 "$(mode home/sgid-x.f)"
as_user 'echo a >home/both.f && chmod 6755 home/both.f && echo b >>home/both.f'
check suid_sgid_after_user_write 755 "$(mode home/both.f)"
# Locally the owner, a member of the file's group, keeps S_ISGID without group
# execute. QEMU does the write on the host as uid 65534, outside that group and
# without CAP_FSETID, and Linux 6.18 on the host clears the bit for such a writer.
as_user 'echo a >home/sgid-nox.f && chmod 2745 home/sgid-nox.f &&
    echo b >>home/sgid-nox.f'
show sgid_noexec_after_user_write "$(mode home/sgid-nox.f)"
as_user 'echo a >home/suid-trunc.f && chmod 4755 home/suid-trunc.f &&
    truncate -s 0 home/suid-trunc.f'
check suid_after_user_truncate 755 "$(mode home/suid-trunc.f)"
echo a >suid-chown.f
chmod 4755 suid-chown.f
chown 1000 suid-chown.f
check suid_after_root_chown 755 "$(mode suid-chown.f)"
# Locally root keeps the bit (CAP_FSETID), but on the host the write is QEMU's, done
# without that capability.
echo a >suid-root.f
chmod 4755 suid-root.f
echo b >>suid-root.f
show suid_after_root_write "$(mode suid-root.f)"
section suid

# Link counts of files and dirs.
: >nlink.f
check nlink_new_file 1 "$(stat -c %h nlink.f)"
ln nlink.f nlink2.f
ln nlink.f home/nlink3.f
check nlink_two_links 3 "$(stat -c %h nlink.f)"
check nlink_links_same_inode same "$(inode_relation nlink.f home/nlink3.f)"
rm nlink2.f
check nlink_after_rm 2 "$(stat -c %h home/nlink3.f)"
mkdir nlink.d
check nlink_new_dir 2 "$(stat -c %h nlink.d)"
mkdir nlink.d/a nlink.d/b nlink.d/c
: >nlink.d/file.f
check nlink_dir_three_subdirs 5 "$(stat -c %h nlink.d)"
rmdir nlink.d/a
check nlink_dir_after_rmdir 4 "$(stat -c %h nlink.d)"
mkdir nlink-target.d
mv nlink.d/b nlink-target.d/
check nlink_dirs_after_move "3 3" \
    "$(stat -c %h nlink.d) $(stat -c %h nlink-target.d)"
check nlink_dot_same_as_dir same "$(inode_relation nlink.d nlink.d/.)"
check nlink_dotdot_is_parent same "$(inode_relation nlink.d nlink.d/c/..)"
# A hard link to a symlink links the symlink itself, as link(2) does.
ln -s nlink.f sym.l
ln sym.l sym-hard.l
check hardlink_to_symlink_type "symbolic link" "$(stat -c %F sym-hard.l)"
check hardlink_to_symlink_nlink 2 "$(stat -c %h sym.l)"
check hardlink_to_symlink_target nlink.f "$(readlink sym-hard.l)"
check hardlink_to_symlink_inode same "$(inode_relation sym.l sym-hard.l)"
check hardlink_target_nlink 2 "$(stat -c %h nlink.f)"
check link_to_dir EPERM "$(outcome ln nlink.d nlink-hard.d)"
section links

# rename(2): replacing files and dirs, and the errors for dirs.
echo source >r-source.f
echo target >r-target.f
ln r-target.f r-target-link.f
check rename_over_file ok "$(outcome mv -f r-source.f r-target.f)"
check rename_over_file_content source "$(cat r-target.f)"
check rename_over_file_source_gone yes "$(yes_if test ! -e r-source.f)"
check rename_replaced_keeps_other_link "1 target" \
    "$(stat -c %h r-target-link.f) $(cat r-target-link.f)"
mkdir r-moved.d r-empty.d
: >r-moved.d/x.f
check rename_over_empty_dir ok "$(outcome mv -T r-moved.d r-empty.d)"
check rename_over_empty_dir_result "x.f no" \
    "$(ls r-empty.d) $(yes_if test -e r-moved.d)"
mkdir r-dir.d r-full.d
: >r-full.d/y.f
# POSIX allows either errno here.
check_any rename_over_nonempty_dir "ENOTEMPTY EEXIST" \
    "$(outcome mv -T r-dir.d r-full.d)"
mkdir -p r-parent.d/sub.d
check rename_dir_into_own_subdir EINVAL \
    "$(outcome mv -T r-parent.d r-parent.d/sub.d/inner.d)"
: >r-file.f
check rename_dir_over_file ENOTDIR "$(outcome mv -T r-dir.d r-file.f)"
check rename_file_over_dir EISDIR "$(outcome mv -T r-file.f r-dir.d)"
check rename_missing ENOENT "$(outcome mv r-missing.f r-other.f)"
echo within >r-within.f
mv r-within.f r-within2.f
check rename_within_dir "within no" \
    "$(cat r-within2.f) $(yes_if test -e r-within.f)"
mkdir r-across.d
inode=$(stat -c %i r-within2.f)
mv r-within2.f r-across.d/r-across.f
check rename_across_dirs within "$(cat r-across.d/r-across.f)"
if [ "$inode" = "$(stat -c %i r-across.d/r-across.f)" ]; then
    check rename_keeps_inode same same
else
    check rename_keeps_inode same different
fi
# rename(2) between two links of one file does nothing and succeeds.
: >r-hard1.f
ln r-hard1.f r-hard2.f
show rename_between_hard_links "$(outcome mv -f r-hard1.f r-hard2.f)"
check rename_between_hard_links_kept "yes yes 2" \
    "$(yes_if test -e r-hard1.f) $(yes_if test -e r-hard2.f) $(stat -c %h r-hard2.f)"
echo over >r-over-symlink.f
ln -s nlink.f r-symlink.l
mv -f r-over-symlink.f r-symlink.l
check rename_over_symlink "regular file over 2" \
    "$(stat -c %F r-symlink.l) $(cat r-symlink.l) $(stat -c %h nlink.f)"
ln -s nlink.f r-symlink-source.l
mv r-symlink-source.l r-across.d/
moved_link=r-across.d/r-symlink-source.l
check rename_symlink_across_dirs "symbolic link nlink.f" \
    "$(stat -c %F $moved_link) $(readlink $moved_link)"
section rename

# Removing names that are still open, and other unlink and rmdir errors.
echo "still here" >open.f
exec 3<open.f
rm open.f
check unlinked_open_gone yes "$(yes_if test ! -e open.f)"
check unlinked_open_read "still here" "$(cat <&3)"
exec 3<&-
echo "write side" >open-write.f
exec 4>>open-write.f
rm open-write.f
check unlinked_open_write ok "$(outcome sh -c 'echo more >&4')"
exec 4>&-
mkdir rm-dir.d
: >rm-dir.d/x.f
check rmdir_nonempty ENOTEMPTY "$(outcome rmdir rm-dir.d)"
check rmdir_file ENOTDIR "$(outcome rmdir rm-dir.d/x.f)"
check unlink_dir EISDIR "$(outcome unlink rm-dir.d)"
check unlink_missing ENOENT "$(outcome unlink rm-missing.f)"
check mkdir_existing EEXIST "$(outcome mkdir rm-dir.d)"
check open_dir_for_write EISDIR "$(outcome sh -c ': >rm-dir.d')"
check noclobber_existing EEXIST "$(outcome sh -C -c ': >rm-dir.d/x.f')"
section unlink

# Symlinks to dirs, dangling symlinks and loops.
mkdir sym-target.d
echo inside >sym-target.d/inside.f
ln -s sym-target.d sym-dir.l
check symlink_dir_list inside.f "$(ls sym-dir.l/)"
check symlink_dir_read inside "$(cat sym-dir.l/inside.f)"
echo through >sym-dir.l/created.f
check symlink_dir_create_through through "$(cat sym-target.d/created.f)"
check symlink_dir_cd_physical "$(pwd)/sym-target.d" "$(cd -P sym-dir.l && pwd)"
check symlink_dir_stat_follow directory "$(stat -L -c %F sym-dir.l)"
check symlink_dir_stat_nofollow "symbolic link" "$(stat -c %F sym-dir.l)"
check symlink_dir_rm_keeps_target "ok yes" \
    "$(outcome rm sym-dir.l) $(yes_if test -f sym-target.d/inside.f)"
ln -s sym-target.d/missing.f sym-dangling.l
check symlink_dangling "no yes" \
    "$(yes_if test -e sym-dangling.l) $(yes_if test -L sym-dangling.l)"
echo created >sym-dangling.l
check symlink_dangling_write_creates created "$(cat sym-target.d/missing.f)"
ln -s /absolute/nowhere sym-absolute.l
check symlink_absolute_target /absolute/nowhere "$(readlink sym-absolute.l)"
ln -s sym-loop2.l sym-loop1.l
ln -s sym-loop1.l sym-loop2.l
check symlink_loop ELOOP "$(outcome cat sym-loop1.l)"
long_target=$(printf '%0200d' 0 | tr 0 t)
ln -s "$long_target" sym-long.l
check symlink_long_target "$long_target" "$(readlink sym-long.l)"
check symlink_size 200 "$(stat -c %s sym-long.l)"
section symlinks

# Names: the longest allowed, one byte more, and bytes a shell would quote.
name255=$(printf '%0255d' 0 | tr 0 n)
check name_255_bytes ok "$(outcome sh -c ": >$name255")"
check name_256_bytes ENAMETOOLONG "$(outcome sh -c ": >${name255}n")"
: >"name with spaces.f"
: >"-dash.f"
: >"star*.f"
: >"caf$(printf '\303\251').f"
check name_special_count 4 "$(ls -d -- "name with spaces.f" -dash.f "star*.f" caf*.f |
    wc -l)"
section names

# Truncation through O_TRUNC and truncate(2).
printf 0123456789 >trunc.f
: >trunc.f
check truncate_by_open 0 "$(stat -c %s trunc.f)"
printf 0123456789 >trunc.f
truncate -s 4 trunc.f
check truncate_shrink "4 0123" "$(stat -c %s trunc.f) $(cat trunc.f)"
truncate -s 100000 trunc.f
check truncate_grow 100000 "$(stat -c %s trunc.f)"
check truncate_grow_zeros 00 "$(tail -c 1 trunc.f | od -A n -t x1 | tr -d ' ')"
check truncate_no_create "ok no" \
    "$(outcome truncate -c -s 10 trunc-missing.f) $(yes_if test -e trunc-missing.f)"
check user_truncate_shared ok "$(outcome as_user 'truncate -s 2 pub/shared.f')"
check user_truncate_shared_size 2 "$(stat -c %s pub/shared.f)"
dd if=/dev/zero of=sparse.f bs=1 count=1 seek=1048575 2>/dev/null
check write_past_end 1048576 "$(stat -c %s sparse.f)"
show fallocate "$(outcome fallocate -l 4096 falloc.f)"
section truncate

# FIFOs and device nodes: the guest opens them itself, never through the share.
mkfifo fifo.p
check fifo_type fifo "$(stat -c %F fifo.p)"
timeout 10 sh -c 'cat fifo.p >fifo-out.f' &
reader=$!
timeout 10 sh -c 'echo through-fifo >fifo.p'
wait $reader
check fifo_roundtrip through-fifo "$(cat fifo-out.f)"
mknod char.c c 1 3
check mknod_char "character special file 1,3" \
    "$(stat -c '%F %t,%T' char.c)"
check mknod_char_read "ok 0" "$(outcome cat char.c) $(cat char.c | wc -c)"
mknod block.b b 7 0
check mknod_block "block special file 7,0" "$(stat -c '%F %t,%T' block.b)"
check mknod_existing EEXIST "$(outcome mknod char.c c 1 3)"
section special

# A deep tree: 60 levels of 50-byte names, about 3 KB of path, below PATH_MAX.
deep_path=deep.d
level=1
while [ $level -le 60 ]; do
    deep_path="$deep_path/$(printf 'level%02d%043d' $level 0)"
    level=$((level + 1))
done
check deep_path_length 3066 "${#deep_path}"
check deep_mkdir ok "$(outcome mkdir -p "$deep_path")"
echo bottom >"$deep_path/leaf.f"
check deep_leaf_read bottom "$(cat "$deep_path/leaf.f")"
check deep_dir_count 61 "$(find deep.d -type d | wc -l)"
check deep_leaf_found 1 "$(find deep.d -name leaf.f | wc -l)"
check deep_leaf_stat "regular file 7" "$(stat -c '%F %s' "$deep_path/leaf.f")"
mv "$deep_path/leaf.f" deep.d/leaf.f
check deep_rename_up bottom "$(cat deep.d/leaf.f)"
check deep_rm ok "$(outcome rm -r deep.d)"
check deep_gone yes "$(yes_if test ! -e deep.d)"
section deep

# Past PATH_MAX: one level at a time with cd, because the guest's own system calls
# cannot take such a path in one piece. The number of levels shows where the helper
# stops serving, and the tree is removed on the way back up. Level 80 is the first
# whose path from QEMU reaches PATH_MAX (4096 bytes). A helper that serves longer
# paths opens them in pieces, which is slow, so the probe stops at 85.
max_depth=85
mkdir pathmax.d
cd -P pathmax.d || exit 1
name=$(printf '%050d' 0 | tr 0 p)
depth=0
pathmax_error=none
while [ $depth -lt $max_depth ]; do
    pathmax_error=$(outcome mkdir "$name")
    if [ "$pathmax_error" != ok ]; then
        break
    fi
    if ! cd -P "$name" 2>/dev/null; then
        rmdir "$name"
        pathmax_error=cd
        break
    fi
    depth=$((depth + 1))
    pathmax_error=none
done
show pathmax_depth "$depth"
show pathmax_stop "$pathmax_error"
leaf="not reached"
if [ $depth -eq $max_depth ]; then
    leaf="$(outcome sh -c 'echo leaf >leaf.f') $(cat leaf.f)"
    rm -f leaf.f
fi
show pathmax_leaf "$leaf"
while [ $depth -gt 0 ]; do
    cd -P .. || break
    rmdir "$name" || break
    depth=$((depth - 1))
done
cd -P /mnt/posix || exit 1
check pathmax_cleanup "0 0" "$depth $(ls pathmax.d | wc -l)"
section pathmax

# Many entries in one dir, read back through several readdir replies.
mkdir many.d
i=0
while [ $i -lt 3000 ]; do
    : >"many.d/entry-$i"
    i=$((i + 1))
done
# The listing goes to the guest's tmpfs, so that three checks list the share once.
ls many.d >/tmp/many.list
check many_count 3000 "$(wc -l </tmp/many.list)"
check many_listing_sorted "entry-0 entry-999" \
    "$(head -n 1 /tmp/many.list) $(tail -n 1 /tmp/many.list)"
show many_listing_sha256 "$(sha256sum </tmp/many.list | cut -d ' ' -f 1)"
rm many.d/entry-29*
check many_after_rm_glob 2889 "$(ls many.d | wc -l)"
section many

# statfs through the share.
set -- $(df -P . | tail -n 1)
check df_fields 6 "$#"
check df_filesystem share "$1"
check df_mount /mnt "$6"
check df_numbers yes "$(yes_if test "$2" -gt 0 -a "$3" -ge 0 -a "$4" -ge 0)"
case $5 in
*[0-9]%) check df_capacity_percent yes yes ;;
*) check df_capacity_percent yes "no: $5" ;;
esac
check statfs_namelen 255 "$(stat -f -c %l .)"
# QEMU passes on the host's f_type, so this is the exported filesystem's magic.
show statfs_type "$(stat -f -c %t .)"
show statfs_block_size "$(stat -f -c %s .)"
section df

# A create by root (uid 0) in the setgid dir requests gid 1001. QEMU's C helper then
# keeps only CAP_DAC_OVERRIDE, so the chown after it shows whether the helper still
# has CAP_CHOWN. This runs last because the C helper's next create as another user
# would abort it (see "capabilities-after-create" in tests/differences.py). The
# chown back leaves the same tree either way.
: >caps.f
: >sgid.d/root.f
check sgid_root_file_owner 0:1001 "$(owner sgid.d/root.f)"
show chown_after_root_sgid_create "$(outcome chown 1000 caps.f)"
chown 0 caps.f 2>/dev/null
section caps

echo "failures=$failures"
exit "$failures"
