//! The origin threads' scheduler slice (`http_slice_us`).
//!
//! Since Linux 6.12 the fair scheduler (EEVDF) lets a thread ask for a time
//! slice of its own, from 0.1 to 100 ms, through `sched_setattr`'s
//! `sched_runtime` (the default is about 0.75 ms times a factor for the
//! number of cores: 1.4 ms on two). A thread that runs in short bursts and
//! blocks asks for a short one: a task that wakes on the same core, such as
//! a client or an edge cache waiting for the answer just written, then gets
//! the core after at most that long instead of after the origin thread's
//! whole slice. Measured by hand on this machine with wrk sharing both
//! cores, 100 µs took the 1 KiB p99 from about 3.1 ms to 2.0 ms at the same
//! rate (less in `bench.sh origin`'s shorter rounds; see BENCHMARKS.md).
//! nginx's workers get the same effect by blocking in `epoll_wait` more
//! often.
//!
//! Older kernels ignore the field for fair threads; `ask` reads the slice
//! back to say whether it was taken. No crate exposes this field (libc has
//! the syscall numbers but not `struct sched_attr`), hence the few lines
//! here.

use std::time::Duration;

/// `struct sched_attr` as of Linux 4.13 (`SCHED_ATTR_SIZE_VER1`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// What the kernel made of the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Slice {
    /// The calling thread now runs with this slice.
    Taken,
    /// The kernel kept its own (before 6.12, or the thread is not on the
    /// fair scheduler, which `ask` leaves alone).
    NotTaken,
}

fn get() -> std::io::Result<SchedAttr> {
    get_of(0)
}

/// `tid`'s attributes; 0 is the calling thread.
fn get_of(tid: libc::pid_t) -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: `attr` is a writable `struct sched_attr` of `size` bytes.
    let r = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, &mut attr as *mut SchedAttr, size, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

/// The slice thread `tid` runs with, as the kernel reports it (zero
/// before Linux 6.12, where fair threads have no slice of their own).
pub fn of(tid: libc::pid_t) -> std::io::Result<Duration> {
    Ok(Duration::from_nanos(get_of(tid)?.runtime))
}

/// Asks for `slice` for the calling thread, keeping its policy and nice
/// value (`sched_setattr` sets them all at once, so they are read first).
pub fn ask(slice: Duration) -> std::io::Result<Slice> {
    let attr = get()?;
    if !fair(&attr) {
        return Ok(Slice::NotTaken);
    }
    let want = slice.as_nanos() as u64;
    set(attr, want)?;
    Ok(if get()?.runtime == want { Slice::Taken } else { Slice::NotTaken })
}

/// Back to the kernel's default slice, for a thread started by one that
/// asked for a short one (threads inherit it): the origin runtime's
/// blocking pool, which hashes and reads files in longer runs.
pub fn reset() -> std::io::Result<()> {
    let attr = get()?;
    if !fair(&attr) {
        return Ok(());
    }
    set(attr, 0)
}

/// A normal or batch thread, the ones asked about here: a thread the
/// operator put under `SCHED_IDLE`, a real-time or a deadline policy is
/// left alone.
fn fair(attr: &SchedAttr) -> bool {
    attr.policy == libc::SCHED_OTHER as u32 || attr.policy == libc::SCHED_BATCH as u32
}

/// `sched_setattr` with `runtime` (0: the default slice), keeping what
/// `attr` holds but for the flags, of which only `SCHED_FLAG_RESET_ON_FORK`
/// is kept (the others ask for changes this does not make).
fn set(mut attr: SchedAttr, runtime: u64) -> std::io::Result<()> {
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.runtime = runtime;
    // SAFETY: `attr` is a `struct sched_attr` with its size filled in.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_nice_value_and_gets_the_slice_where_the_kernel_has_them() {
        std::thread::spawn(|| {
            // SAFETY: raises the calling thread's nice value (allowed without
            // privileges); `setpriority` on a thread id names that thread.
            let tid = unsafe { libc::gettid() };
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 5) }, 0);
            let before = match get() {
                Ok(a) => a,
                // A sandbox without the call (gVisor, a strict seccomp
                // profile): `ask` fails the same way and the server logs it.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    eprintln!("skipped: sched_getattr: {e}");
                    return;
                }
                Err(e) => panic!("sched_getattr: {e}"),
            };
            let taken = ask(Duration::from_micros(300)).expect("sched_setattr");
            let after = get().expect("sched_getattr");
            assert_eq!(after.nice, 5, "the nice value is kept");
            assert_eq!(after.policy, before.policy, "the policy is kept");
            match taken {
                Slice::Taken => assert_eq!(after.runtime, 300_000),
                // Kernels before 6.12 have no slice of their own to set.
                Slice::NotTaken => assert_ne!(after.runtime, 300_000),
            }
            let (major, minor) = kernel();
            if (major, minor) >= (6, 12) {
                assert_eq!(taken, Slice::Taken, "Linux {major}.{minor} takes a slice");
                // A thread started now inherits the slice; `reset` gives
                // it the kernel's own back.
                std::thread::spawn(|| {
                    assert_eq!(get().unwrap().runtime, 300_000);
                    reset().unwrap();
                    assert_ne!(get().unwrap().runtime, 300_000);
                    assert_eq!(get().unwrap().nice, 5);
                })
                .join()
                .unwrap();
            }
        })
        .join()
        .unwrap();
    }

    fn kernel() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor)
    }
}
