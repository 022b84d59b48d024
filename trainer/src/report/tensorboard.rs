//! TensorBoard event files: scalars written as TensorFlow's `Event` protocol buffers in
//! TFRecord framing (what PyTorch's `SummaryWriter` writes), and read back for `kiln plot`.
//!
//! A record is `u64 length | u32 masked CRC-32C of the length | data | u32 masked CRC-32C of
//! the data`, little-endian. The data is one `Event` message: `wall_time` (field 1, double),
//! `step` (2, int64), `file_version` (3, string), `summary` (5: `Summary { value (1):
//! Value { tag (1, string), simple_value (2, float) } }`) or `session_log` (6:
//! `SessionLog { status (1): START = 1 }`). A `START` session log at step S tells TensorBoard
//! to drop the events at steps >= S written before it: a resumed run writes one just after the
//! step it resumes from, so the curves hold no steps the checkpoint did not keep.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, TrainError};

/// One scalar as TensorBoard stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// The series' name (`loss/train`).
    pub tag: String,
    /// The x coordinate: optimizer steps since the start of the run.
    pub step: u64,
    /// Seconds since the Unix epoch when it was written.
    pub wall_time: f64,
    /// The value (TensorBoard keeps scalars as float32).
    pub value: f32,
}

/// Appends scalars to a new event file in a directory.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

/// Whether `name` is a TensorBoard event file's name.
pub fn is_event_file(name: &str) -> bool {
    name.contains("tfevents")
}

impl EventWriter {
    /// A new event file in `dir` (`events.out.tfevents.SECS.HOST.PID.NANOS.kiln`), starting with the
    /// file-version record; with `purge_from`, a `START` session log at that step, so that
    /// TensorBoard drops what earlier files hold from that step on.
    ///
    /// # Errors
    /// [`TrainError::Io`] when the directory or file cannot be created or written.
    pub fn create(dir: &Path, purge_from: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io("create directory", dir, e))?;
        let (path, file) = new_event_file(dir)?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
        };
        let mut version = Vec::new();
        put_f64(&mut version, 1, super::unix_now());
        put_bytes(&mut version, 3, b"brain.Event:2");
        writer.record(&version)?;
        if let Some(step) = purge_from {
            let mut event = event_head(step);
            put_bytes(&mut event, 6, &[0x08, 0x01]);
            writer.record(&event)?;
        }
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `value` as the scalar `tag` at `step`.
    ///
    /// # Errors
    /// [`TrainError::Io`] when the file cannot be written.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        let mut value_msg = Vec::new();
        put_bytes(&mut value_msg, 1, tag.as_bytes());
        put_key(&mut value_msg, 2, 5);
        value_msg.extend_from_slice(&(value as f32).to_le_bytes());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &value_msg);
        let mut event = event_head(step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Writes what is buffered to the file, so that TensorBoard sees it.
    ///
    /// # Errors
    /// [`TrainError::Io`] when the file cannot be written.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| TrainError::io("write", &self.path, e))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&length);
        framed.extend_from_slice(&masked_crc(&length).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out
            .write_all(&framed)
            .map_err(|e| TrainError::io("write", &self.path, e))
    }
}

/// Creates a file whose name sorts after every earlier one of this process (TensorBoard reads
/// a directory's files in name order) and never replaces one.
fn new_event_file(dir: &Path) -> Result<(PathBuf, File)> {
    let host = super::host_name();
    loop {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.{:09}.kiln",
            since.as_secs(),
            std::process::id(),
            since.subsec_nanos()
        );
        let path = dir.join(name);
        match File::create_new(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(TrainError::io("create", &path, e)),
        }
    }
}

fn event_head(step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    put_f64(&mut event, 1, super::unix_now());
    put_key(&mut event, 2, 0);
    put_varint(&mut event, step);
    event
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(out, (field << 3) | wire_type);
}

fn put_f64(out: &mut Vec<u8>, field: u64, value: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The scalars of every event file in `dir`, in the order TensorBoard applies them: files by
/// name (their names start with the creation time), records in file order, and a `START`
/// session log at step S dropping the scalars at steps >= S read before it.
///
/// # Errors
/// [`TrainError::Io`] when the directory or a file cannot be read, [`TrainError::Data`] when
/// a record's checksum or message is corrupt. A record cut short at the end of a file (a run
/// killed while writing) ends that file without an error, as in TensorBoard.
pub fn read_scalars(dir: &Path) -> Result<Vec<Scalar>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::io("read directory", dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_event_file)
        })
        .collect();
    files.sort();
    let mut scalars = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io("read", &path, e))?;
        for record in records(&bytes, &path)? {
            match decode_event(record).map_err(|reason| TrainError::data(&path, reason))? {
                Decoded::Scalars(found) => scalars.extend(found),
                Decoded::Start(step) => scalars.retain(|s: &Scalar| s.step < step),
                Decoded::Other => {}
            }
        }
    }
    Ok(scalars)
}

/// The records of one file, checksums verified.
fn records<'a>(bytes: &'a [u8], path: &Path) -> Result<Vec<&'a [u8]>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 12 {
        let (header, tail) = rest.split_at(12);
        let length_bytes = &header[..8];
        let stored = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if masked_crc(length_bytes) != stored {
            return Err(TrainError::data(
                path,
                "a record's length fails its checksum",
            ));
        }
        let length = u64::from_le_bytes(length_bytes.try_into().unwrap_or([0; 8]));
        let Some(total) = usize::try_from(length).ok().and_then(|n| n.checked_add(4)) else {
            return Err(TrainError::data(
                path,
                "a record claims an impossible length",
            ));
        };
        if tail.len() < total {
            break;
        }
        let (data, crc) = tail[..total].split_at(total - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if masked_crc(data) != stored {
            return Err(TrainError::data(path, "a record's data fails its checksum"));
        }
        out.push(data);
        rest = &tail[total..];
    }
    Ok(out)
}

enum Decoded {
    Scalars(Vec<Scalar>),
    Start(u64),
    Other,
}

/// A protocol-buffer field: its number and its value.
enum Field<'a> {
    Varint(u64, u64),
    Fixed64(u64, [u8; 8]),
    Fixed32(u64, [u8; 4]),
    Bytes(u64, &'a [u8]),
}

/// The fields of one message.
fn fields(mut data: &[u8]) -> std::result::Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let key = take_varint(&mut data)?;
        let (number, wire) = (key >> 3, key & 7);
        out.push(match wire {
            0 => Field::Varint(number, take_varint(&mut data)?),
            1 => Field::Fixed64(number, take_array(&mut data)?),
            5 => Field::Fixed32(number, take_array(&mut data)?),
            2 => {
                let length = usize::try_from(take_varint(&mut data)?).unwrap_or(usize::MAX);
                if length > data.len() {
                    return Err("a field runs past its message".into());
                }
                let (bytes, rest) = data.split_at(length);
                data = rest;
                Field::Bytes(number, bytes)
            }
            other => return Err(format!("unsupported wire type {other}")),
        });
    }
    Ok(out)
}

fn take_varint(data: &mut &[u8]) -> std::result::Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = data.split_first().ok_or("a number is cut short")?;
        *data = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err("a number is longer than 10 bytes".into())
}

fn take_array<const N: usize>(data: &mut &[u8]) -> std::result::Result<[u8; N], String> {
    if data.len() < N {
        return Err("a fixed-size field is cut short".into());
    }
    let (head, rest) = data.split_at(N);
    *data = rest;
    Ok(head.try_into().unwrap_or([0; N]))
}

fn decode_event(data: &[u8]) -> std::result::Result<Decoded, String> {
    let (mut wall_time, mut step) = (0.0, 0u64);
    let (mut summary, mut start) = (None, false);
    for field in fields(data)? {
        match field {
            Field::Fixed64(1, bytes) => wall_time = f64::from_le_bytes(bytes),
            Field::Varint(2, value) => step = value,
            Field::Bytes(5, bytes) => summary = Some(bytes),
            Field::Bytes(6, bytes) => {
                start = fields(bytes)?
                    .iter()
                    .any(|f| matches!(f, Field::Varint(1, 1)));
            }
            _ => {}
        }
    }
    if start {
        return Ok(Decoded::Start(step));
    }
    let Some(summary) = summary else {
        return Ok(Decoded::Other);
    };
    let mut scalars = Vec::new();
    for field in fields(summary)? {
        let Field::Bytes(1, value) = field else {
            continue;
        };
        let (mut tag, mut simple) = (None, None);
        for inner in fields(value)? {
            match inner {
                Field::Bytes(1, bytes) => tag = Some(String::from_utf8_lossy(bytes).into_owned()),
                Field::Fixed32(2, bytes) => simple = Some(f32::from_le_bytes(bytes)),
                _ => {}
            }
        }
        if let (Some(tag), Some(value)) = (tag, simple) {
            scalars.push(Scalar {
                tag,
                step,
                wall_time,
                value,
            });
        }
    }
    Ok(Decoded::Scalars(scalars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // TensorFlow's crc32c::Mask as written there, next to the rotation used here.
    #[allow(clippy::manual_rotate)]
    fn masked_crc_matches_tensorflow() {
        // The CRC-32C of "123456789" is 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let crc: u32 = 0xe306_9283;
        let masked = masked_crc(b"123456789");
        assert_eq!(
            masked,
            ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn scalars_round_trip_and_a_resume_drops_the_steps_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = EventWriter::create(dir.path(), None).unwrap();
        for step in 1..=4 {
            first.scalar("loss/train", step, 1.0 / step as f64).unwrap();
        }
        first.flush().unwrap();
        // Names sort by creation time; force the second file after the first.
        let second_dir = dir.path().join("later");
        let mut second = EventWriter::create(&second_dir, Some(3)).unwrap();
        second.scalar("loss/train", 3, 0.5).unwrap();
        second.flush().unwrap();
        let moved = dir.path().join(format!(
            "{}z",
            first.path().file_name().unwrap().to_str().unwrap()
        ));
        std::fs::rename(second.path(), &moved).unwrap();
        let read = read_scalars(dir.path()).unwrap();
        let steps: Vec<(u64, f32)> = read.iter().map(|s| (s.step, s.value)).collect();
        assert_eq!(steps, vec![(1, 1.0), (2, 0.5), (3, 0.5)]);
        assert!(
            read.iter()
                .all(|s| s.tag == "loss/train" && s.wall_time > 1e9)
        );
    }

    #[test]
    fn a_corrupt_record_is_an_error_and_a_cut_one_ends_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path(), None).unwrap();
        writer.scalar("a", 1, 2.0).unwrap();
        writer.flush().unwrap();
        let path = writer.path().to_path_buf();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read_scalars(dir.path()).unwrap().is_empty());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 6;
        flipped[last] ^= 0xff;
        std::fs::write(&path, &flipped).unwrap();
        let error = read_scalars(dir.path()).unwrap_err().to_string();
        assert!(error.contains("checksum"), "{error}");
    }
}
