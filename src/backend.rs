//! Which execution backend runs an evaluation: the one place that turns the admin's
//! settings and an execution [`Job`] into a running [`Backend`]. Today that is the
//! supervised local worker pool (`pool.workers` sandboxed `evald worker` processes on
//! `pool.devices`); a cluster backend plugs in here, and nothing above this module (the
//! daemon, `evald run`) or below it (the pipeline) changes.

use crate::config::Settings;
use crate::exec::{Backend, Job};
use crate::pool::protocol::FatalKind;
use crate::pool::{PoolError, PoolPredictor};

/// A backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The local worker pool did not start.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl BackendError {
    /// Whether the vendor's model is the cause (it cannot be loaded), as opposed to
    /// evald's side (device, sandbox, disk, workers that keep dying): the daemon rejects
    /// the first and retries the second.
    pub fn is_model_problem(&self) -> bool {
        matches!(
            self,
            BackendError::Pool(PoolError::Fatal {
                kind: Some(FatalKind::Load),
                ..
            })
        )
    }
}

/// Start the configured backend for `job`.
///
/// # Errors
/// [`BackendError`] saying why no worker could take cases.
pub fn start(settings: &Settings, job: &Job) -> Result<Box<dyn Backend + Send>, BackendError> {
    Ok(Box::new(PoolPredictor::start(&settings.pool, job)?))
}
