//! The checkpoint file format and its atomic writer.
//!
//! Layout (little-endian): the 8-byte magic `KILNCKPT`, a `u32` format version, a `u32`
//! section count, then per section a `u16` name length, the name, a `u64` payload length, a
//! `u32` CRC-32 of the payload and the payload. Sections: `state.json`, `model.bpk`,
//! `optimizer.bpk`. Every length and checksum is verified on read, so a truncated or corrupt
//! file is reported as such, never half-loaded.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::base::{Checkpoint, TrainerState};
use crate::error::{Result, TrainError};

const MAGIC: &[u8; 8] = b"KILNCKPT";
const VERSION: u32 = 1;
const STATE: &str = "state.json";
const MODEL: &str = "model.bpk";
const OPTIMIZER: &str = "optimizer.bpk";

/// Writes `checkpoint` to `path` atomically: to a temporary file beside it, synced, then
/// renamed over `path`. A crash leaves either the old file or the new one, never a torn one.
///
/// # Errors
/// [`TrainError::Io`] when the directory or file cannot be written.
pub fn write_checkpoint_atomic(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let state = serde_json::to_vec_pretty(&checkpoint.state)
        .map_err(|e| TrainError::checkpoint(path, format!("cannot serialise state: {e}")))?;
    let sections: [(&str, &[u8]); 3] = [
        (STATE, &state),
        (MODEL, &checkpoint.model),
        (OPTIMIZER, &checkpoint.optimizer),
    ];
    let mut bytes = Vec::with_capacity(64 + sections.iter().map(|(_, d)| d.len()).sum::<usize>());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (name, data) in sections {
        bytes.extend_from_slice(&(name.len() as u16).to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        bytes.extend_from_slice(data);
    }
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
///
/// # Errors
/// [`TrainError::Io`] when the file cannot be written.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io("create directory", dir, e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TrainError::io("write", path, e)
    })
}

/// Reads and verifies a checkpoint file.
///
/// # Errors
/// [`TrainError::Checkpoint`] naming the problem (not a kiln checkpoint, unknown version,
/// truncated, checksum mismatch, missing section, unreadable state) or [`TrainError::Io`].
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io("read", path, e))?;
    let bad = |reason: String| TrainError::checkpoint(path, reason);
    let mut cursor = Cursor {
        bytes: &bytes,
        at: 0,
    };
    let magic = cursor
        .take(8)
        .ok_or_else(|| bad("file is too short to be a checkpoint".into()))?;
    if magic != MAGIC {
        return Err(bad("not a kiln checkpoint (bad magic bytes)".into()));
    }
    let version = cursor.u32().ok_or_else(|| bad("truncated header".into()))?;
    if version != VERSION {
        return Err(bad(format!(
            "checkpoint format version {version} is not supported (this kiln reads version {VERSION})"
        )));
    }
    let count = cursor.u32().ok_or_else(|| bad("truncated header".into()))?;
    let (mut state, mut model, mut optimizer) = (None, None, None);
    for index in 0..count {
        let truncated = || bad(format!("truncated in section {}", index + 1));
        let name_len = cursor.u16().ok_or_else(truncated)? as usize;
        let name = cursor.take(name_len).ok_or_else(truncated)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let len = cursor.u64().ok_or_else(truncated)?;
        let crc = cursor.u32().ok_or_else(truncated)?;
        let data = usize::try_from(len)
            .ok()
            .and_then(|len| cursor.take(len))
            .ok_or_else(|| bad(format!("truncated: section {name} promises {len} bytes")))?;
        if crc32fast::hash(data) != crc {
            return Err(bad(format!(
                "section {name} is corrupt (checksum mismatch)"
            )));
        }
        match name.as_str() {
            STATE => state = Some(data),
            MODEL => model = Some(data.to_vec()),
            OPTIMIZER => optimizer = Some(data.to_vec()),
            _ => {}
        }
    }
    let missing = |what: &str| bad(format!("section {what} is missing"));
    let state: TrainerState = serde_json::from_slice(state.ok_or_else(|| missing(STATE))?)
        .map_err(|e| bad(format!("state is unreadable: {e}")))?;
    Ok(Checkpoint {
        state,
        model: model.ok_or_else(|| missing(MODEL))?,
        optimizer: optimizer.ok_or_else(|| missing(OPTIMIZER))?,
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainerConfig;

    fn sample() -> Checkpoint {
        Checkpoint {
            state: TrainerState {
                recipe: "r".into(),
                model: "m".into(),
                quantization: None,
                options: Default::default(),
                epoch: 2,
                step: 10,
                config: TrainerConfig::default(),
                history: vec![],
                mid_epoch: None,
            },
            model: vec![1, 2, 3, 4],
            optimizer: vec![9; 100],
        }
    }

    fn read_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.ckpt");
        std::fs::write(&path, bytes).unwrap();
        read_checkpoint(&path).unwrap_err().to_string()
    }

    #[test]
    fn round_trip_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("c.ckpt");
        write_checkpoint_atomic(&path, &sample()).unwrap();
        let back = read_checkpoint(&path).unwrap();
        assert_eq!(back.state, sample().state);
        assert_eq!(back.optimizer, sample().optimizer);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn truncation_corruption_and_foreign_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.ckpt");
        write_checkpoint_atomic(&path, &sample()).unwrap();
        let good = std::fs::read(&path).unwrap();
        assert!(read_err(&good[..good.len() - 10]).contains("truncated"));
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert!(read_err(&flipped).contains("optimizer.bpk is corrupt (checksum mismatch)"));
        assert!(read_err(b"hello world, not a checkpoint").contains("not a kiln checkpoint"));
        assert!(read_err(b"").contains("too short"));
    }
}
