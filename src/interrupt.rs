//! Stopping a long computation part-way: the [`Interrupt`] a caller hands in, asked between steps.

use crate::Result;

/// Asked between the steps of a long computation (the decoding steps of `generate`, the vision tower's blocks,
/// the encoder's layers) whether to go on: an error from [`Interrupt::check`], normally
/// [`crate::Error::Interrupted`], ends the computation with that error. The computation keeps its state in locals,
/// so a model stays usable after an interrupted call. The crate never looks at signals itself: the caller
/// decides (the Python bindings check for Ctrl-C).
pub trait Interrupt {
    /// `Ok(())` to go on; called often, so it should be cheap.
    fn check(&self) -> Result<()>;
}

/// The [`Interrupt`] of a computation that always runs to its end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Uninterrupted;

impl Interrupt for Uninterrupted {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// Runs `f`, a computation on candle's error type that calls the check it is given between its chunks (the
/// row chunks of [`crate::layers::ops::pre_norm_residual`]), so that one large input cannot run long without
/// a check. A stop travels through `f` as a candle error and comes back as the [`Interrupt`]'s own error.
pub fn checked_within<T>(
    interrupt: &dyn Interrupt,
    f: impl FnOnce(&dyn Fn() -> candle_core::Result<()>) -> candle_core::Result<T>,
) -> Result<T> {
    let stopped = std::cell::Cell::new(None);
    let check = || {
        interrupt.check().map_err(|err| {
            stopped.set(Some(err));
            candle_core::Error::Msg("interrupted".into())
        })
    };
    let result = f(&check);
    match stopped.into_inner() {
        Some(err) => Err(err),
        None => Ok(result?),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::Error;

    /// Stops at its `n`th check.
    struct StopAt {
        n: usize,
        checks: Cell<usize>,
    }

    impl Interrupt for StopAt {
        fn check(&self) -> Result<()> {
            self.checks.set(self.checks.get() + 1);
            if self.checks.get() >= self.n {
                Err(Error::Interrupted)
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_stop_inside_a_candle_computation_comes_back_as_the_interrupts_error() {
        let interrupt = StopAt {
            n: 3,
            checks: Cell::new(0),
        };
        let chunks = Cell::new(0);
        let result = checked_within(&interrupt, |check| {
            for _ in 0..10 {
                check()?;
                chunks.set(chunks.get() + 1);
            }
            Ok(())
        });
        assert!(matches!(result, Err(Error::Interrupted)), "{result:?}");
        assert_eq!(
            chunks.get(),
            2,
            "the computation goes on no further than the stop"
        );
    }

    #[test]
    fn without_a_stop_the_computation_and_its_own_errors_pass_through() {
        assert_eq!(
            checked_within(&Uninterrupted, |check| check().map(|_| 7)).unwrap(),
            7
        );
        let failed = checked_within(&Uninterrupted, |_| -> candle_core::Result<()> {
            candle_core::bail!("shape mismatch")
        });
        assert!(matches!(failed, Err(Error::Candle(_))), "{failed:?}");
    }
}
