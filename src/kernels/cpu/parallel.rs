//! Helpers for kernels that split their work over rayon's threads.

use rayon::prelude::*;

use super::features::wide_fn;

/// Values per parallel task of an elementwise map: large enough to amortize the task, small enough to stay
/// in L2.
pub const MAP_CHUNK: usize = 1 << 15;

/// `f` of each value of `src`, in parallel chunks compiled for the widest SIMD the CPU has.
pub fn par_map<S: Copy + Sync, D: Copy + Default + Send>(
    src: &[S],
    f: impl Fn(S) -> D + Sync,
) -> Vec<D> {
    let mut out = vec![D::default(); src.len()];
    out.par_chunks_mut(MAP_CHUNK)
        .zip(src.par_chunks(MAP_CHUNK))
        .for_each(|(out, src)| map_into(out, src, &f));
    out
}

/// `f(a, b)` of each pair of values of `a` and `b` (of one length), in parallel chunks compiled for the
/// widest SIMD the CPU has.
pub fn par_zip_map<S: Copy + Sync, D: Copy + Default + Send>(
    a: &[S],
    b: &[S],
    f: impl Fn(S, S) -> D + Sync,
) -> Vec<D> {
    let mut out = vec![D::default(); a.len()];
    out.par_chunks_mut(MAP_CHUNK)
        .zip(a.par_chunks(MAP_CHUNK).zip(b.par_chunks(MAP_CHUNK)))
        .for_each(|(out, (a, b))| zip_map_into(out, a, b, &f));
    out
}

wide_fn! {
    fn map_into[S: Copy, D, F: Fn(S) -> D](out: &mut [D], src: &[S], f: &F) = map_portable;
}

wide_fn! {
    fn zip_map_into[S: Copy, D, F: Fn(S, S) -> D](out: &mut [D], a: &[S], b: &[S], f: &F) = zip_map_portable;
}

#[inline(always)]
fn map_portable<S: Copy, D, F: Fn(S) -> D>(out: &mut [D], src: &[S], f: &F) {
    out.iter_mut().zip(src).for_each(|(o, &s)| *o = f(s));
}

#[inline(always)]
fn zip_map_portable<S: Copy, D, F: Fn(S, S) -> D>(out: &mut [D], a: &[S], b: &[S], f: &F) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = f(x, y);
    }
}

/// A pointer into a buffer that the tasks of one parallel loop share: each task reads, or writes, the
/// elements it owns through [`TaskPtr::at`]. Rust cannot see that the tasks touch disjoint elements (their
/// blocks are strided, or not contiguous), so the buffer is reached through a raw pointer, and the contract
/// is made at [`TaskPtr::new`].
pub struct TaskPtr<T>(*mut T);

impl<T> Clone for TaskPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for TaskPtr<T> {}

// SAFETY: the contract of `TaskPtr::new`: no element is written by one task while another reads or writes
// it, and the buffer outlives the loop.
unsafe impl<T: Send + Sync> Send for TaskPtr<T> {}
unsafe impl<T: Send + Sync> Sync for TaskPtr<T> {}

impl<T> TaskPtr<T> {
    /// Shares `ptr` with the tasks of a parallel loop.
    ///
    /// # Safety
    /// The buffer `ptr` points into outlives every task that uses the returned value; no element is written
    /// by one task while another task reads or writes it; a buffer reached through a `*const` is only read.
    pub unsafe fn new(ptr: *mut T) -> Self {
        Self(ptr)
    }

    /// [`TaskPtr::new`] for a buffer that the tasks only read.
    ///
    /// # Safety
    /// As [`TaskPtr::new`]; nothing writes through the pointers [`TaskPtr::at`] returns.
    pub unsafe fn read_only(ptr: *const T) -> Self {
        Self(ptr.cast_mut())
    }

    /// The element `offset` values in (not dereferenced here). A method, so that closures capture the whole
    /// `TaskPtr`, which is `Sync`, rather than its pointer field, which is not.
    pub fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}
