//! The scratch folder of a multi-stage run's intermediates: made only when a stage writes
//! there, and removed with everything in it when the run ends, whether it succeeded, failed
//! or was interrupted (Ctrl-C cancels the job, whose error ends the run).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

pub(super) struct Scratch {
    path: PathBuf,
    made: AtomicBool,
}

impl Scratch {
    /// A fresh folder name under `parent` (not made yet).
    pub(super) fn new(parent: &Path) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("shardmerge-stages-{}-{nanos:08x}", std::process::id());
        Scratch {
            path: parent.join(name),
            made: AtomicBool::new(false),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the folder.
    pub(super) fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.path).map_err(|e| {
            Error::usage(
                self.path.display().to_string(),
                format!("cannot make the scratch folder for the intermediate stages: {e}"),
            )
        })?;
        self.made.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.made.load(Ordering::SeqCst) {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!(
                    "warning: could not remove the intermediates' scratch folder {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}
