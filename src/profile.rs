//! An opt-in profile of where a forward pass spends its time, by operation kind and vision stage, that adds
//! up: each [`span`] records its *self* time (its wall time minus that of the spans opened inside it on the
//! same thread), so the kinds of one pass sum to the outermost span's wall time, and the time no inner span
//! covers shows as the outer span's own kind (for the tower: `"tower: other"`).
//!
//! Off by default, when a span costs one relaxed atomic load. `benches/tower_profile.py` turns it on through
//! the Python bindings, runs the tower and prints the table. Spans are opened by the thread that drives the
//! model (the layers, not the kernels' rayon workers), so wall time on that thread is the pass's time.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// What the spans recorded since the profile was last taken, keyed by (stage, kind).
static TOTALS: Mutex<BTreeMap<(Option<usize>, &'static str), Entry>> = Mutex::new(BTreeMap::new());

/// The totals of one (stage, kind).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Entry {
    pub calls: u64,
    /// Self time: the spans' wall time minus that of the spans inside them.
    pub seconds: f64,
    /// Floating-point (or integer multiply-add) operations the spans declared, 2 per multiply-add.
    pub flops: f64,
}

/// One row of [`take`]: the vision stage the spans ran in (`None` outside the tower's stages), their kind and
/// their totals.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub stage: Option<usize>,
    pub kind: &'static str,
    pub entry: Entry,
}

thread_local! {
    /// The open spans' child time, innermost last, and the stage the thread is in.
    static STACK: RefCell<(Vec<Duration>, Option<usize>)> = const { RefCell::new((Vec::new(), None)) };
}

/// Turns recording on or off; either way the totals recorded so far stay until [`take`].
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// The totals recorded since the last call, by stage then kind, and clears them.
pub fn take() -> Vec<Row> {
    let totals = std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()));
    totals
        .into_iter()
        .map(|((stage, kind), entry)| Row { stage, kind, entry })
        .collect()
}

/// An open span; records when dropped.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    open: Option<(Instant, &'static str, f64)>,
}

impl Span {
    /// Declares `flops` more operations done inside the span.
    pub fn add_flops(&mut self, flops: f64) {
        if let Some((_, _, total)) = &mut self.open {
            *total += flops;
        }
    }
}

/// Opens a span of `kind` that does no declared arithmetic.
pub fn span(kind: &'static str) -> Span {
    span_with_flops(kind, 0.0)
}

/// Opens a span of `kind` that does `flops` operations (2 per multiply-add).
pub fn span_with_flops(kind: &'static str, flops: f64) -> Span {
    if !ENABLED.load(Ordering::Relaxed) {
        return Span { open: None };
    }
    STACK.with(|s| s.borrow_mut().0.push(Duration::ZERO));
    Span {
        open: Some((Instant::now(), kind, flops)),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some((start, kind, flops)) = self.open.take() else {
            return;
        };
        let wall = start.elapsed();
        let (children, stage) = STACK.with(|s| {
            let mut s = s.borrow_mut();
            let children = s.0.pop().unwrap_or_default();
            if let Some(parent) = s.0.last_mut() {
                *parent += wall;
            }
            (children, s.1)
        });
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let entry = totals.entry((stage, kind)).or_default();
        entry.calls += 1;
        entry.seconds += wall.saturating_sub(children).as_secs_f64();
        entry.flops += flops;
    }
}

/// Marks the spans this thread opens until the guard drops as the vision tower's stage `stage`.
pub fn stage(stage: usize) -> StageGuard {
    let previous = STACK.with(|s| s.borrow_mut().1.replace(stage));
    StageGuard { previous }
}

/// Restores the stage that was current before [`stage`].
pub struct StageGuard {
    previous: Option<usize>,
}

impl Drop for StageGuard {
    fn drop(&mut self) {
        STACK.with(|s| s.borrow_mut().1 = self.previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Self times add up to the outer span's wall time, per stage, and a disabled profile records nothing.
    /// Other tests running at the same time may record their own spans while this one has the profile on:
    /// only this test's kinds are looked at.
    #[test]
    fn self_times_add_up_to_the_outer_span() {
        let sleep = |ms| std::thread::sleep(Duration::from_millis(ms));
        {
            let _off = span("test: off");
        }
        set_enabled(true);
        let outer_start = Instant::now();
        {
            let _outer = span("test: outer");
            sleep(5);
            let _stage = stage(1);
            {
                let _inner = span_with_flops("test: inner", 10.0);
                sleep(10);
                let _innermost = span("test: innermost");
                sleep(40);
            }
        }
        let wall = outer_start.elapsed().as_secs_f64();
        set_enabled(false);
        let rows: Vec<Row> = take()
            .into_iter()
            .filter(|r| r.kind.starts_with("test: "))
            .collect();
        let kinds: Vec<_> = rows.iter().map(|r| (r.stage, r.kind)).collect();
        assert_eq!(
            kinds,
            [
                (None, "test: outer"),
                (Some(1), "test: inner"),
                (Some(1), "test: innermost")
            ]
        );
        // Each span's time counted once: no more than the wall time around them (counted twice, the inner
        // spans would pass it), no less than the 55 ms slept inside them (a sleep lasts at least its time). The
        // gap to the wall time is the spans' bookkeeping plus whatever preempts the thread, unbounded on a
        // loaded machine or an emulator.
        let total: f64 = rows.iter().map(|r| r.entry.seconds).sum();
        assert!(total <= wall && total >= 0.055, "{total} vs {wall}");
        // The inner span's own 10 ms, without the innermost span's 40 ms (the margin is for slow machines
        // and emulators, where a sleep may overrun).
        assert!(rows[1].entry.seconds >= 0.010 && rows[1].entry.seconds < 0.040);
        assert_eq!(rows[1].entry.flops, 10.0);
    }
}
