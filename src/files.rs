//! Files that someone else controls, and files that someone else must read.
//!
//! Everything evald opens from the drop folder (manifest, model) or a test set (images,
//! labels) goes through [`open_regular`]: opened with `O_NONBLOCK` so a FIFO or a device
//! cannot block the open, then checked with `fstat` *on the opened descriptor* (no window
//! between a check and the open in which the name could be swapped), then switched back to
//! blocking reads. Whole-file reads are bounded ([`read_bounded`]): a vendor's 20 MB
//! manifest is refused, not amplified.
//!
//! Outputs that vendors or the team read (`report.xlsx`, `summary.json`, `REJECTED.txt`,
//! `.eml` files) are written through [`output_temp_in`]: a temp file created with mode
//! 0666 so that the process umask (systemd's `UMask=`) decides who may read it, like any
//! file the service creates, instead of tempfile's private 0600; created inside the target
//! folder, so a set-group-ID drop folder gives it the folder's group.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A file evald was asked to read cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The OS refused (missing, permissions, I/O error).
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A FIFO, socket, device or folder where a regular file is expected.
    #[error("{path}: is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Larger than what this kind of file can sensibly be.
    #[error("{path}: {size} bytes, more than the {limit} bytes accepted for this file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The bound.
        limit: u64,
    },
}

impl FileError {
    /// Whether the file simply is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "FIFO (named pipe)"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_dir() {
        "folder"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Open `path` for reading only if it is a regular file (links are followed; what they
/// point to must be regular). Never blocks on a FIFO or device.
///
/// # Errors
/// [`FileError::Io`] when it cannot be opened, [`FileError::NotRegular`] otherwise.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    open_regular_with(path, 0)
}

fn open_regular_with(path: &Path, extra_flags: i32) -> Result<File, FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | extra_flags)
        .open(path)
        .map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    // Regular files ignore O_NONBLOCK, but clear it so nothing downstream is surprised.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fd = f.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// Read a whole regular file of at most `limit` bytes (the bound is checked on the
/// descriptor's size and again while reading, for a file that grows meanwhile).
///
/// # Errors
/// As [`open_regular`], and [`FileError::TooLarge`].
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    read_from(open_regular(path)?, path, limit)
}

/// [`read_bounded`] for a file an untrusted process wrote in a folder it controls (a
/// worker's mask): the last component must not be a symbolic link (a worker could point
/// one at a file only the supervisor may read, such as a reference label) and the file
/// must have one name (nor a hard link).
///
/// # Errors
/// As [`read_bounded`]; a symbolic link is [`FileError::Io`] (`ELOOP`), a second name
/// [`FileError::NotRegular`].
pub fn read_bounded_untrusted(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let f = open_regular_with(path, libc::O_NOFOLLOW)?;
    let links = f
        .metadata()
        .map_err(|source| FileError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .nlink();
    if links != 1 {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: "hard link",
        });
    }
    read_from(f, path, limit)
}

fn read_from(f: File, path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = f.metadata().map_err(io)?.len();
    let too_large = |size| FileError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut out = Vec::with_capacity(size as usize);
    f.take(limit + 1).read_to_end(&mut out).map_err(io)?;
    if out.len() as u64 > limit {
        return Err(too_large(out.len() as u64));
    }
    Ok(out)
}

/// [`read_bounded`] as UTF-8 text.
///
/// # Errors
/// As [`read_bounded`]; invalid UTF-8 is [`FileError::Io`] with `InvalidData`.
pub fn read_text_bounded(path: &Path, limit: u64) -> Result<String, FileError> {
    let bytes = read_bounded(path, limit)?;
    String::from_utf8(bytes).map_err(|_| FileError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

/// sha256 of everything `r` yields, hex (model identity for dedup, reports, snapshots).
///
/// # Errors
/// I/O errors reading.
pub fn sha256_hex(mut r: impl Read) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut r, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// A temp file (`.tmp*.tmp`, which the drop-folder watcher ignores) in `dir` for an
/// output that is then renamed into place: mode 0666 less the process umask, group from
/// the folder where it is set-group-ID.
///
/// # Errors
/// The OS error creating it.
pub fn output_temp_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".tmp")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_file_is_read_only_when_it_is_itself() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("label.nii");
        std::fs::write(&secret, b"reference").unwrap();
        let own = dir.path().join("own.mask");
        std::fs::write(&own, b"mask").unwrap();
        assert_eq!(read_bounded_untrusted(&own, 4).unwrap(), b"mask");
        assert!(matches!(
            read_bounded_untrusted(&own, 3),
            Err(FileError::TooLarge { .. })
        ));
        let sym = dir.path().join("sym.mask");
        std::os::unix::fs::symlink(&secret, &sym).unwrap();
        assert!(
            read_bounded_untrusted(&sym, 100).is_err(),
            "a link is not followed"
        );
        let hard = dir.path().join("hard.mask");
        std::fs::hard_link(&secret, &hard).unwrap();
        assert!(matches!(
            read_bounded_untrusted(&hard, 100),
            Err(FileError::NotRegular { .. })
        ));
        // The trusting reader follows links: the difference is the point.
        assert_eq!(read_bounded(&sym, 100).unwrap(), b"reference");
    }
    use std::ffi::CString;

    fn mkfifo(p: &Path) {
        let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("submission.toml");
        mkfifo(&p);
        // No writer ever opens it: a blocking open would hang this test forever.
        match open_regular(&p) {
            Err(FileError::NotRegular { kind, .. }) => assert!(kind.contains("FIFO"), "{kind}"),
            other => panic!("expected NotRegular, got {other:?}"),
        }
        assert!(matches!(
            read_bounded(&p, 10),
            Err(FileError::NotRegular { .. })
        ));
    }

    #[test]
    fn folders_devices_and_links_to_them_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_regular(d.path()),
            Err(FileError::NotRegular { kind: "folder", .. })
        ));
        let link = d.path().join("null");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        assert!(matches!(
            open_regular(&link),
            Err(FileError::NotRegular {
                kind: "character device",
                ..
            })
        ));
        assert!(open_regular(&d.path().join("missing"))
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn reads_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![b'x'; 100]).unwrap();
        assert_eq!(read_bounded(&p, 100).unwrap().len(), 100);
        match read_bounded(&p, 99) {
            Err(FileError::TooLarge { size, limit, .. }) => assert_eq!((size, limit), (100, 99)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn outputs_follow_the_umask_not_0600() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        // SAFETY: umask is process-wide; this test only reads it back and restores it, and
        // the mode below is computed from the value in force when the file is created.
        let old = unsafe { libc::umask(0o022) };
        let mut t = output_temp_in(d.path()).unwrap();
        // SAFETY: restoring the previous mask.
        unsafe { libc::umask(old) };
        t.write_all(b"x").unwrap();
        let mode = t.as_file().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "0666 less umask 022");
    }
}
