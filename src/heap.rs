//! The process's heap: glibc malloc's limits, set once at start.
//!
//! The data path allocates and frees buffers of 1–8 MiB many times a second
//! (NBD and FUSE requests, batches, log entries). With glibc's defaults each
//! free of such a buffer gives its pages back to the kernel (trimming the top of
//! the heap, or unmapping a chunk above the dynamic mmap threshold), and the next
//! allocation faults every page in again, zeroed: a `perf` profile of a cold
//! sequential read through btfuse spent about 18 % of the daemon's time in page
//! faults for this. Fixed limits keep freed buffers for reuse. They do not raise
//! the peak (VmHWM) the benchmarks bound, only how soon memory above it is
//! returned; BENCHMARKS.md has the measurements, and jemalloc and mimalloc, which
//! we tried in their place, each held 120–250 MiB more at peak.

/// Allocations up to this size come from the heap and are reused once freed
/// (glibc's own dynamic threshold stops at the same 32 MiB, but only after a
/// chunk that size has been freed once).
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of a heap beyond this is returned to the kernel.
const TRIM_THRESHOLD: i32 = 64 << 20;

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
