//! Minimal reader and writer for NumPy `.npy` files of little-endian `float32` in C order:
//! what `np.save(path, array.astype(np.float32))` writes, and what PyTorch parity checks need.

use std::path::Path;

use crate::error::{Result, TrainError};

const MAGIC: &[u8] = b"\x93NUMPY";

/// An `f32` array with its shape, as stored in a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values in C (row-major) order.
    pub values: Vec<f32>,
}

/// Reads a `.npy` file holding a little-endian `float32` array in C order.
///
/// # Errors
/// [`TrainError::Data`] for a file that is not `.npy`, holds another dtype, is in Fortran
/// order or is truncated; [`TrainError::Io`] when it cannot be read.
pub fn read_npy_f32(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io("read", path, e))?;
    parse(path, &bytes)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<NpyArray> {
    let bad = |reason: String| TrainError::data(path, reason);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a .npy file (missing \\x93NUMPY magic)".into()));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported .npy format version {v}"))),
    };
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .ok_or_else(|| bad("header is truncated".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    if descr.trim_matches(['\'', '"']) != "<f4" {
        return Err(bad(format!(
            "dtype {descr} is not little-endian float32 ('<f4')"
        )));
    }
    let fortran = dict_value(header, "fortran_order").unwrap_or("False");
    if fortran != "False" {
        return Err(bad("arrays in Fortran order are not supported".into()));
    }
    let shape_text =
        dict_value(header, "shape").ok_or_else(|| bad("header has no 'shape'".into()))?;
    let shape = shape_text
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("bad shape {shape_text}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[data_start..];
    if data.len() != count * 4 {
        return Err(bad(format!(
            "shape {shape:?} needs {} bytes of data but the file has {}",
            count * 4,
            data.len()
        )));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(NpyArray { shape, values })
}

/// The text of `key`'s value in a Python dict literal such as the `.npy` header.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}'])?
    };
    Some(rest[..end].trim())
}

/// Writes `array` as a version 1.0 `.npy` file of little-endian `float32`.
///
/// # Errors
/// [`TrainError::Io`] when the file cannot be written.
pub fn write_npy_f32(path: &Path, array: &NpyArray) -> Result<()> {
    let shape = match array.shape.as_slice() {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending the header with a newline.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + array.values.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &array.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).map_err(|e| TrainError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_header_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let array = NpyArray {
            shape: vec![2, 3],
            values: vec![1.0, -2.5, 3.0, 4.0, 5.0, 6.5],
        };
        write_npy_f32(&path, &array).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!((bytes.len() - 24) % 64, 0);
        assert_eq!(read_npy_f32(&path).unwrap(), array);
    }

    #[test]
    fn parses_numpy_header_and_rejects_other_dtypes() {
        // Header as written by numpy 1.26 for np.zeros((2,), np.float32).
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 8]);
        let parsed = parse(Path::new("x.npy"), &bytes).unwrap();
        assert_eq!(parsed.shape, vec![2]);
        let mut f8 = bytes.clone();
        let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
        f8[at + 2] = b'8';
        let msg = parse(Path::new("x.npy"), &f8).unwrap_err().to_string();
        assert!(msg.contains("'<f8' is not little-endian float32"), "{msg}");
        let msg = parse(Path::new("x.npy"), &bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("needs 8 bytes of data but the file has 7"),
            "{msg}"
        );
    }
}
