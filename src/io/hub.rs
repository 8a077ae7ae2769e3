//! Checkpoints from the Hugging Face Hub, kept in the cache layout that huggingface_hub and transformers use
//! (`models--{org}--{name}/blobs/{etag}`, `snapshots/{commit}/{file}`, `refs/{revision}`), so a model either
//! of them downloaded is reused here, and the other way round.
//!
//! The network half is hf-hub's blocking (ureq) client. It downloads into `blobs/{etag}.part`, resumes from
//! there with a `Range` request, renames the finished blob and only then links it into `snapshots/{commit}`:
//! an interrupted download never leaves a file that looks complete. This module adds what hf-hub lacks:
//! huggingface_hub's cache and token rules (`HF_HUB_CACHE`, `HF_HOME`, `HF_TOKEN`), offline mode, optional
//! files (remembered as missing in `.no_exist/`, as huggingface_hub does), sharded safetensors weights and
//! PyTorch weights, transformers' `subfolder` (the files of a folder inside the repository), one snapshot for
//! all the files of a call, and errors that name the repository and the file.
//!
//! Why hf-hub 0.4 with its `ureq` feature: its 1.0 is async (tokio, reqwest) and pulls in hf-xet, far more
//! than fetching a handful of files needs. Known limits of 0.4's client: it sets no read timeout, and it
//! downloads a file again when only its snapshot link is missing (the blob being there from another commit).

use std::io;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::ProgressBar;

use super::pytorch::{PYTORCH_WEIGHTS, PYTORCH_WEIGHTS_INDEX};
use super::shards::{shard_names, weights_index};
use crate::{Error, Result};

/// The name that stands for "the model weights" in `files`: `model.safetensors`, or, where the repository
/// has no single file, `model.safetensors.index.json` and every shard it lists.
pub use super::shards::{WEIGHTS, WEIGHTS_INDEX};
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Smaller files download without a progress bar: config and tokenizer files would only flicker.
const PROGRESS_MIN_BYTES: usize = 10 * 1024 * 1024;
/// How often the file set is fetched again because the revision moved to another commit mid-way.
const MAX_SNAPSHOT_RESTARTS: usize = 3;

/// Which token is sent to the Hub.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// `HF_TOKEN`, else the file at `HF_TOKEN_PATH` or `$HF_HOME/token` (what `hf auth login` writes).
    #[default]
    FromEnvironment,
    /// No token (transformers' `token=False`).
    Anonymous,
    /// This token.
    Token(String),
}

/// Where the files come from; the defaults are those of transformers' `from_pretrained`.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Branch, tag or commit hash; `main` when `None`.
    pub revision: Option<String>,
    /// The hub cache folder (the one holding `models--*`); overrides `HF_HUB_CACHE` and `HF_HOME`.
    pub cache_dir: Option<PathBuf>,
    /// The token to send.
    pub auth: Auth,
    /// Use only the cache, as `HF_HUB_OFFLINE=1` does.
    pub local_files_only: bool,
    /// Download the files again even where the cache has them.
    pub force_download: bool,
    /// The folder of the repository that holds the files (transformers' `subfolder`): a file `f` of a call
    /// is `{subfolder}/f` in the repository, shards are named relative to their index there, and
    /// [`download`] returns this folder of the snapshot. `None` or empty: the top level. Checked by
    /// [`check_subfolder`].
    pub subfolder: Option<String>,
}

/// Makes sure the snapshot of `repo_id` at the chosen revision holds `files` (all required) and those of
/// `optional_files` the repository has, downloading what the cache lacks, and returns the snapshot folder
/// (with `options.subfolder`, that folder of the snapshot; the files are named relative to it).
///
/// [`WEIGHTS`] in `files` means the weights: `model.safetensors`, else its index and every shard it lists,
/// else `pytorch_model.bin`, else its index and shards. Files found in the cache are not
/// checked against the Hub again (no request at all), unless `force_download` is set; a branch that moved
/// on is picked up with `force_download`, as with huggingface_hub's cache.
pub fn download(
    repo_id: &str,
    files: &[&str],
    optional_files: &[&str],
    options: &HubOptions,
) -> Result<PathBuf> {
    check_repo_id(repo_id)?;
    let revision = options.revision.as_deref().unwrap_or("main");
    check_revision(revision)?;
    let inside = Subfolder(check_subfolder(
        options.subfolder.as_deref().unwrap_or_default(),
    )?);
    for file in files.iter().chain(optional_files) {
        check_filename(file)?;
    }
    let cache_root = cache_dir(options)?;
    let cache = RepoCache::new(&cache_root, repo_id);
    let cached = cache.snapshot(revision);

    let offline = options.local_files_only || offline_from_env();
    // Offline, force_download cannot download anything, so a complete cache still serves.
    if !options.force_download || offline {
        if let Some(dir) = &cached {
            if first_missing(&cache, dir, &inside, files, optional_files)?.is_none() {
                return Ok(inside.in_snapshot(dir));
            }
        }
    }
    if offline {
        let (folder, missing) = match &cached {
            Some(dir) => (
                dir.clone(),
                first_missing(&cache, dir, &inside, files, optional_files)?,
            ),
            None => (
                cache.dir.clone(),
                files.first().map(|f| inside.repo_path(f)),
            ),
        };
        let file = missing.unwrap_or_else(|| {
            let names: Vec<String> = files.iter().map(|f| inside.repo_path(f)).collect();
            names.join(", ")
        });
        return Err(Error::NotFound {
            path: folder.join(&file),
            hint: format!(
                "Offline mode (HF_HUB_OFFLINE or local_files_only=True) uses only the cache in {}, and it has \
                 no {file} of {repo_id} (revision {revision}). Download it once online, or point HF_HOME or \
                 cache_dir at the cache that has it.",
                cache_root.display()
            ),
        });
    }
    let remote = Remote::new(cache, cache_root, repo_id, revision, inside, options)?;
    let snapshot = remote.fetch_all(files, optional_files, cached, options.force_download)?;
    Ok(remote.inside.in_snapshot(&snapshot))
}

/// transformers' `subfolder` as the `/`-separated path of a folder inside the checkpoint folder or
/// repository (empty for its top level), empty and `.` segments dropped. It becomes a path in the cache and
/// in a local checkpoint folder, so one that could lead out of them (absolute, with `..` segments,
/// backslashes, colons or NUL) is refused.
pub fn check_subfolder(subfolder: &str) -> Result<String> {
    let parts: Vec<&str> = subfolder
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if subfolder.starts_with('/') || parts.contains(&"..") || subfolder.contains(['\\', ':', '\0'])
    {
        return Err(Error::invalid(format!(
            "Invalid subfolder {subfolder:?}: a subfolder is a relative path inside the checkpoint folder or \
             repository (such as \"model\" or \"checkpoints/final\"), without \"..\" segments, backslashes or colons"
        )));
    }
    Ok(parts.join("/"))
}

/// The folder of the repository a call's files are in, as [`check_subfolder`] returns it ("" for the top).
#[derive(Debug, Clone, Default)]
struct Subfolder(String);

impl Subfolder {
    /// The repository path of `file` (a file name relative to the folder).
    fn repo_path(&self, file: &str) -> String {
        if self.0.is_empty() {
            file.to_string()
        } else {
            format!("{}/{file}", self.0)
        }
    }

    /// The folder inside the snapshot folder `snapshot`.
    fn in_snapshot(&self, snapshot: &Path) -> PathBuf {
        if self.0.is_empty() {
            snapshot.to_path_buf()
        } else {
            snapshot.join(&self.0)
        }
    }
}

/// The cache folder of one repository: `{cache}/models--{org}--{name}`.
struct RepoCache {
    dir: PathBuf,
}

impl RepoCache {
    fn new(cache_root: &Path, repo_id: &str) -> Self {
        let name = Repo::new(repo_id.to_string(), RepoType::Model).folder_name();
        Self {
            dir: cache_root.join(name),
        }
    }

    /// The snapshot folder `revision` (checked by [`check_revision`]) points at: a commit hash names it
    /// directly, a branch or tag through `refs/{revision}`. A ref file that holds anything but a commit hash
    /// counts as absent: its content becomes a path, so it must not lead out of `snapshots/`.
    fn snapshot(&self, revision: &str) -> Option<PathBuf> {
        let commit = if is_commit_hash(revision) {
            revision.to_string()
        } else {
            std::fs::read_to_string(self.dir.join("refs").join(revision))
                .ok()?
                .trim()
                .to_string()
        };
        if !is_commit_hash(&commit) {
            return None;
        }
        let dir = self.dir.join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }

    /// huggingface_hub's marker for "this commit has no such file": an empty file in `.no_exist/{commit}/`.
    fn no_exist_marker(&self, commit: &str, file: &str) -> PathBuf {
        self.dir.join(".no_exist").join(commit).join(file)
    }
}

/// The repository path of the first of the files the snapshot `snapshot` lacks in the folder `inside`, `None`
/// when it has them all. A missing optional file counts only where no `.no_exist` marker says the commit has
/// none.
fn first_missing(
    cache: &RepoCache,
    snapshot: &Path,
    inside: &Subfolder,
    files: &[&str],
    optional_files: &[&str],
) -> Result<Option<String>> {
    let dir = inside.in_snapshot(snapshot);
    for &file in files {
        let missing = if file == WEIGHTS {
            missing_weights(&dir)?
        } else {
            (!dir.join(file).is_file()).then(|| file.to_string())
        };
        if let Some(missing) = missing {
            return Ok(Some(inside.repo_path(&missing)));
        }
    }
    let commit = commit_of(snapshot);
    Ok(optional_files
        .iter()
        .map(|f| inside.repo_path(f))
        .find(|f| !snapshot.join(f).is_file() && !cache.no_exist_marker(&commit, f).is_file()))
}

/// The first weight file the snapshot lacks: `model.safetensors`, or a shard of the index when there is one;
/// none when it holds a `pytorch_model.bin` instead (a repository without safetensors), or a shard of the
/// PyTorch index when it holds that.
fn missing_weights(dir: &Path) -> Result<Option<String>> {
    if dir.join(WEIGHTS).is_file()
        || (dir.join(PYTORCH_WEIGHTS).is_file() && !dir.join(WEIGHTS_INDEX).is_file())
    {
        return Ok(None);
    }
    let Some(index) = weights_index(dir) else {
        return Ok(Some(WEIGHTS.to_string()));
    };
    Ok(shard_names(&index)?
        .into_iter()
        .find(|shard| !dir.join(shard).is_file()))
}

/// The commit hash a snapshot folder is named after.
fn commit_of(snapshot: &Path) -> String {
    snapshot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// huggingface_hub's `REGEX_COMMIT_HASH`: 40 lowercase hexadecimal digits.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A revision names a file under `refs/` and a folder under `snapshots/` (huggingface_hub refuses a
/// pointer path outside `snapshots/` with ValueError): a branch, tag or commit hash of `/`-separated
/// segments that are neither empty, `.` nor `..`, without backslashes, colons or control characters.
fn check_revision(revision: &str) -> Result<()> {
    let segment_ok = |s: &str| !s.is_empty() && s != "." && s != "..";
    let valid = revision.split('/').all(segment_ok)
        && !revision
            .chars()
            .any(|c| c.is_control() || c == '\\' || c == ':');
    if valid {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "Invalid revision {revision:?}: a revision is a branch, a tag or a commit hash (such as \"main\", \"v1.0\" \
         or \"refs/pr/1\"), without empty, \".\" or \"..\" segments, backslashes or colons"
    )))
}

/// huggingface_hub's `_validate_relative_filename`: a file of the repository is a relative
/// `/`-separated path that stays inside the snapshot folder.
fn check_filename(file: &str) -> Result<()> {
    let plain = !file.is_empty()
        && !file.contains(['\\', ':', '\0'])
        && Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if plain {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "Invalid filename {file:?}: a file of a Hub repository is a relative path without \"..\" segments"
    )))
}

/// huggingface_hub's rule for repo ids: `name` or `org/name`, letters, digits, `-`, `_`, `.`, no `--` or
/// `..`, at most 96 characters. Anything else is most likely a mistyped local folder, and said so.
fn check_repo_id(repo_id: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    let parts: Vec<&str> = repo_id.split('/').collect();
    let valid = repo_id.len() <= 96
        && parts.len() <= 2
        && parts.iter().all(|p| part_ok(p))
        && !repo_id.contains("--")
        && !repo_id.contains("..")
        && !repo_id.ends_with(".git");
    if valid {
        Ok(())
    } else {
        Err(Error::NotFound {
            path: PathBuf::from(repo_id),
            hint: "It is neither a local folder nor a Hugging Face Hub repo id (`org/name`)."
                .to_string(),
        })
    }
}

/// An environment variable, where set and not empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// huggingface_hub's truth test for environment flags.
fn offline_from_env() -> bool {
    env("HF_HUB_OFFLINE").is_some_and(|v| {
        ["1", "on", "yes", "true"].contains(&v.trim().to_ascii_lowercase().as_str())
    })
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    if let Some(home) = env("HF_HOME") {
        return Some(PathBuf::from(home));
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache")))?;
    Some(cache.join("huggingface"))
}

/// `cache_dir=`, else `$HF_HUB_CACHE` (or its old name `HUGGINGFACE_HUB_CACHE`), else `{hf_home}/hub`.
fn cache_dir(options: &HubOptions) -> Result<PathBuf> {
    if let Some(dir) = &options.cache_dir {
        return Ok(dir.clone());
    }
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("hub")))
        .ok_or_else(|| {
            Error::invalid("cannot find the home folder for the Hugging Face cache; set HF_HOME or pass cache_dir")
        })
}

fn token(auth: &Auth) -> Option<String> {
    match auth {
        Auth::Anonymous => None,
        Auth::Token(token) => Some(token.clone()),
        Auth::FromEnvironment => env("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
            let path = env("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .or_else(|| hf_home().map(|h| h.join("token")))?;
            let token = std::fs::read_to_string(path).ok()?;
            Some(token.trim().to_string()).filter(|t| !t.is_empty())
        }),
    }
}

/// What the Hub answered for one file.
enum Fetched {
    /// Downloaded (or already there) in this snapshot folder.
    In(PathBuf),
    /// The revision has no such file (404 for the file, the repository and revision exist).
    Absent,
}

/// The Hub side of one [`download`] call.
struct Remote<'a> {
    api: ApiRepo,
    cache: RepoCache,
    repo_id: &'a str,
    revision: &'a str,
    /// The folder of the repository the files of the call are in.
    inside: Subfolder,
    token: Option<String>,
    progress: bool,
}

impl<'a> Remote<'a> {
    fn new(
        cache: RepoCache,
        cache_root: PathBuf,
        repo_id: &'a str,
        revision: &'a str,
        inside: Subfolder,
        options: &HubOptions,
    ) -> Result<Self> {
        let endpoint = env("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = token(&options.auth);
        let api = ApiBuilder::from_cache(Cache::new(cache_root))
            .with_endpoint(endpoint.trim_end_matches('/').to_string())
            // hf-hub would read the token next to the cache folder, which is wrong for HF_HUB_CACHE.
            .with_token(token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| Error::invalid(format!("cannot set up the Hub client: {e}")))?;
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        let progress = env("HF_HUB_DISABLE_PROGRESS_BARS").is_none();
        Ok(Self {
            api: api.repo(repo),
            cache,
            repo_id,
            revision,
            inside,
            token,
            progress,
        })
    }

    /// Fetches what `start` (the cached snapshot) lacks and returns the snapshot folder. All files must end in
    /// one snapshot: when a download lands in another commit's snapshot (the branch moved since the cache was
    /// filled), the whole set is checked again against that one. Here and below, files are named relative to
    /// `inside` and the folders are snapshot folders.
    fn fetch_all(
        &self,
        files: &[&str],
        optional_files: &[&str],
        start: Option<PathBuf>,
        force: bool,
    ) -> Result<PathBuf> {
        let mut target = if force { None } else { start };
        // With force_download each file is downloaded once per call, also across restarts.
        let mut fetched: Vec<String> = Vec::new();
        for _ in 0..=MAX_SNAPSHOT_RESTARTS {
            match self.fetch_set(files, optional_files, &mut target, &mut fetched, force)? {
                Some(dir) => return Ok(dir),
                None => continue,
            }
        }
        Err(Error::invalid(format!(
            "{} (revision {}) kept moving to new commits while downloading; try again",
            self.repo_id, self.revision
        )))
    }

    /// One pass over the file set; `None` when the snapshot changed and the pass must start again.
    fn fetch_set(
        &self,
        files: &[&str],
        optional_files: &[&str],
        target: &mut Option<PathBuf>,
        fetched: &mut Vec<String>,
        force: bool,
    ) -> Result<Option<PathBuf>> {
        for &file in files {
            let moved = if file == WEIGHTS {
                self.fetch_weights(target, fetched, force)?
            } else {
                self.fetch_required(file, target, fetched, force)?
            };
            if moved {
                return Ok(None);
            }
        }
        for &file in optional_files {
            if self.have(target, file, fetched, force) {
                continue;
            }
            match self.fetch_unless_absent(target, file, force)? {
                Fetched::In(dir) => {
                    fetched.push(file.to_string());
                    if settle(target, dir) {
                        return Ok(None);
                    }
                }
                Fetched::Absent => {}
            }
        }
        match target.take() {
            Some(dir) => Ok(Some(dir)),
            // Only optional files were asked for and the repository has none of them: an empty snapshot.
            None => {
                let names: Vec<String> = optional_files
                    .iter()
                    .map(|f| self.inside.repo_path(f))
                    .collect();
                Err(Error::NotFound {
                    path: PathBuf::from(self.api.url(names.first().map_or("", String::as_str))),
                    hint: format!(
                        "{} (revision {}) has none of {}",
                        self.repo_id,
                        self.revision,
                        names.join(", ")
                    ),
                })
            }
        }
    }

    /// Whether the snapshot already holds `file` and need not be fetched in this pass.
    fn have(&self, target: &Option<PathBuf>, file: &str, fetched: &[String], force: bool) -> bool {
        let Some(dir) = target else { return false };
        self.inside.in_snapshot(dir).join(file).is_file()
            && (!force || fetched.iter().any(|f| f == file))
    }

    /// Downloads `file` unless huggingface_hub's `.no_exist` marker says the snapshot's commit lacks it. The
    /// marker only spares the request: it never stands for the file.
    fn fetch_unless_absent(
        &self,
        target: &Option<PathBuf>,
        file: &str,
        force: bool,
    ) -> Result<Fetched> {
        let path = self.inside.repo_path(file);
        let known_absent = !force
            && target.as_ref().is_some_and(|dir| {
                !dir.join(&path).is_file()
                    && self.cache.no_exist_marker(&commit_of(dir), &path).is_file()
            });
        if known_absent {
            Ok(Fetched::Absent)
        } else {
            self.fetch(&path)
        }
    }

    /// Fetches a required file; `true` when it landed in another snapshot than `target`.
    fn fetch_required(
        &self,
        file: &str,
        target: &mut Option<PathBuf>,
        fetched: &mut Vec<String>,
        force: bool,
    ) -> Result<bool> {
        if self.have(target, file, fetched, force) {
            return Ok(false);
        }
        match self.fetch_unless_absent(target, file, force)? {
            Fetched::In(dir) => {
                fetched.push(file.to_string());
                Ok(settle(target, dir))
            }
            Fetched::Absent => {
                let path = self.inside.repo_path(file);
                Err(Error::NotFound {
                    path: PathBuf::from(self.api.url(&path)),
                    hint: format!(
                        "{} (revision {}) has no file {path}.",
                        self.repo_id, self.revision
                    ),
                })
            }
        }
    }

    /// Fetches `model.safetensors`, or the index and its shards, or else `pytorch_model.bin`, or else its index
    /// and shards; `true` when the snapshot moved.
    fn fetch_weights(
        &self,
        target: &mut Option<PathBuf>,
        fetched: &mut Vec<String>,
        force: bool,
    ) -> Result<bool> {
        // Done when nothing is missing; without force a snapshot stopped part-way through its shards resumes
        // at the first missing one.
        let done = match target {
            Some(dir) if !force => missing_weights(&self.inside.in_snapshot(dir))?.is_none(),
            _ => self.have(target, WEIGHTS, fetched, force),
        };
        if done {
            return Ok(false);
        }
        let has_index = target
            .as_ref()
            .and_then(|dir| weights_index(&self.inside.in_snapshot(dir)))
            .is_some_and(|index| {
                let name = index
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                self.have(target, name, fetched, force)
            });
        if !has_index {
            match self.fetch_unless_absent(target, WEIGHTS, force)? {
                Fetched::In(dir) => {
                    fetched.push(WEIGHTS.to_string());
                    return Ok(settle(target, dir));
                }
                Fetched::Absent => {}
            }
            match self.fetch_unless_absent(target, WEIGHTS_INDEX, force)? {
                Fetched::In(dir) => {
                    fetched.push(WEIGHTS_INDEX.to_string());
                    if settle(target, dir) {
                        return Ok(true);
                    }
                }
                // No safetensors weights: an older checkpoint's PyTorch archive, read without running its
                // pickle.
                Fetched::Absent => {
                    if let Fetched::In(dir) =
                        self.fetch_unless_absent(target, PYTORCH_WEIGHTS, force)?
                    {
                        fetched.push(PYTORCH_WEIGHTS.to_string());
                        return Ok(settle(target, dir));
                    }
                    let Fetched::In(dir) =
                        self.fetch_unless_absent(target, PYTORCH_WEIGHTS_INDEX, force)?
                    else {
                        return Err(self.no_weights());
                    };
                    fetched.push(PYTORCH_WEIGHTS_INDEX.to_string());
                    if settle(target, dir) {
                        return Ok(true);
                    }
                }
            }
        }
        let Some(index) = target
            .as_ref()
            .and_then(|dir| weights_index(&self.inside.in_snapshot(dir)))
        else {
            return Err(Error::invalid(
                "internal: the weights index was fetched without a snapshot folder",
            ));
        };
        for shard in shard_names(&index)? {
            if self.fetch_required(&shard, target, fetched, force)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The error for a repository (or its subfolder) without weights florence2-rs reads.
    fn no_weights(&self) -> Error {
        let [weights, index, pytorch, pytorch_index] = [
            WEIGHTS,
            WEIGHTS_INDEX,
            PYTORCH_WEIGHTS,
            PYTORCH_WEIGHTS_INDEX,
        ]
        .map(|name| self.inside.repo_path(name));
        let checkpoint = if self.inside.0.is_empty() {
            "it a Florence-2 checkpoint".to_string()
        } else {
            format!("{} a Florence-2 checkpoint folder", self.inside.0)
        };
        Error::NotFound {
            path: PathBuf::from(self.api.url(&weights)),
            hint: format!(
                "{} (revision {}) has none of {weights}, {index}, {pytorch} and {pytorch_index}; is \
                 {checkpoint}?",
                self.repo_id, self.revision
            ),
        }
    }

    /// A HEAD request for `file` at the revision, without following redirects.
    fn head(&self, file: &str) -> std::result::Result<ureq::Response, Box<ureq::Error>> {
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .redirects(0)
            .build();
        let mut request = agent.head(&self.api.url(file));
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        request.call().map_err(Box::new)
    }

    /// hf-hub names the snapshot folder and writes `refs/{revision}` after the commit the server sends, before
    /// anything here could look at it: a commit that is no hash (`../../x`) would make it write outside the
    /// cache. So the commit of the server's answer is checked first. A server that cannot be asked is left
    /// to the download, which reports it.
    fn check_server_commit(&self, file: &str) -> Result<()> {
        let response = match self.head(file).map_err(|err| *err) {
            Ok(response) | Err(ureq::Error::Status(_, response)) => response,
            Err(ureq::Error::Transport(_)) => return Ok(()),
        };
        match response.header("x-repo-commit") {
            Some(commit) if !is_commit_hash(commit) => Err(self.io_error(
                file,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the Hub answered with commit {commit:?}, which is not a commit hash: is HF_ENDPOINT a \
                         Hugging Face Hub?"
                    ),
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Downloads one file, named by its repository path, into the cache (hf-hub: blob, then snapshot link,
    /// then `refs/{revision}`).
    fn fetch(&self, file: &str) -> Result<Fetched> {
        self.check_server_commit(file)?;
        let progress = BigFileProgress {
            enabled: self.progress,
            bar: None,
        };
        // hf-hub builds the snapshot link from the commit the server sends and asserts that it exists: a
        // server answer it cannot take panics inside hf-hub, which must not take the process down.
        let download = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.api.download_with_progress(file, progress)
        }))
        .map_err(|panic| {
            let why = crate::error::panic_message(panic.as_ref());
            self.io_error(
                file,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the Hub client failed on the server's answer ({why}): is HF_ENDPOINT a Hugging Face Hub?"),
                ),
            )
        })?;
        match download {
            Ok(path) => {
                let depth = Path::new(file).components().count();
                let dir = path.ancestors().nth(depth).map(Path::to_path_buf).ok_or_else(|| {
                    Error::invalid(format!("internal: {} is not inside a snapshot folder", path.display()))
                })?;
                // The folder is named after the commit the server sent: used only where it is a commit hash.
                let in_snapshots = dir.parent() == Some(self.cache.dir.join("snapshots").as_path());
                if !in_snapshots || !is_commit_hash(&commit_of(&dir)) {
                    return Err(self.io_error(
                        file,
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "the Hub answered with commit {:?}, which is not a commit hash: is HF_ENDPOINT a \
                                 Hugging Face Hub?",
                                commit_of(&dir)
                            ),
                        ),
                    ));
                }
                Ok(Fetched::In(dir))
            }
            Err(ApiError::RequestError(err)) => match *err {
                ureq::Error::Status(404, response)
                    if response.header("x-error-code").is_none_or(|c| c == "EntryNotFound") =>
                {
                    // Remember the absence as huggingface_hub does, so the next load asks nothing.
                    if let Some(commit) = response.header("x-repo-commit").filter(|c| is_commit_hash(c)) {
                        let marker = self.cache.no_exist_marker(commit, file);
                        if let Some(parent) = marker.parent() {
                            // Only a cache of "known absent": failing to write it costs a request next time.
                            let _ = std::fs::create_dir_all(parent).and_then(|_| std::fs::write(&marker, b""));
                        }
                    }
                    Ok(Fetched::Absent)
                }
                ureq::Error::Status(code, response) => {
                    Err(self.status_error(file, code, response.header("x-error-code")))
                }
                ureq::Error::Transport(transport) => Err(self.io_error(
                    file,
                    io::Error::other(format!(
                        "cannot reach the Hub: {transport}. Check the network and HF_ENDPOINT, or set \
                         HF_HUB_OFFLINE=1 to use only the cache"
                    )),
                )),
            },
            Err(ApiError::IoError(err)) => Err(self.io_error(
                file,
                io::Error::new(
                    err.kind(),
                    format!("download failed ({err}); the part already downloaded is kept and the next try resumes it"),
                ),
            )),
            Err(ApiError::InvalidResume) => Err(self.io_error(
                file,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a partial download in {} is larger than the file; delete its *.part files",
                        self.cache.dir.join("blobs").display()
                    ),
                ),
            )),
            Err(err @ (ApiError::MissingHeader(_) | ApiError::InvalidHeader(_))) => Err(self.io_error(
                file,
                io::Error::new(io::ErrorKind::InvalidData, format!("{err}: is HF_ENDPOINT a Hugging Face Hub?")),
            )),
            Err(err) => Err(self.io_error(file, io::Error::other(err.to_string()))),
        }
    }

    fn io_error(&self, file: &str, source: io::Error) -> Error {
        Error::Io {
            path: PathBuf::from(self.api.url(file)),
            source,
        }
    }

    /// An HTTP error status, explained with the Hub's `X-Error-Code` where it sent one.
    fn status_error(&self, file: &str, code: u16, error_code: Option<&str>) -> Error {
        let (repo, rev) = (self.repo_id, self.revision);
        let path = PathBuf::from(self.api.url(file));
        match (code, error_code) {
            (404, Some("RevisionNotFound")) => Error::NotFound { path, hint: format!("{repo} has no revision {rev}.") },
            (401 | 403 | 404, Some("GatedRepo")) | (403, _) => Error::Io {
                path,
                source: io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{repo} is gated or restricted (HTTP {code}): accept its terms on the Hub and pass token= or set HF_TOKEN"),
                ),
            },
            (401 | 404, _) => Error::NotFound {
                path,
                hint: format!(
                    "No repository {repo} on the Hub, or it is private (HTTP {code}): check the id, and pass token= \
                     or set HF_TOKEN for a private one."
                ),
            },
            _ => Error::Io { path, source: io::Error::other(format!("the Hub answered HTTP {code} for {file} of {repo}")) },
        }
    }
}

/// Records where a file landed; `true` when that is another snapshot than the one the set is being put in.
fn settle(target: &mut Option<PathBuf>, dir: PathBuf) -> bool {
    match target {
        Some(current) if *current == dir => false,
        Some(current) => {
            *current = dir;
            true
        }
        None => {
            *target = Some(dir);
            false
        }
    }
}

/// hf-hub's progress bar (on stderr, hidden when stderr is not a terminal), drawn only for big files.
struct BigFileProgress {
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Progress for BigFileProgress {
    fn init(&mut self, size: usize, filename: &str) {
        if !self.enabled || size < PROGRESS_MIN_BYTES {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| ProgressBar::new(0));
        // hf-hub calls init again before each (resumed) request and then reports the bytes already there.
        bar.set_position(0);
        Progress::init(bar, size, filename);
    }

    fn update(&mut self, size: usize) {
        if let Some(bar) = &mut self.bar {
            Progress::update(bar, size);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &mut self.bar {
            Progress::finish(bar);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_huggingface_hub() {
        for ok in [
            "microsoft/Florence-2-base",
            "gpt2",
            "org/name.v1",
            "a_b/c-d",
        ] {
            assert!(check_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "./folder",
            "a/b/c",
            "org/--x",
            "org/a..b",
            "org/name-",
            "with space/x",
            "org/name.git",
        ] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revisions_and_filenames_stay_inside_the_cache() {
        for ok in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(check_revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "../../x", "..", "a/../b", "/abs", "a//b", "./x", "a\\..\\b", "C:x", "a\nb",
        ] {
            let err = check_revision(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{bad}");
            assert!(err.to_string().contains("Invalid revision"), "{bad}");
        }
        for ok in ["config.json", "sub/model.safetensors"] {
            assert!(check_filename(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/../../x", "/etc/passwd", "a\\b", "C:x"] {
            assert!(
                matches!(check_filename(bad), Err(Error::InvalidInput(_))),
                "{bad}"
            );
        }
        let options = HubOptions {
            revision: Some("../../x".into()),
            local_files_only: true,
            ..Default::default()
        };
        assert!(matches!(
            download("org/name", &["config.json"], &[], &options),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn a_ref_that_is_no_commit_hash_leads_nowhere() {
        let root = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(root.path(), "org/name");
        std::fs::create_dir_all(cache.dir.join("refs")).unwrap();
        std::fs::create_dir_all(root.path().join("elsewhere")).unwrap();
        std::fs::write(cache.dir.join("refs/main"), "../../elsewhere").unwrap();
        assert_eq!(cache.snapshot("main"), None);
        let upper = "0123456789ABCDEF0123456789ABCDEF01234567";
        std::fs::create_dir_all(cache.dir.join("snapshots").join(upper)).unwrap();
        assert_eq!(cache.snapshot(upper), None);
    }

    #[test]
    fn cache_lookup_follows_refs_and_commit_hashes() {
        let root = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(root.path(), "org/name");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = cache.dir.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(cache.dir.join("refs")).unwrap();
        std::fs::write(cache.dir.join("refs/main"), commit).unwrap();
        assert_eq!(cache.snapshot("main"), Some(snap.clone()));
        assert_eq!(cache.snapshot(commit), Some(snap.clone()));
        assert_eq!(cache.snapshot("v2"), None);

        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let top = Subfolder::default();
        assert_eq!(
            first_missing(&cache, &snap, &top, &["config.json"], &[]).unwrap(),
            None
        );
        assert_eq!(
            first_missing(&cache, &snap, &top, &["config.json", WEIGHTS], &[])
                .unwrap()
                .as_deref(),
            Some(WEIGHTS)
        );
        // An optional file is settled by the file or by huggingface_hub's .no_exist marker.
        assert_eq!(
            first_missing(&cache, &snap, &top, &[], &["generation_config.json"])
                .unwrap()
                .as_deref(),
            Some("generation_config.json")
        );
        let marker = cache.no_exist_marker(commit, "generation_config.json");
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(&marker, b"").unwrap();
        assert_eq!(
            first_missing(&cache, &snap, &top, &[], &["generation_config.json"]).unwrap(),
            None
        );

        // Sharded weights: complete once every listed shard is there.
        let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(snap.join(WEIGHTS_INDEX), index).unwrap();
        std::fs::write(snap.join("model-00001-of-00002.safetensors"), b"x").unwrap();
        assert_eq!(
            missing_weights(&snap).unwrap().as_deref(),
            Some("model-00002-of-00002.safetensors")
        );
        std::fs::write(snap.join("model-00002-of-00002.safetensors"), b"x").unwrap();
        assert_eq!(missing_weights(&snap).unwrap(), None);
    }

    #[test]
    fn subfolders_are_relative_paths_inside_the_repository() {
        for (given, want) in [
            ("", ""),
            (".", ""),
            ("model", "model"),
            ("checkpoints/final/", "checkpoints/final"),
            ("./checkpoints//final", "checkpoints/final"),
        ] {
            assert_eq!(check_subfolder(given).unwrap(), want, "{given}");
        }
        for bad in ["..", "../x", "a/../../x", "/tmp", "a\\..\\x", "C:x", "a\0b"] {
            let err = check_subfolder(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{bad}");
            assert!(err.to_string().contains("Invalid subfolder"), "{bad}");
        }
        // Refused before the cache is looked at, even where the path it names holds the files.
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("config.json"), "{}").unwrap();
        let options = HubOptions {
            cache_dir: Some(root.path().join("hub")),
            local_files_only: true,
            subfolder: Some("../..".into()),
            ..Default::default()
        };
        let err = download("org/name", &["config.json"], &[], &options).unwrap_err();
        assert!(err.to_string().contains("Invalid subfolder"), "{err}");
    }

    #[test]
    fn a_cached_subfolder_is_served_from_its_folder_of_the_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(root.path(), "org/name");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = cache.dir.join("snapshots").join(commit);
        let folder = snap.join("checkpoints/final");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::create_dir_all(cache.dir.join("refs")).unwrap();
        std::fs::write(cache.dir.join("refs/main"), commit).unwrap();
        std::fs::write(folder.join("config.json"), "{}").unwrap();
        // PyTorch weights in shards, named relative to their index.
        let index = r#"{"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}"#;
        std::fs::write(folder.join(PYTORCH_WEIGHTS_INDEX), index).unwrap();
        std::fs::write(folder.join("pytorch_model-00001-of-00002.bin"), b"x").unwrap();
        let options = HubOptions {
            cache_dir: Some(root.path().to_path_buf()),
            local_files_only: true,
            subfolder: Some("checkpoints/final/".into()),
            ..Default::default()
        };
        let files = ["config.json", WEIGHTS];
        let optional = ["generation_config.json"];
        let err = download("org/name", &files, &optional, &options).unwrap_err();
        assert!(
            err.to_string()
                .contains("checkpoints/final/pytorch_model-00002-of-00002.bin"),
            "{err}"
        );
        std::fs::write(folder.join("pytorch_model-00002-of-00002.bin"), b"x").unwrap();
        // The optional file is settled by the marker of its path in the repository.
        let err = download("org/name", &files, &optional, &options).unwrap_err();
        assert!(
            err.to_string()
                .contains("checkpoints/final/generation_config.json"),
            "{err}"
        );
        let marker = cache.no_exist_marker(commit, "checkpoints/final/generation_config.json");
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(&marker, b"").unwrap();
        assert_eq!(
            download("org/name", &files, &optional, &options).unwrap(),
            folder
        );
        // The top of the repository holds none of them.
        let top = HubOptions {
            subfolder: None,
            ..options
        };
        assert!(matches!(
            download("org/name", &files, &[], &top),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn shard_names_stay_inside_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join(WEIGHTS_INDEX);
        std::fs::write(
            &index,
            r#"{"weight_map": {"a": "../../escape.safetensors"}}"#,
        )
        .unwrap();
        assert!(matches!(shard_names(&index), Err(Error::Weights { .. })));
        std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
        assert!(matches!(shard_names(&index), Err(Error::Weights { .. })));
    }
}
