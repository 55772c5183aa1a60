//! Dead letters appended to a JSON-lines file, fsynced before the events are acknowledged.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{DeadLetterError, Letter};

pub(super) struct FileDestination {
    path: PathBuf,
    /// One writer at a time, so lines from concurrent batches never interleave.
    file: Mutex<tokio::fs::File>,
}

impl FileDestination {
    pub(super) async fn open(path: &Path) -> Result<FileDestination, DeadLetterError> {
        // 0600 when created: dead letters hold full row images (personal data, maybe secrets), so
        // only the daemon's user may read them. An existing file keeps the mode it was given.
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .await
            .map_err(|e| DeadLetterError::Open(format!("{}: {e}", path.display())))?;
        Ok(FileDestination { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) async fn write(&self, letters: &[Letter]) -> Result<(), DeadLetterError> {
        let mut buf = Vec::with_capacity(letters.len() * 512);
        for l in letters {
            // Serialising a serde_json::Value cannot fail.
            let _ = serde_json::to_writer(&mut buf, &l.record);
            buf.push(b'\n');
        }
        let mut file = self.file.lock().await;
        let werr = |e: std::io::Error| DeadLetterError::Write(format!("{}: {e}", self.path.display()));
        file.write_all(&buf).await.map_err(werr)?;
        file.flush().await.map_err(werr)?;
        // Durable before the events are acknowledged.
        file.sync_data().await.map_err(werr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_new_dead_letter_file_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead-letters.jsonl");
        let _ = FileDestination::open(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }
}
