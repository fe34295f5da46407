//! Save files: a guest's state (QEMU's migration stream) between a header
//! that says what the file holds and a trailer that proves it is whole.
//!
//! ```text
//! "KVMASAVE" | version: u32 | header length: u32 | header (JSON) | SHA-256 of the above
//! stream (QEMU's migration format, opaque here)
//! "KVMA-END" | stream length: u64 | XXH3-128 of the stream
//! ```
//!
//! Integers are little-endian. The trailer lets the stream be written as
//! it arrives, without knowing its length up front. The checksums guard
//! against damage, not tampering (nothing is keyed), so the stream's is
//! XXH3-128: it keeps up with QEMU where SHA-256 would not, and a flipped
//! bit still changes it. A file is created
//! under a hidden temporary name and published with `link(2)`, so a save
//! never replaces an existing file and a half-written one never carries
//! the final name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

/// First bytes of every save file.
pub const SAVE_MAGIC: [u8; 8] = *b"KVMASAVE";
/// First bytes of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"KVMA-END";
/// Layout version written by this code; others are refused.
pub const SAVE_FORMAT_VERSION: u32 = 1;
/// A header longer than this is taken for garbage.
pub const MAX_HEADER_BYTES: u32 = 1 << 20;
/// Size of the trailer.
pub const TRAILER_LEN: usize = 8 + 8 + STREAM_DIGEST_LEN;
const PREFIX_LEN: usize = 8 + 4 + 4;
const DIGEST_LEN: usize = 32;
const STREAM_DIGEST_LEN: usize = 16;
const COPY_BUFFER: usize = 1 << 20;

/// What a save file says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveHeader<T> {
    /// Name of the instance that was saved.
    pub instance_name: String,
    /// Its uuid; a restore must match the record of that name, if any.
    pub instance_uuid: String,
    /// Whether the guest was running (not paused) when it was saved.
    pub was_running: bool,
    /// When the save began, in seconds since the Unix epoch.
    pub saved_at_unix: u64,
    /// Everything needed to start an identical QEMU.
    pub runtime: T,
}

/// The trailer's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Bytes of stream between header and trailer.
    pub stream_len: u64,
    /// XXH3-128 of those bytes, little-endian.
    pub stream_xxh3: [u8; STREAM_DIGEST_LEN],
}

/// Why a save file can't be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SaveFileError {
    /// The file doesn't start with the magic.
    #[error("not a kvm-agent save file (wrong magic)")]
    NotASaveFile,
    /// Written by another layout version.
    #[error("format version {found} is not supported (this agent reads version {supported})")]
    UnsupportedVersion {
        /// What the file says.
        found: u32,
        /// What this code reads.
        supported: u32,
    },
    /// The header length is absurd.
    #[error("the header claims {0} bytes, more than the {MAX_HEADER_BYTES} allowed")]
    HeaderTooLarge(u32),
    /// The header's checksum doesn't match.
    #[error("the header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// The header passed its checksum but isn't what this code expects.
    #[error("the header can't be read")]
    HeaderUnreadable(#[source] serde_json::Error),
    /// The file ends too early.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// The stream length in the trailer doesn't fit the file.
    #[error(
        "truncated or extended: the trailer says {expected} stream bytes, the file holds {found}"
    )]
    StreamLength {
        /// What the trailer says.
        expected: u64,
        /// What is there.
        found: u64,
    },
    /// The stream's checksum doesn't match.
    #[error("the stream is corrupt (checksum mismatch)")]
    StreamChecksum,
    /// A save would replace an existing file.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// The OS refused.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl SaveFileError {
    /// Whether the file is at fault (rather than the disk or the caller).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            Self::NotASaveFile
                | Self::UnsupportedVersion { .. }
                | Self::HeaderTooLarge(_)
                | Self::HeaderChecksum
                | Self::HeaderUnreadable(_)
                | Self::Truncated(_)
                | Self::StreamLength { .. }
                | Self::StreamChecksum
        )
    }

    /// The OS error behind this one, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SaveFileError + 'a {
    move |source| SaveFileError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Encodes a header: prefix, JSON and checksum. Pure.
pub fn encode_header<T: Serialize>(header: &SaveHeader<T>) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("a save header always serializes");
    let len = u32::try_from(json.len()).expect("header is far below 4 GiB");
    let mut out = Vec::with_capacity(PREFIX_LEN + json.len() + DIGEST_LEN);
    out.extend_from_slice(&SAVE_MAGIC);
    out.extend_from_slice(&SAVE_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&json);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Reads and checks a header from the start of `reader`. Returns it and
/// its size in bytes, which is where the stream begins.
pub fn decode_header<T: DeserializeOwned>(
    reader: &mut impl Read,
) -> Result<(SaveHeader<T>, u64), SaveFileError> {
    let mut prefix = [0u8; PREFIX_LEN];
    read_exact(reader, &mut prefix, "no complete header prefix")?;
    if prefix[..8] != SAVE_MAGIC {
        return Err(SaveFileError::NotASaveFile);
    }
    let version = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
    if version != SAVE_FORMAT_VERSION {
        return Err(SaveFileError::UnsupportedVersion {
            found: version,
            supported: SAVE_FORMAT_VERSION,
        });
    }
    let len = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes"));
    if len > MAX_HEADER_BYTES {
        return Err(SaveFileError::HeaderTooLarge(len));
    }
    let mut rest = vec![0u8; len as usize + DIGEST_LEN];
    read_exact(reader, &mut rest, "the header is cut short")?;
    let (json, digest) = rest.split_at(len as usize);
    let mut hasher = Sha256::new();
    hasher.update(prefix);
    hasher.update(json);
    if hasher.finalize().as_slice() != digest {
        return Err(SaveFileError::HeaderChecksum);
    }
    let header = serde_json::from_slice(json).map_err(SaveFileError::HeaderUnreadable)?;
    Ok((header, (PREFIX_LEN + rest.len()) as u64))
}

fn read_exact(
    reader: &mut impl Read,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), SaveFileError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => SaveFileError::Truncated(what),
        _ => SaveFileError::Io {
            op: "read",
            path: PathBuf::new(),
            source: e,
        },
    })
}

/// Encodes a trailer. Pure.
pub fn encode_trailer(trailer: &Trailer) -> [u8; TRAILER_LEN] {
    let mut out = [0u8; TRAILER_LEN];
    out[..8].copy_from_slice(&TRAILER_MAGIC);
    out[8..16].copy_from_slice(&trailer.stream_len.to_le_bytes());
    out[16..].copy_from_slice(&trailer.stream_xxh3);
    out
}

/// Decodes a trailer. Pure.
pub fn decode_trailer(bytes: &[u8; TRAILER_LEN]) -> Result<Trailer, SaveFileError> {
    if bytes[..8] != TRAILER_MAGIC {
        return Err(SaveFileError::Truncated("the trailer is missing"));
    }
    Ok(Trailer {
        stream_len: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
        stream_xxh3: bytes[16..].try_into().expect("16 bytes"),
    })
}

/// Writes one save file: header first, then the stream as it arrives,
/// then the trailer. Until [`SaveWriter::finish`] the file has a hidden
/// temporary name, and dropping the writer removes it.
pub struct SaveWriter {
    file: File,
    temp_path: PathBuf,
    path: PathBuf,
    hasher: Box<Xxh3>,
    stream_len: u64,
    header_len: u64,
    finished: bool,
}

impl std::fmt::Debug for SaveWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveWriter")
            .field("path", &self.path)
            .field("temp_path", &self.temp_path)
            .field("stream_len", &self.stream_len)
            .finish_non_exhaustive()
    }
}

impl SaveWriter {
    /// Creates the temporary file (mode 0600) and writes the header.
    /// Refuses at once when `path` already exists.
    pub fn create<T: Serialize>(
        path: &Path,
        header: &SaveHeader<T>,
    ) -> Result<SaveWriter, SaveFileError> {
        if fs::symlink_metadata(path).is_ok() {
            return Err(SaveFileError::Exists(path.to_owned()));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let file_name = path
            .file_name()
            .ok_or_else(|| SaveFileError::Io {
                op: "save to",
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
            })?
            .to_string_lossy();
        let temp_path = dir.join(format!(".{file_name}.partial-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)
            .map_err(io_error("create", &temp_path))?;
        let encoded = encode_header(header);
        // Built before the first write, so a failure removes the file.
        let mut writer = SaveWriter {
            header_len: encoded.len() as u64,
            file,
            temp_path,
            path: path.to_owned(),
            hasher: Box::new(Xxh3::new()),
            stream_len: 0,
            finished: false,
        };
        writer
            .file
            .write_all(&encoded)
            .map_err(io_error("write", &writer.temp_path))?;
        Ok(writer)
    }

    /// Appends stream bytes.
    pub fn write_stream(&mut self, bytes: &[u8]) -> Result<(), SaveFileError> {
        self.hasher.update(bytes);
        self.stream_len += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(io_error("write", &self.temp_path))
    }

    /// Copies a whole stream from `reader` (a pipe from QEMU) until EOF.
    pub fn copy_stream(&mut self, reader: &mut impl Read) -> Result<(), SaveFileError> {
        let mut buf = vec![0u8; COPY_BUFFER];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.write_stream(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("read the stream for", &self.path)(e)),
            }
        }
    }

    /// The name the file gets once finished.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stream bytes so far.
    pub fn stream_len(&self) -> u64 {
        self.stream_len
    }

    /// Writes the trailer, fsyncs and publishes the file under its name.
    /// Returns the file's size.
    pub fn finish(mut self) -> Result<u64, SaveFileError> {
        let trailer = Trailer {
            stream_len: self.stream_len,
            stream_xxh3: self.hasher.digest128().to_le_bytes(),
        };
        self.file
            .write_all(&encode_trailer(&trailer))
            .map_err(io_error("write", &self.temp_path))?;
        self.file
            .sync_all()
            .map_err(io_error("fsync", &self.temp_path))?;
        // link(2) fails when the name is taken, where rename(2) would replace.
        fs::hard_link(&self.temp_path, &self.path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                SaveFileError::Exists(self.path.clone())
            } else {
                io_error("publish", &self.path)(e)
            }
        })?;
        self.finished = true;
        let _ = fs::remove_file(&self.temp_path);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("fsync", dir))?;
        Ok(self.header_len + self.stream_len + TRAILER_LEN as u64)
    }
}

impl Drop for SaveWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}

/// An opened save file whose header and trailer have been checked.
#[derive(Debug)]
pub struct SaveFile<T> {
    /// The header.
    pub header: SaveHeader<T>,
    /// The trailer.
    pub trailer: Trailer,
    file: File,
    path: PathBuf,
    stream_start: u64,
}

impl<T: DeserializeOwned> SaveFile<T> {
    /// Opens a save file and checks its header and that the trailer fits
    /// the file's size. Reads nothing of the stream yet.
    pub fn open(path: &Path) -> Result<SaveFile<T>, SaveFileError> {
        let file = File::open(path).map_err(io_error("open", path))?;
        Self::from_file(file, path)
    }

    /// Checks a save file the caller opened itself (`path` names it in
    /// errors), the way [`open`](Self::open) does.
    pub fn from_file(mut file: File, path: &Path) -> Result<SaveFile<T>, SaveFileError> {
        let size = file.metadata().map_err(io_error("stat", path))?.len();
        let (header, stream_start) =
            decode_header(&mut io::BufReader::new(&mut file)).map_err(|e| with_path(e, path))?;
        let Some(stream_and_trailer) = size.checked_sub(stream_start) else {
            return Err(SaveFileError::Truncated("the header is cut short"));
        };
        if stream_and_trailer < TRAILER_LEN as u64 {
            return Err(SaveFileError::Truncated("the trailer is missing"));
        }
        let mut bytes = [0u8; TRAILER_LEN];
        file.seek(SeekFrom::Start(size - TRAILER_LEN as u64))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(io_error("read", path))?;
        let trailer = decode_trailer(&bytes)?;
        let found = stream_and_trailer - TRAILER_LEN as u64;
        if trailer.stream_len != found {
            return Err(SaveFileError::StreamLength {
                expected: trailer.stream_len,
                found,
            });
        }
        Ok(SaveFile {
            header,
            trailer,
            file,
            path: path.to_owned(),
            stream_start,
        })
    }
}

impl<T> SaveFile<T> {
    /// Opens the stream for a reader of its own, such as QEMU loading it:
    /// a new open file description of the same file (not a fresh lookup of
    /// the path, which might since name another file), positioned at the
    /// stream's first byte. Reading it leaves this handle's offset alone,
    /// so [`verify`](Self::verify) can run beside it.
    pub fn open_stream(&self) -> Result<File, SaveFileError> {
        use std::os::fd::AsRawFd;
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let mut stream = File::open(&proc_path).map_err(io_error("reopen", &self.path))?;
        stream
            .seek(SeekFrom::Start(self.stream_start))
            .map_err(io_error("seek", &self.path))?;
        Ok(stream)
    }

    /// Reads the whole stream and checks it against the trailer, so a
    /// corrupt file is refused before anything is started from it.
    pub fn verify(&mut self) -> Result<(), SaveFileError> {
        self.copy_stream_to(&mut io::sink())
    }

    /// Feeds the stream into `writer` (a pipe into QEMU), checking it on
    /// the way. Errors of `writer` come back as [`SaveFileError::Io`].
    pub fn copy_stream_to(&mut self, writer: &mut impl Write) -> Result<(), SaveFileError> {
        self.file
            .seek(SeekFrom::Start(self.stream_start))
            .map_err(io_error("seek", &self.path))?;
        let mut left = self.trailer.stream_len;
        let mut hasher = Box::new(Xxh3::new());
        let mut buf = vec![0u8; COPY_BUFFER];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match self.file.read(&mut buf[..want]) {
                Ok(0) => return Err(SaveFileError::Truncated("the stream is cut short")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("read", &self.path)(e)),
            };
            hasher.update(&buf[..n]);
            writer
                .write_all(&buf[..n])
                .map_err(io_error("feed the stream of", &self.path))?;
            left -= n as u64;
        }
        if hasher.digest128().to_le_bytes() != self.trailer.stream_xxh3 {
            return Err(SaveFileError::StreamChecksum);
        }
        Ok(())
    }
}

fn with_path(e: SaveFileError, path: &Path) -> SaveFileError {
    match e {
        SaveFileError::Io { op, source, .. } => SaveFileError::Io {
            op,
            path: path.to_owned(),
            source,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SaveHeader<serde_json::Value> {
        SaveHeader {
            instance_name: "web1".into(),
            instance_uuid: "6a1c1f40-5a43-4a0c-9a6b-0f0ad6d4b7a1".into(),
            was_running: true,
            saved_at_unix: 1_700_000_000,
            runtime: serde_json::json!({ "memory_mib": 128 }),
        }
    }

    fn write_sample(dir: &Path, stream: &[u8]) -> PathBuf {
        let path = dir.join("web1.save");
        let mut w = SaveWriter::create(&path, &header()).unwrap();
        w.write_stream(stream).unwrap();
        w.finish().unwrap();
        path
    }

    fn open(path: &Path) -> Result<SaveFile<serde_json::Value>, SaveFileError> {
        SaveFile::open(path).and_then(|mut f| f.verify().map(|()| f))
    }

    #[test]
    fn header_round_trips() {
        let bytes = encode_header(&header());
        let (decoded, len) = decode_header::<serde_json::Value>(&mut &bytes[..]).unwrap();
        assert_eq!(decoded, header());
        assert_eq!(len, bytes.len() as u64);
    }

    #[test]
    fn every_flipped_header_byte_is_caught() {
        let bytes = encode_header(&header());
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x01;
            assert!(
                decode_header::<serde_json::Value>(&mut &damaged[..]).is_err(),
                "byte {i} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn a_newer_version_is_named() {
        let mut bytes = encode_header(&header());
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            decode_header::<serde_json::Value>(&mut &bytes[..]),
            Err(SaveFileError::UnsupportedVersion { found: 7, .. })
        ));
    }

    #[test]
    fn a_huge_header_length_is_refused_before_allocating() {
        let mut bytes = encode_header(&header());
        bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_header::<serde_json::Value>(&mut &bytes[..]),
            Err(SaveFileError::HeaderTooLarge(_))
        ));
    }

    #[test]
    fn file_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let stream: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let path = write_sample(dir.path(), &stream);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut file = open(&path).unwrap();
        assert_eq!(file.header, header());
        let mut out = Vec::new();
        file.copy_stream_to(&mut out).unwrap();
        assert_eq!(out, stream);
        // Nothing but the published file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_existing_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            SaveWriter::create(&path, &header()),
            Err(SaveFileError::Exists(_))
        ));
        // Taken between create and finish: link(2) refuses too.
        let other = dir.path().join("raced");
        let w = SaveWriter::create(&other, &header()).unwrap();
        fs::write(&other, b"first").unwrap();
        assert!(matches!(w.finish(), Err(SaveFileError::Exists(_))));
        assert_eq!(fs::read(&other).unwrap(), b"first");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SaveWriter::create(&dir.path().join("x"), &header()).unwrap();
        w.write_stream(b"partial").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn damage_anywhere_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let stream = vec![0xabu8; 100_000];
        let path = write_sample(dir.path(), &stream);
        let good = fs::read(&path).unwrap();
        let header_len = encode_header(&header()).len();
        // One flipped byte in the header, the stream and the trailer.
        for at in [
            3,
            header_len - 1,
            header_len + 5,
            good.len() - 20,
            good.len() - 1,
        ] {
            let mut bytes = good.clone();
            bytes[at] ^= 0x80;
            fs::write(&path, &bytes).unwrap();
            assert!(open(&path).is_err(), "flip at {at} went unnoticed");
        }
        for cut in [10, header_len + 10, good.len() - 1] {
            fs::write(&path, &good[..cut]).unwrap();
            let err = open(&path).unwrap_err();
            assert!(err.is_corrupt(), "cut at {cut}: {err}");
        }
        fs::write(&path, &good).unwrap();
        open(&path).unwrap();
    }
}
