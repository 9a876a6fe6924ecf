//! The system call filter every sandbox runs under. Modelled on the system calls Docker's default profile
//! keeps from containers: everything else is allowed, these fail with EPERM. Most of them need capabilities a
//! sandbox does not have anyway; the filter is the second wall, and the only one for what the kernel allows
//! without capabilities inside a user namespace (new namespaces, mounts in them, keyrings, BPF, userfaultfd,
//! perf events).

use serde_json::{Value, json};

/// Denied outright.
const DENIED: &[&str] = &[
    // Kernel and host administration.
    "acct",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "lookup_dcookie",
    "nfsservctl",
    "perf_event_open",
    "query_module",
    "quotactl",
    "reboot",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "uselib",
    "ustat",
    "vm86",
    "vm86old",
    "syslog",
    // Namespaces and mounts.
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "pivot_root",
    "setns",
    "umount",
    "umount2",
    "unshare",
    // Keyrings: not namespaced.
    "add_key",
    "keyctl",
    "request_key",
    // Reaching into other processes' memory and handles.
    "kcmp",
    "name_to_handle_at",
    "open_by_handle_at",
    "process_madvise",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "pidfd_getfd",
    // Memory policy and page faults handled in user space.
    "get_mempolicy",
    "mbind",
    "migrate_pages",
    "move_pages",
    "set_mempolicy",
    "userfaultfd",
];

/// Namespace flags `clone` must not carry (`unshare` and `setns` are denied whole).
const NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

/// The profile as the OCI runtime spec's `linux.seccomp`.
pub(crate) fn profile() -> Value {
    let architectures: &[&str] = match std::env::consts::ARCH {
        "x86_64" => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        _ => &[],
    };
    let mut syscalls = vec![json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM})];
    // clone3 passes its flags in memory a filter cannot read: make it unknown, and C libraries fall back to clone.
    syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}));
    for flag in NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": architectures, "syscalls": syscalls})
}
