//! The drop folder's layout, in one place: a submission is the folder
//! `<drop_dir>/<task>/<vendor>/<name>/`, and these are the names of the files evald reads
//! from it and writes into it (or, for a folder that is a symbolic link, beside it).
//!
//! The watcher, submission validation, the daemon's notices and `evald run` all read the
//! layout through this module, so a path means the same thing to each of them.

use std::path::{Path, PathBuf};

/// The vendor's optional manifest.
pub const MANIFEST: &str = "submission.toml";
/// Written next to the submission: the machine-readable results.
pub const SUMMARY_JSON: &str = "summary.json";
/// The Excel report.
pub const REPORT_XLSX: &str = "report.xlsx";
/// Written instead of the outputs when the submission is refused.
pub const REJECTED_TXT: &str = "REJECTED.txt";
/// Written instead of the outputs when evald could not finish the evaluation for reasons
/// that are not the vendor's (after its retries).
pub const FAILED_TXT: &str = "FAILED.txt";
/// A vendor creates this file to say "complete" when the task requires a marker.
pub const READY_MARKER: &str = "READY";
/// How a submission must be placed, for messages to vendors and admins.
pub const HINT: &str = "<drop>/<task>/<vendor>/<name>/model.pt";

/// Where a submission folder is and what its path says.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubmissionDir {
    /// `<drop_dir>/<task>/<vendor>/<name>`.
    pub dir: PathBuf,
    /// Task (first level).
    pub task: String,
    /// Vendor (second level).
    pub vendor: String,
    /// Submission name (third level).
    pub name: String,
}

/// Where a path sits in the drop tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// The drop folder itself.
    Root,
    /// A task or vendor folder (scan below it).
    Upper(PathBuf),
    /// In or at a submission folder; the `String` is the entry's name when deeper.
    Submission(SubmissionDir, Option<String>),
    /// Outside the drop folder or in a hidden folder.
    Ignored,
}

/// Where `path` sits below `drop_dir`. Hidden names (`.staging/`) at any of the three
/// levels put a path outside the layout: vendors upload there and rename into place.
pub fn locate(drop_dir: &Path, path: &Path) -> Located {
    let Ok(rel) = path.strip_prefix(drop_dir) else {
        return Located::Ignored;
    };
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.iter().take(3).any(|p| p.starts_with('.')) {
        return Located::Ignored;
    }
    match parts.len() {
        0 => Located::Root,
        1 | 2 => Located::Upper(path.to_path_buf()),
        n => Located::Submission(
            SubmissionDir {
                dir: drop_dir.join(&parts[0]).join(&parts[1]).join(&parts[2]),
                task: parts[0].clone(),
                vendor: parts[1].clone(),
                name: parts[2].clone(),
            },
            (n > 3).then(|| parts[n - 1].clone()),
        ),
    }
}

/// What the last three components of a submission folder's absolute path say (task,
/// vendor, name), wherever the folder is: `evald run` takes folders outside any drop
/// folder, so each part is `None` when the path is too short.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Named {
    /// Grandparent folder's name.
    pub task: Option<String>,
    /// Parent folder's name.
    pub vendor: Option<String>,
    /// The folder's name.
    pub name: Option<String>,
}

/// [`Named`] for `dir` (made absolute first, without resolving links).
pub fn named(dir: &Path) -> Named {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let part = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|s| s.to_string_lossy().into_owned())
    };
    let parent = abs.parent();
    Named {
        name: part(Some(&abs)),
        vendor: part(parent),
        task: part(parent.and_then(Path::parent)),
    }
}

/// Whether a file name is one of evald's outputs (or a temp file or office lock file
/// next to them): such files never make a folder new.
pub fn is_evald_output(name: &str) -> bool {
    name == SUMMARY_JSON
        || name == FAILED_TXT
        // `<name>.REJECTED.txt` beside a submission folder that is a link.
        || name.strip_suffix(REJECTED_TXT).is_some_and(|n| n.is_empty() || n.ends_with('.'))
        || (name.starts_with("report") && name.ends_with(".xlsx"))
        || name.ends_with(".tmp")
        || name.starts_with(".tmp")
        // LibreOffice and Excel lock files while someone reads the report on the share.
        || name.starts_with(".~lock.")
        || name.starts_with("~$")
}

/// Whether a file name says an upload is still in progress (browsers, WinSCP, rsync
/// `--partial-dir` conventions, and the protocol documented for vendors).
pub fn is_partial_upload(name: &str) -> bool {
    [
        ".partial",
        ".part",
        ".crdownload",
        ".filepart",
        ".uploading",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// `<name>.REJECTED.txt` beside the folder `dir`, in its vendor folder (where the notice
/// of a folder that is a symbolic link goes: writing through the link would write
/// outside the drop folder).
pub fn rejected_beside(dir: &Path) -> Option<PathBuf> {
    let (name, parent) = dir.file_name().zip(dir.parent())?;
    Some(parent.join(format!("{}.{REJECTED_TXT}", name.to_string_lossy())))
}

/// `<vendor>/#<id>.REJECTED.txt`: the notice's name when [`rejected_beside`] would be too
/// long for the file system.
pub fn rejected_by_id(vendor_dir: &Path, id: i64) -> PathBuf {
    vendor_dir.join(format!("#{id}.{REJECTED_TXT}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_located_by_their_level_below_the_drop_folder() {
        let d = Path::new("/drop");
        assert_eq!(locate(d, d), Located::Root);
        assert_eq!(locate(d, Path::new("/elsewhere/a/b/c")), Located::Ignored);
        assert_eq!(
            locate(d, Path::new("/drop/t/v")),
            Located::Upper("/drop/t/v".into())
        );
        assert_eq!(locate(d, Path::new("/drop/t/.staging/x")), Located::Ignored);
        let Located::Submission(s, file) = locate(d, Path::new("/drop/t/v/n/sub/model.pt")) else {
            panic!("a submission")
        };
        assert_eq!(
            (s.task.as_str(), s.vendor.as_str(), s.name.as_str()),
            ("t", "v", "n")
        );
        assert_eq!(s.dir, Path::new("/drop/t/v/n"));
        assert_eq!(file.as_deref(), Some("model.pt"));
    }

    #[test]
    fn a_folder_is_named_by_its_last_three_components() {
        let n = named(Path::new("/drop/thyroid/acme/v3"));
        assert_eq!(n.task.as_deref(), Some("thyroid"));
        assert_eq!(n.vendor.as_deref(), Some("acme"));
        assert_eq!(n.name.as_deref(), Some("v3"));
        assert_eq!(named(Path::new("/v3")).vendor, None);
    }

    #[test]
    fn outputs_and_partial_uploads_are_recognised_by_name() {
        for n in [
            "summary.json",
            "report.xlsx",
            "REJECTED.txt",
            "v3.REJECTED.txt",
            "FAILED.txt",
            ".~lock.report.xlsx#",
            "x.tmp",
        ] {
            assert!(is_evald_output(n), "{n}");
        }
        for n in ["model.pt", "XREJECTED.txt", "submission.toml"] {
            assert!(!is_evald_output(n), "{n}");
        }
        assert!(is_partial_upload("model.pt.part"));
        assert!(!is_partial_upload("model.pt"));
        assert_eq!(
            rejected_beside(Path::new("/d/t/v/n")),
            Some(PathBuf::from("/d/t/v/n.REJECTED.txt"))
        );
        assert_eq!(
            rejected_by_id(Path::new("/d/t/v"), 7),
            PathBuf::from("/d/t/v/#7.REJECTED.txt")
        );
    }
}
