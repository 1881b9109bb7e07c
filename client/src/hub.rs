//! Push and pull: the operations behind `delta push` and `delta pull`, as a library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use delta_proto::reference::{Reference, Repository, Selector};
use delta_proto::{Digest, Manifest};
use indicatif::ProgressBar;

use crate::delta::{self, Format};
use crate::error::{Error, IoContext, Result};
use crate::remote::{Remote, hash_file};

/// The local content-addressed cache (`$DELTA_CACHE`).
///
/// A blob enters it only after its whole file hashed to its digest, and is trusted again
/// only while it is provably the file that was hashed: a stamp (`verified/<hex>`) records
/// its size, modification and change times, device and inode at that moment, and a blob
/// whose file no longer matches its stamp is hashed again before use (deleted, and
/// fetched again, if it fails).
/// With [`Cache::rehash_all`] every use re-hashes. Nothing outside the cache ever shares a
/// cached file's inode: pulled folders get copies.
///
/// A pull into a native folder writes each downloaded blob once, straight into the folder,
/// and the cache only notes where it went (`copies/<hex>`: the file's path and its stamp
/// just after it was verified). Later commands read that file for as long as it is still
/// the file that was verified (same stamp); once it is edited, replaced, moved or deleted,
/// the note is dropped and the blob is downloaded again when next needed.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    rehash_all: bool,
}

impl Cache {
    /// A cache rooted at `root` (created on first use).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            rehash_all: false,
        }
    }

    /// Re-hash every cached blob before using it, stamps or not (`--verify-cache`).
    pub fn rehash_all(mut self, yes: bool) -> Self {
        self.rehash_all = yes;
        self
    }

    /// The cache's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every cached blob's digest (from the file names), sorted.
    pub fn blobs(&self) -> Vec<Digest> {
        let mut out = Vec::new();
        let top = self.root.join("blobs").join("blake3");
        for dir in std::fs::read_dir(&top).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Some(d) = f.file_name().to_str().and_then(digest_named) {
                    out.push(d);
                }
            }
        }
        out.sort_by_key(|d| d.to_string());
        out
    }

    /// Where a verified blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join(d.blob_key())
    }

    fn partial_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("partial")
            .join(format!("{}.partial", d.hex()))
    }

    fn lock_path(&self, d: &Digest) -> PathBuf {
        self.root.join("partial").join(format!("{}.lock", d.hex()))
    }

    fn stamp_path(&self, d: &Digest) -> PathBuf {
        self.root.join("verified").join(d.hex())
    }

    fn copy_note_path(&self, d: &Digest) -> PathBuf {
        self.root.join("copies").join(d.hex())
    }

    /// What the cache holds (`delta cache`).
    pub fn usage(&self) -> CacheUsage {
        let ((blobs, blob_bytes), (partials, partial_bytes)) = self.held();
        // A note whose file was edited, moved or deleted since is not counted (the next
        // pull that reads it removes it).
        let noted = walk_files(&self.root.join("copies"))
            .iter()
            .filter_map(|(p, _)| digest_named(p.file_name()?.to_str()?))
            .filter(|d| self.note_holding(d).is_some())
            .count() as u64;
        CacheUsage {
            blobs,
            blob_bytes,
            partials,
            partial_bytes,
            noted,
        }
    }

    /// How many blobs and partial downloads the cache holds, and their bytes.
    fn held(&self) -> ((u64, u64), (u64, u64)) {
        let files = |dir: &Path, suffix: &str| {
            walk_files(dir)
                .into_iter()
                .filter(|(p, _)| p.to_string_lossy().ends_with(suffix))
                .fold((0, 0), |(n, bytes), (_, len)| (n + 1, bytes + len))
        };
        (
            files(&self.root.join("blobs"), ""),
            files(&self.root.join("partial"), ".partial"),
        )
    }

    /// Empties the cache (`delta cache clean`): its blobs, their stamps, its notes of
    /// pulled files and its partial downloads, except those being downloaded now (their
    /// lock is held). Pulled folders are not touched. Returns the bytes freed.
    pub fn clean(&self) -> Result<u64> {
        // Bytes only: `usage` would also stat every noted pulled file.
        let bytes = |c: &Self| {
            let ((_, blobs), (_, partials)) = c.held();
            blobs + partials
        };
        let before = bytes(self);
        for dir in ["blobs", "verified", "copies"].map(|d| self.root.join(d)) {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Io {
                        path: dir,
                        source: e,
                    });
                }
                _ => {}
            }
        }
        for (path, _) in walk_files(&self.root.join("partial")) {
            let named = path.file_name().and_then(|n| n.to_str());
            let Some(d) = named.and_then(|n| digest_named(n.strip_suffix(".partial")?)) else {
                continue;
            };
            // Held while the partial file goes, so no download starts on it meanwhile.
            if let Some(_lock) = DownloadLock::try_acquire(&self.lock_path(&d))? {
                std::fs::remove_file(&path).at(&path)?;
            }
        }
        Ok(before.saturating_sub(bytes(self)))
    }

    /// Whether an intact copy of the blob is cached (see [`Cache::verified`]).
    pub fn has(&self, d: &Digest) -> bool {
        self.verified(d).is_ok_and(|p| p.is_some())
    }

    /// The path of the cached blob if it is there and intact: its file still matches the
    /// stamp written when it was last hashed, or it hashes to its digest now. A blob that
    /// fails the hash is deleted (the next fetch downloads it again). When the cache has
    /// no file of its own, the copy noted by [`Cache::note_copy`], if it is still as it was.
    pub fn verified(&self, d: &Digest) -> Result<Option<PathBuf>> {
        let path = self.blob_path(d);
        let Some(now) = stamp_of(&path) else {
            return Ok(self.noted_copy(d));
        };
        let stamp = self.stamp_path(d);
        if !self.rehash_all && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&now) {
            return Ok(Some(path));
        }
        if hash_file(&path)? == *d {
            self.stamp(d)?;
            return Ok(Some(path));
        }
        tracing::warn!(blob = %d, path = %path.display(), "a cached blob was changed; fetching it again");
        let _ = std::fs::remove_file(&stamp);
        std::fs::remove_file(&path).at(&path)?;
        Ok(None)
    }

    /// Notes that `path`, a file outside the cache, holds the blob's bytes as they are now
    /// (the caller has just verified them): [`Cache::verified`] offers it while its stamp
    /// is unchanged. Replaces an earlier note for the same blob. A path that is not UTF-8
    /// is not noted.
    pub fn note_copy(&self, d: &Digest, path: &Path) -> Result<()> {
        let path = std::path::absolute(path).at(path)?;
        let (Some(stamp), Some(name)) = (stamp_of(&path), path.to_str()) else {
            return Ok(());
        };
        let note = self.copy_note_path(d);
        if let Some(dir) = note.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        let body = serde_json::json!({ "path": name, "stamp": stamp }).to_string();
        crate::delta::write_atomic(&note, body.as_bytes())
    }

    /// The noted copy of the blob if it is still the file that was verified (with
    /// [`Cache::rehash_all`]: and hashes to the digest now). A note that no longer holds
    /// is removed.
    fn noted_copy(&self, d: &Digest) -> Option<PathBuf> {
        let found = self
            .note_holding(d)
            .filter(|path| !self.rehash_all || hash_file(path).is_ok_and(|h| h == *d));
        if found.is_none() {
            let _ = std::fs::remove_file(self.copy_note_path(d));
        }
        found
    }

    /// The file the blob's note names, if it still carries the noted stamp (no hashing,
    /// nothing removed).
    fn note_holding(&self, d: &Digest) -> Option<PathBuf> {
        let body = std::fs::read(self.copy_note_path(d)).ok()?;
        let v = serde_json::from_slice::<serde_json::Value>(&body).ok()?;
        let path = PathBuf::from(v.get("path")?.as_str()?);
        (stamp_of(&path).as_deref() == v.get("stamp")?.as_str()).then_some(path)
    }

    /// Records that the blob's file, as it is now, hashed to its digest.
    fn stamp(&self, d: &Digest) -> Result<()> {
        let Some(now) = stamp_of(&self.blob_path(d)) else {
            return Ok(());
        };
        let path = self.stamp_path(d);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        crate::delta::write_atomic(&path, now.as_bytes())
    }

    /// Downloads a blob into the cache unless an intact copy is there (see
    /// [`Cache::verified`]). Returns where the blob's bytes are and the bytes transferred.
    pub async fn fetch(
        &self,
        remote: &Remote,
        d: Digest,
        progress: &ProgressBar,
    ) -> Result<(PathBuf, u64)> {
        if let Some(path) = self.verified(&d)? {
            return Ok((path, 0));
        }
        self.download(remote, d, None, progress).await
    }

    /// Takes into the cache the verified downloads that a failed pull left in its scratch
    /// folder (a private temporary folder that [`Cache::download`] renames each verified
    /// blob into, named by its hex digest), so a pull that fails part-way keeps the blobs
    /// it finished. Best effort: a blob not kept is downloaded again next time.
    fn keep_downloads(&self, scratch: &Path) {
        for entry in std::fs::read_dir(scratch).into_iter().flatten().flatten() {
            let Some(d) = entry.file_name().to_str().and_then(digest_named) else {
                continue;
            };
            let target = self.blob_path(&d);
            let placed = target
                .parent()
                .is_some_and(|dir| std::fs::create_dir_all(dir).is_ok())
                && std::fs::rename(entry.path(), &target).is_ok();
            if placed {
                let _ = self.stamp(&d);
            }
        }
    }

    /// Downloads a blob, resuming the cache's partial download of it and verifying every
    /// byte, then renames the verified file into the cache, or to `elsewhere` when that is
    /// given and on the cache's filesystem (a pull's folder: the bytes are written once).
    /// Returns where the file is and the bytes transferred.
    async fn download(
        &self,
        remote: &Remote,
        d: Digest,
        elsewhere: Option<&Path>,
        progress: &ProgressBar,
    ) -> Result<(PathBuf, u64)> {
        let target = self.blob_path(&d);
        let partial = self.partial_path(&d);
        if let Some(dir) = partial.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        // One download of a blob at a time into this cache (two terminals, a worker and
        // the CLI): the partial file is appended to, and two writers would interleave.
        // Whoever waited may find the blob done.
        let _lock = DownloadLock::acquire(self.lock_path(&d), &d, progress).await?;
        if let Some(path) = self.verified(&d)? {
            return Ok((path, 0));
        }
        let n = match remote.download_to(d, &partial, progress).await {
            // A partial file the registry cannot continue (longer than the blob: not a
            // prefix of it) is thrown away, and the download starts over once.
            Err(Error::Rejected {
                code: tonic::Code::InvalidArgument,
                ..
            }) if partial.exists() => {
                std::fs::remove_file(&partial).at(&partial)?;
                remote.download_to(d, &partial, progress).await?
            }
            other => other?,
        };
        if let Some(dest) = elsewhere {
            match std::fs::rename(&partial, dest) {
                Ok(()) => return Ok((dest.to_owned(), n)),
                Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {}
                Err(e) => {
                    return Err(Error::Io {
                        path: dest.to_owned(),
                        source: e,
                    });
                }
            }
        }
        // Made here, just before it is needed: `delta cache clean` may empty the cache
        // while a download runs.
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        std::fs::rename(&partial, &target).at(&target)?;
        self.stamp(&d)?;
        Ok((target, n))
    }
}

/// What a [`Cache`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUsage {
    /// Verified blobs the cache keeps, and their bytes.
    pub blobs: u64,
    /// See `blobs`.
    pub blob_bytes: u64,
    /// Partial downloads (resumed by the next pull), and their bytes so far.
    pub partials: u64,
    /// See `partials`.
    pub partial_bytes: u64,
    /// Pulled files it notes instead of keeping a copy (see [`Cache::note_copy`]), as
    /// long as they are unchanged.
    pub noted: u64,
}

/// The digest a cache file is named by (its hex), if the name is one.
fn digest_named(hex: &str) -> Option<Digest> {
    format!("{}:{hex}", delta_proto::digest::ALGORITHM)
        .parse()
        .ok()
}

/// Every plain file under `dir` (not following links), with its length; none if `dir`
/// is absent.
fn walk_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(walk_files(&entry.path())),
            Ok(t) if t.is_file() => {
                let len = entry.metadata().map_or(0, |m| m.len());
                out.push((entry.path(), len));
            }
            _ => {}
        }
    }
    out
}

/// An exclusive lock on the download of one blob into a cache, across processes: held
/// from before its partial file is opened until the verified file is renamed away. The
/// lock file (`partial/<hex>.lock`) is removed on release, while still locked; a waiter
/// that then holds the lock of a removed file opens the path again.
struct DownloadLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl DownloadLock {
    /// How often a waiting download asks for the lock again.
    const POLL: std::time::Duration = std::time::Duration::from_millis(50);

    /// Waits for the lock, saying once that it waits. After a wait, `progress` forgets
    /// its rate so far: the time spent waiting is not a slow download.
    async fn acquire(path: PathBuf, blob: &Digest, progress: &ProgressBar) -> Result<Self> {
        let mut told = false;
        loop {
            if let Some(lock) = Self::try_acquire(&path)? {
                if told {
                    progress.reset_eta();
                }
                return Ok(lock);
            }
            if !told {
                tracing::warn!(%blob, "waiting for another download of this blob into the cache");
                told = true;
            }
            tokio::time::sleep(Self::POLL).await;
        }
    }

    /// The lock, or `None` while another download holds it.
    fn try_acquire(path: &Path) -> Result<Option<Self>> {
        use std::os::unix::fs::MetadataExt;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .at(path)?;
            if !try_lock(&file).at(path)? {
                return Ok(None);
            }
            // The file locked must still be the one at `path` (a holder removes it when
            // done); if not, lock the one there now.
            let held = file.metadata().at(path)?;
            let current = std::fs::metadata(path).ok();
            if current.is_some_and(|c| (c.dev(), c.ino()) == (held.dev(), held.ino())) {
                return Ok(Some(Self {
                    path: path.to_owned(),
                    _file: file,
                }));
            }
        }
    }
}

/// Takes an exclusive `flock` on `file` if no one holds one: whether it did. (std's
/// `File::try_lock` does this from Rust 1.89; the workspace builds with 1.88.) On a
/// filesystem without file locks (some network mounts) it goes on unlocked, as cargo
/// does with its own locks there.
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this `File` owns and keeps open; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        _ if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Some(libc::ENOLCK | libc::EOPNOTSUPP) => {
            tracing::debug!(error = %e, "no file locks on the cache's filesystem; downloading unlocked");
            Ok(true)
        }
        _ => Err(e),
    }
}

impl Drop for DownloadLock {
    fn drop(&mut self) {
        // Removed while locked; the lock goes with the file handle, dropped after this.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What identifies one version of a file cheaply: size, modification time, change time
/// (both to the ns), device and inode. The change time is the kernel's: a tool (or a
/// user) that edits a file in place and sets its modification time back still moves it.
fn stamp_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    Some(format!(
        "{} {}.{:09} {}.{:09} {}:{}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.dev(),
        m.ino()
    ))
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// `namespace/name`.
    pub repository: String,
    /// The version the delta is at.
    pub version: u64,
    /// Manifest digest.
    pub digest: Digest,
    /// False when the same delta already was the latest version.
    pub created: bool,
    /// Blob bytes actually sent.
    pub bytes_uploaded: u64,
    /// Blobs the registry lacked.
    pub blobs_uploaded: usize,
}

/// Splits `ns/name[:tag]` into the repository and an optional tag.
pub fn parse_target(target: &str) -> Result<(Repository, Option<String>)> {
    let parsed: Reference = target.parse()?;
    match parsed.selector {
        Selector::Tag(t) if !target.contains(':') => {
            debug_assert_eq!(t, delta_proto::reference::LATEST);
            Ok((parsed.repository, None))
        }
        Selector::Tag(t) if t == delta_proto::reference::LATEST => Err(Error::Invalid(
            "`latest` is moved by the registry itself; push without a tag".into(),
        )),
        Selector::Tag(t) => Ok((parsed.repository, Some(t))),
        Selector::Version(_) | Selector::Digest(_) => Err(Error::Invalid(format!(
            "{target}: versions and digests are assigned by the registry; push to ns/name or ns/name:tag"
        ))),
    }
}

/// How [`push_with`] pushes.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// More tags to point at the new version.
    pub tags: Vec<String>,
    /// Push tensors holding NaN or ±Inf (refused by default: such a delta breaks whatever
    /// applies it).
    pub allow_nonfinite: bool,
    /// Annotations to set on the manifest (over the folder's own, key by key).
    pub annotations: BTreeMap<String, String>,
}

/// Pushes a native or PEFT delta folder as the next version of `target` (`ns/name[:tag]`),
/// registered against base `base_name`. Only blobs the registry lacks are sent.
pub async fn push(
    remote: &Remote,
    dir: &Path,
    target: &str,
    base_name: &str,
    tags: &[String],
    progress: &ProgressBar,
) -> Result<PushReport> {
    let opts = PushOptions {
        tags: tags.to_vec(),
        ..PushOptions::default()
    };
    push_with(remote, dir, target, base_name, &opts, progress).await
}

/// [`push`] with options.
pub async fn push_with(
    remote: &Remote,
    dir: &Path,
    target: &str,
    base_name: &str,
    opts: &PushOptions,
    progress: &ProgressBar,
) -> Result<PushReport> {
    let tags = &opts.tags;
    let (repo, tag) = parse_target(target)?;
    let base = remote.get_base(base_name).await.map_err(|e| match e {
        Error::NotFound(_) => Error::Invalid(format!(
            "base {base_name} is not registered: run `delta base add {base_name} PATH` first"
        )),
        other => other,
    })?;
    let prepared = delta::prepare(dir, &base)?;
    if !opts.allow_nonfinite {
        let label = dir.display().to_string();
        crate::apply::LoadedDelta::open(&label, prepared.manifest.clone(), &prepared.paths)?
            .check_finite()?;
    }
    let mut manifest = prepared.manifest.clone();
    manifest.annotations.extend(opts.annotations.clone());
    let manifest = &manifest;
    let (bytes_uploaded, blobs_uploaded) =
        upload_missing(remote, manifest, &prepared.paths, progress).await?;
    progress.finish_and_clear();
    let mut all_tags: Vec<String> = tags.to_vec();
    all_tags.extend(tag);
    let (version, digest, created) = remote
        .push_manifest(&repo.to_string(), manifest, &all_tags)
        .await?;
    Ok(PushReport {
        repository: repo.to_string(),
        version,
        digest,
        created,
        bytes_uploaded,
        blobs_uploaded,
    })
}

/// Uploads the files of `manifest` (at `paths`, in manifest order) that the registry
/// lacks, resumably and verified; returns the bytes and blobs sent. `delta push` and the
/// worker's trained deltas both publish through it.
pub async fn upload_missing(
    remote: &Remote,
    manifest: &Manifest,
    paths: &[PathBuf],
    progress: &ProgressBar,
) -> Result<(u64, usize)> {
    let digests: Vec<Digest> = manifest.files.iter().map(|f| f.digest).collect();
    let missing = remote.missing(&digests).await?;
    let total: u64 = manifest
        .files
        .iter()
        .filter(|f| missing.contains(&f.digest))
        .map(|f| f.size)
        .sum();
    progress.set_length(total);
    let mut bytes = 0;
    for (f, path) in manifest.files.iter().zip(paths) {
        if missing.contains(&f.digest) {
            bytes += remote.upload_file(path, f.digest, f.size, progress).await?;
        }
    }
    Ok((bytes, missing.len()))
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// `namespace/name`.
    pub repository: String,
    /// Version pulled.
    pub version: u64,
    /// Manifest digest.
    pub digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// Blob bytes transferred (0 when everything was cached).
    pub bytes_downloaded: u64,
    /// Where each manifest file's verified bytes are, in manifest order: the cache, or a
    /// file it noted; after a native pull, the folder's files (empty after a `no_cache`
    /// pull).
    pub blobs: Vec<PathBuf>,
    /// The version is yanked (reached through a tag, number or digest).
    pub yanked: bool,
    /// Tags pointing at the version.
    pub tags: Vec<String>,
}

/// Resolves `reference` and brings its blobs into the cache, verifying every byte.
pub async fn fetch(
    remote: &Remote,
    cache: &Cache,
    reference: &str,
    progress: &ProgressBar,
) -> Result<PullReport> {
    fetch_into(remote, cache, None, reference, progress).await
}

/// [`fetch`]; with `scratch`, each blob `cache` lacks ends in that folder (named by its
/// hex digest) instead of in the cache, if the two share a filesystem.
async fn fetch_into(
    remote: &Remote,
    cache: &Cache,
    scratch: Option<&Path>,
    reference: &str,
    progress: &ProgressBar,
) -> Result<PullReport> {
    let resolved = remote.resolve(reference).await?;
    let manifest = resolved.manifest;
    // Where each blob's verified bytes are; `None` until downloaded.
    let mut found: BTreeMap<Digest, Option<PathBuf>> = BTreeMap::new();
    let mut total = 0;
    for f in &manifest.files {
        if let std::collections::btree_map::Entry::Vacant(slot) = found.entry(f.digest) {
            let at = cache.verified(&f.digest)?;
            if at.is_none() {
                total += f.size;
            }
            slot.insert(at);
        }
    }
    progress.set_length(total);
    let mut bytes_downloaded = 0;
    let mut blobs = Vec::new();
    for f in &manifest.files {
        let path = match found.get(&f.digest).cloned().flatten() {
            Some(path) => path,
            None => {
                let to = scratch.map(|s| s.join(f.digest.hex()));
                let (path, n) = cache
                    .download(remote, f.digest, to.as_deref(), progress)
                    .await?;
                bytes_downloaded += n;
                found.insert(f.digest, Some(path.clone()));
                path
            }
        };
        let size = std::fs::metadata(&path).at(&path)?.len();
        if size != f.size {
            return Err(Error::Invalid(format!(
                "cached blob {} is {size} bytes, manifest says {}",
                f.digest, f.size
            )));
        }
        blobs.push(path);
    }
    progress.finish_and_clear();
    Ok(PullReport {
        repository: resolved.repository,
        version: resolved.version,
        digest: resolved.digest,
        manifest,
        bytes_downloaded,
        blobs,
        yanked: resolved.yanked,
        tags: resolved.tags,
    })
}

/// How [`pull_with`] writes its folder.
#[derive(Debug, Clone, Copy)]
pub struct PullOptions {
    /// Native or PEFT.
    pub format: Format,
    /// Replace a non-empty output folder (its old files all go).
    pub overwrite: bool,
    /// Neither read nor note anything in the local cache (as pip's `--no-cache-dir`).
    pub no_cache: bool,
}

/// Fetches `reference` and writes it to `out` in `format`; `out` must be absent or empty.
pub async fn pull(
    remote: &Remote,
    cache: &Cache,
    reference: &str,
    out: &Path,
    format: Format,
    progress: &ProgressBar,
) -> Result<PullReport> {
    let opts = PullOptions {
        format,
        overwrite: false,
        no_cache: false,
    };
    pull_with(remote, cache, reference, out, opts, progress).await
}

/// Fetches `reference` and makes `out` hold exactly its folder (see
/// [`delta::replace_dir`]).
///
/// A native folder's blobs that the cache lacks are downloaded through the cache (so an
/// interrupted pull resumes) and then renamed into the folder rather than copied, when
/// the cache and `out` share a filesystem: each byte is written once, and the cache notes
/// where the files went ([`Cache::note_copy`]) instead of keeping a second copy. Blobs the
/// cache has are copied. A PEFT folder is converted from cached blobs. A pull that fails
/// keeps in the cache the blobs it finished, and the partial one. With `no_cache` the
/// cache is neither read nor written: downloads go to a scratch folder beside `out`.
pub async fn pull_with(
    remote: &Remote,
    cache: &Cache,
    reference: &str,
    out: &Path,
    opts: PullOptions,
    progress: &ProgressBar,
) -> Result<PullReport> {
    // Refused before anything is downloaded.
    delta::check_output_dir(out, opts.overwrite)?;
    let native = matches!(opts.format, Format::Native);
    // Beside `out`, so that files are renamed into it; it goes when this returns, with
    // anything left in it.
    let scratch = if native || opts.no_cache {
        let parent = delta::parent_dir(out);
        std::fs::create_dir_all(&parent).at(&parent)?;
        let dir = tempfile::Builder::new()
            .prefix(".delta-pull-")
            .tempdir_in(&parent)
            .at(&parent)?;
        Some(dir)
    } else {
        None
    };
    let throwaway = scratch
        .as_ref()
        .filter(|_| opts.no_cache)
        .map(|dir| Cache::new(dir.path()));
    let written = async {
        let report = match (&throwaway, &scratch) {
            (Some(own), _) => fetch_into(remote, own, None, reference, progress).await?,
            (None, Some(dir)) => {
                fetch_into(remote, cache, Some(dir.path()), reference, progress).await?
            }
            (None, None) => fetch_into(remote, cache, None, reference, progress).await?,
        };
        let (manifest, blobs) = (&report.manifest, &report.blobs);
        let moved_from = scratch.as_ref().filter(|_| native).map(|d| d.path());
        delta::replace_dir_salvaging(
            out,
            opts.overwrite,
            |dir| match (opts.format, moved_from) {
                (Format::Native, Some(tmp)) => delta::move_native(dir, manifest, blobs, tmp),
                (Format::Native, None) => delta::write_native(dir, manifest, blobs),
                (Format::Peft, _) => delta::write_peft(dir, manifest, blobs),
            },
            // The downloads renamed into the folder go back to the scratch folder, and
            // from there into the cache below.
            |dir| {
                if let Some(tmp) = moved_from {
                    delta::unmove_native(dir, manifest, blobs, tmp);
                }
            },
        )?;
        Ok::<_, Error>(report)
    }
    .await;
    let mut report = match (written, &scratch) {
        (Ok(report), _) => report,
        // What was downloaded before the failure stays (in the cache), as a partial
        // download does: pulling again fetches only the rest.
        (Err(e), Some(dir)) if !opts.no_cache => {
            cache.keep_downloads(dir.path());
            return Err(e);
        }
        (Err(e), _) => return Err(e),
    };
    if opts.no_cache {
        report.blobs.clear();
    } else if native {
        report.blobs = report
            .manifest
            .files
            .iter()
            .map(|f| out.join(&f.path))
            .collect();
        note_copies(cache, &report.manifest, &report.blobs);
    }
    Ok(report)
}

/// Notes in the cache where a pulled folder's files are, for the blobs the cache does not
/// hold itself. A note that cannot be written costs a download later, not the pull.
fn note_copies(cache: &Cache, manifest: &Manifest, files: &[PathBuf]) {
    let mut noted = std::collections::BTreeSet::new();
    for (f, path) in manifest.files.iter().zip(files) {
        if cache.blob_path(&f.digest).is_file() || !noted.insert(f.digest) {
            continue;
        }
        if let Err(e) = cache.note_copy(&f.digest, path) {
            tracing::warn!(blob = %f.digest, error = %e, "cannot note the pulled file in the cache");
        }
    }
}

/// Re-hashes a cached blob (for `--verify` paths and tests).
pub fn verify_cached(cache: &Cache, d: &Digest) -> Result<()> {
    let path = cache.blob_path(d);
    let actual = hash_file(&path)?;
    if actual != *d {
        return Err(Error::Integrity {
            what: format!("cached blob {}", path.display()),
            expected: *d,
            actual,
        });
    }
    Ok(())
}

/// Loads a delta named by a folder path (native or PEFT) or a registry reference, for
/// merging onto `base` (the base's fingerprint and tensor table). A folder without a
/// recorded base is taken to belong to `base`.
pub async fn load_delta(
    remote: Option<&Remote>,
    cache: &Cache,
    spec: &str,
    base: &crate::remote::BaseRecord,
    progress: &ProgressBar,
) -> Result<crate::apply::LoadedDelta> {
    let path = Path::new(spec);
    if path.is_dir() {
        // A complete native folder (what `delta pull` and `delta-worker train` write) is
        // taken as it is, so its digest is the one its children name as their parent.
        if let Ok((manifest, paths)) = delta::read_native(path) {
            return crate::apply::LoadedDelta::open(spec, manifest, &paths);
        }
        let mut own = base.clone();
        own.name = format!("the base of {spec}");
        let recorded = std::fs::read(path.join(delta::NATIVE_MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v.get("base")?
                    .get("fingerprint")?
                    .as_str()?
                    .parse::<Digest>()
                    .ok()
            });
        if let Some(fp) = recorded {
            own.fingerprint = fp;
        }
        let prepared = delta::prepare(path, &own)?;
        return crate::apply::LoadedDelta::open(spec, prepared.manifest.clone(), &prepared.paths);
    }
    let remote = remote.ok_or_else(|| {
        Error::Invalid(format!(
            "{spec} is not a folder, and no registry is reachable to pull it"
        ))
    })?;
    let report = fetch(remote, cache, spec, progress).await?;
    let label = format!("{}:v{}", report.repository, report.version);
    crate::apply::LoadedDelta::open(&label, report.manifest, &report.blobs)
}

/// The most deltas a parent chain may hold (a longer one is refused as cyclic or absurd).
pub const MAX_CHAIN: usize = 64;

/// Pulls a parent its child recorded, pinned by the digest the child names
/// (`repository@digest`, the repository taken from the parent's reference): never by a
/// tag, which may have moved since the child was trained.
pub async fn fetch_parent(
    remote: &Remote,
    cache: &Cache,
    child: &str,
    parent: &delta_proto::manifest::Parent,
    progress: &ProgressBar,
) -> Result<PullReport> {
    let repo = parent
        .reference
        .as_deref()
        .and_then(|r| r.parse::<Reference>().ok())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{child}: parent {} has no reference to pull it from",
                parent.digest
            ))
        })?
        .repository;
    fetch(
        remote,
        cache,
        &format!("{repo}@{}", parent.digest),
        progress,
    )
    .await
}

/// A delta as the parent walk sees it.
trait ChainItem {
    /// Its manifest digest.
    fn digest(&self) -> Digest;
    /// The parents its manifest records.
    fn parents(&self) -> &[delta_proto::manifest::Parent];
    /// How messages name it.
    fn label(&self) -> String;
}

impl ChainItem for PullReport {
    fn digest(&self) -> Digest {
        self.digest
    }
    fn parents(&self) -> &[delta_proto::manifest::Parent] {
        &self.manifest.parents
    }
    fn label(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }
}

impl ChainItem for crate::apply::LoadedDelta {
    fn digest(&self) -> Digest {
        self.digest
    }
    fn parents(&self) -> &[delta_proto::manifest::Parent] {
        &self.manifest.parents
    }
    fn label(&self) -> String {
        self.label.clone()
    }
}

/// The one parent walk: puts every item's parents before it (matched by digest, each
/// once, whether a manifest lists its whole chain or only its direct parents). The caller
/// gets each missing parent from [`Walk::next_missing`], hands it back with [`Walk::add`],
/// and takes the chain from [`Walk::finish`]. At most [`MAX_CHAIN`] parents are added.
struct Walk<T> {
    out: Vec<T>,
    pending: Vec<T>,
    added: usize,
}

impl<T: ChainItem> Walk<T> {
    fn new(items: Vec<T>) -> Self {
        Walk {
            out: Vec::new(),
            pending: items.into_iter().rev().collect(),
            added: 0,
        }
    }

    /// The next parent to get, with the label of the child that needs it; `None` when
    /// every item has its parents before it.
    fn next_missing(&mut self) -> Result<Option<(String, delta_proto::manifest::Parent)>> {
        while let Some(d) = self.pending.pop() {
            let missing = d
                .parents()
                .iter()
                .find(|p| !self.out.iter().any(|o| o.digest() == p.digest))
                .cloned();
            let Some(parent) = missing else {
                self.out.push(d);
                continue;
            };
            if self.added >= MAX_CHAIN {
                return Err(Error::Invalid(format!(
                    "{}: parent chain longer than {MAX_CHAIN} or cyclic",
                    d.label()
                )));
            }
            let label = d.label();
            self.pending.push(d);
            return Ok(Some((label, parent)));
        }
        Ok(None)
    }

    /// The parent [`Walk::next_missing`] asked for.
    fn add(&mut self, parent: T) {
        self.added += 1;
        self.pending.push(parent);
    }

    /// The chain, parents first.
    fn finish(self) -> Vec<T> {
        self.out
    }
}

/// Pulls `reference` and, before it, every parent it needs (each pinned by digest, see
/// [`fetch_parent`]): the chain in application order, each delta once, parents first.
pub async fn fetch_chain(
    remote: &Remote,
    cache: &Cache,
    reference: &str,
    progress: &ProgressBar,
) -> Result<Vec<PullReport>> {
    let top = fetch(remote, cache, reference, progress).await?;
    let mut walk = Walk::new(vec![top]);
    while let Some((child, parent)) = walk.next_missing()? {
        walk.add(fetch_parent(remote, cache, &child, &parent, progress).await?);
    }
    Ok(walk.finish())
}

/// Puts every delta's parents before it, pulling missing ones from the registry (or
/// refusing, with `no_deps`). A parent is matched by manifest digest.
pub async fn with_parents(
    deltas: Vec<crate::apply::LoadedDelta>,
    remote: Option<&Remote>,
    cache: &Cache,
    no_deps: bool,
    progress: &ProgressBar,
) -> Result<Vec<crate::apply::LoadedDelta>> {
    let mut walk = Walk::new(deltas);
    while let Some((child, parent)) = walk.next_missing()? {
        if no_deps {
            return Err(Error::Invalid(format!(
                "{child} was trained on top of {} ({}), which must be applied before it; name it first, or drop --no-deps to pull it",
                parent.digest,
                parent
                    .reference
                    .as_deref()
                    .unwrap_or("no reference recorded")
            )));
        }
        let remote = remote.ok_or_else(|| {
            Error::Invalid(format!(
                "{child}: parent {} must be pulled, but no registry is reachable",
                parent.digest
            ))
        })?;
        let report = fetch_parent(remote, cache, &child, &parent, progress).await?;
        let spec = format!("{}@{}", report.repository, report.digest);
        let loaded = crate::apply::LoadedDelta::open(&spec, report.manifest, &report.blobs)?;
        tracing::info!(parent = %spec, child = %child, "pulled a missing parent");
        walk.add(loaded);
    }
    Ok(walk.finish())
}
