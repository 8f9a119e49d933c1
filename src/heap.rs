//! The process's heap: glibc malloc's limits, set once at start.
//!
//! The data path allocates and frees buffers of 1 MiB and more many times a
//! second (NBD and FUSE requests, batches, log entries). With glibc's defaults
//! a freed buffer's pages often went back to the kernel (trimming the top of
//! the heap, or unmapping a chunk above the dynamic mmap threshold), and the
//! next allocation faulted every page in again, zeroed: a `perf` profile of a
//! cold sequential read through btfuse spent about 18 % of the daemon's time in
//! page faults for this. Fixed limits keep request-sized buffers for reuse.
//! Larger ones (a batch, a log entry) are still mapped on their own and
//! returned when freed, so they cannot strand heap memory: with a 32 MiB mmap
//! threshold instead, btfuse's peak RSS in its write benchmark rose by about
//! 20 MiB at the same speed. jemalloc and mimalloc (preloaded) each held
//! 123–247 MiB more at peak. BENCHMARKS.md has the runs.

/// Allocations up to this size come from the heap and are reused once freed: a
/// 1 MiB request and its header, with room.
const MMAP_THRESHOLD: i32 = 2 << 20;

/// Free memory at the top of a heap beyond this is returned to the kernel.
const TRIM_THRESHOLD: i32 = 16 << 20;

/// Sets the limits above. Call before the first thread starts: each later
/// thread's arena follows them.
pub fn tune() {
    for (parameter, value) in [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        // SAFETY: mallopt only changes malloc's tunables; it takes no pointers
        // and is called before any other thread exists.
        let accepted = unsafe { libc::mallopt(parameter, value) };
        if accepted != 1 {
            // Not fatal: the defaults are correct, only slower.
            eprintln!("warning: malloc refused parameter {parameter} = {value}");
        }
    }
}
