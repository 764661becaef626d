//! What a tenant-registry document may make the proxy read: the operator's `tenant_registry.secret_scope`.
//!
//! A registry is a service other teams run. Its tenant objects are the configuration's, and some of their
//! fields name where a secret is (`upstream_header.env`, `upstream_auth.client_secret` and `.private_key`,
//! each `env` or `file`): the proxy reads it and sends it to the tenant's server or token endpoint. Without a
//! scope a registry could so read any environment variable of Envoy's process and any file Envoy can read.
//! The plugin JSON (the operator's) names what a registry document may name:
//!
//! - `env_prefixes`: environment variables whose name starts with one of these (each ends with `_`, so that
//!   `FTR_REG_` cannot match `FTR_REGISTRY_ADMIN`); names are compared case-sensitively, as the process's
//!   environment is, and must be plain names (`A-Z a-z 0-9 _`, no `=`, no NUL);
//! - `file_directory`: files beneath this directory, given as absolute paths without `.` or `..`
//!   components, and checked again where they are read: the file actually opened must lie beneath the
//!   directory once symlinks are resolved ([`read_file_beneath`]).
//!
//! Absent, a registry document may name no variable and no file. The proxy-wasm build reads no files, so
//! there a document naming any file is refused. The check is pure ([`SecretScope::check`],
//! [`SecretScope::lookup`]); the host only reads what the scoped lookup asks for.

use crate::upstream_auth::FILE_PREFIX;

/// A file asked for by a registry document: [`FILE_BENEATH_PREFIX`]`directory` NUL `path`. Only the host
/// that reads files answers it, with [`read_file_beneath`] (a name no environment variable has).
pub const FILE_BENEATH_PREFIX: &str = "\0file-beneath:";

/// The largest secret file read for a registry document (a PEM key or a service-account JSON is a few KB).
pub const MAX_FILE_BYTES: u64 = 64 * 1024;

/// What a registry document may name; the default names nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretScope {
    env_prefixes: Vec<String>,
    /// Absolute, without a trailing slash, never `/`.
    file_directory: Option<String>,
}

/// Which kind of place a secret field names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Env,
    File,
}

/// A plain environment variable name: `A-Z a-z 0-9 _`, not starting with a digit.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An absolute path without NUL and without `.`, `..` or empty components (a trailing `/` aside).
fn is_plain_absolute(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    // Each component: not empty, not `.`, not `..`; and no NUL anywhere.
    let (mut len, mut dots) = (0usize, 0usize);
    for b in rest.bytes().chain([b'/']) {
        match b {
            b'/' if len == 0 || dots == len && len <= 2 => return false,
            b'/' => (len, dots) = (0, 0),
            0 => return false,
            _ => (len, dots) = (len + 1, dots + usize::from(b == b'.')),
        }
    }
    true
}

impl SecretScope {
    /// Compiles `tenant_registry.secret_scope` as written, `{"env_prefixes": [...], "file_directory": "..."}`
    /// (read from the JSON value by hand: a serde derive here would cost the wasm module kilobytes). An error
    /// is the offending field and what is wrong with it.
    pub fn compile(raw: &serde_json::Value) -> Result<SecretScope, (&'static str, &'static str)> {
        const FIELD: &str = "tenant_registry.secret_scope";
        let Some(raw) = raw.as_object() else { return Err((FIELD, "must be an object")) };
        let (prefixes, directory) = (raw.get("env_prefixes"), raw.get("file_directory"));
        if raw.len() != usize::from(prefixes.is_some()) + usize::from(directory.is_some()) {
            return Err((FIELD, "takes env_prefixes and file_directory only"));
        }
        let is_prefix = |p: &str| is_env_name(p) && p.len() >= 2 && p.ends_with('_');
        let env_prefixes = match prefixes.map(serde_json::Value::as_array) {
            None => Vec::new(),
            Some(Some(list)) if list.iter().all(|p| p.as_str().is_some_and(is_prefix)) => {
                list.iter().filter_map(serde_json::Value::as_str).map(str::to_string).collect()
            }
            Some(_) => {
                return Err((
                    "tenant_registry.secret_scope.env_prefixes",
                    "must list prefixes of A-Z a-z 0-9 _, each ending with `_`",
                ))
            }
        };
        let file_directory = match directory.map(serde_json::Value::as_str) {
            None => None,
            Some(Some(d)) if is_plain_absolute(d) && d != "/" => Some(d.strip_suffix('/').unwrap_or(d).to_string()),
            Some(_) => {
                return Err((
                    "tenant_registry.secret_scope.file_directory",
                    "must be an absolute directory without `.` or `..` components, not `/`",
                ))
            }
        };
        Ok(SecretScope { env_prefixes, file_directory })
    }

    /// Whether a registry document may name `name` (an environment variable, or a file's path). The
    /// refusal says why without repeating the name.
    pub fn check(&self, place: Place, name: &str) -> Result<(), &'static str> {
        match place {
            Place::Env => {
                if self.env_prefixes.is_empty() {
                    return Err("names a variable, but tenant_registry.secret_scope.env_prefixes allows none");
                }
                if !is_env_name(name) {
                    return Err("must be a variable name (A-Z a-z 0-9 _)");
                }
                let inside = self.env_prefixes.iter().any(|p| name.len() > p.len() && name.starts_with(p.as_str()));
                if !inside {
                    return Err("names a variable outside tenant_registry.secret_scope.env_prefixes");
                }
                Ok(())
            }
            // The proxy-wasm VM reads no files: a registry document naming one is refused there, whatever the scope
            // (the checks below would cost the module about a kilobyte for nothing).
            #[cfg(target_arch = "wasm32")]
            Place::File => Err("names a file, which the proxy-wasm build never reads (secret_scope: use env_prefixes)"),
            #[cfg(not(target_arch = "wasm32"))]
            Place::File => {
                let Some(dir) = &self.file_directory else {
                    return Err("names a file, but tenant_registry.secret_scope.file_directory allows none");
                };
                // No control characters either: no secret file needs them, and a log line would carry them.
                if !is_plain_absolute(name) || name.ends_with('/') || name.chars().any(char::is_control) {
                    return Err("must be an absolute path without `.` or `..` components or control characters");
                }
                // Component-wise (both are plain, `dir` without its trailing `/`): `/etc/secrets-evil/x` is not
                // beneath `/etc/secrets`.
                let inside =
                    name.strip_prefix(dir.as_str()).is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'));
                if !inside {
                    return Err("names a file outside tenant_registry.secret_scope.file_directory");
                }
                Ok(())
            }
        }
    }

    /// `lookup`, limited to this scope: an environment variable outside it is not there, and a file (asked
    /// for as [`FILE_PREFIX`]`path`) is asked of `lookup` as [`FILE_BENEATH_PREFIX`]`directory` NUL `path`,
    /// so that the host checks again, on the file it opens, that it lies beneath the directory.
    pub fn lookup<'a>(&'a self, lookup: &'a dyn Fn(&str) -> Option<String>) -> impl Fn(&str) -> Option<String> + 'a {
        move |name: &str| match name.strip_prefix(FILE_PREFIX) {
            Some(path) => {
                self.check(Place::File, path).ok()?;
                let dir = self.file_directory.as_deref()?;
                lookup(&format!("{FILE_BENEATH_PREFIX}{dir}\0{path}"))
            }
            None => {
                self.check(Place::Env, name).ok()?;
                lookup(name)
            }
        }
    }
}

/// Reads the file at `path` for a [`FILE_BENEATH_PREFIX`] key: `None` unless the file opened is a regular
/// file of at most [`MAX_FILE_BYTES`] that lies beneath `dir` once every symlink (of `dir` too) is resolved.
/// The check is made on the opened file (`/proc/self/fd`), and the content read from that same handle, so a
/// path swapped for a symlink between the check and the read changes nothing. Without `/proc`: `None`.
pub fn read_file_beneath(dir: &str, path: &str) -> Option<String> {
    read_beneath(dir, path, &mut |_| {})
}

/// The steps of [`read_file_beneath`] a test can act between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
enum Step {
    /// The directory is resolved; the file is not opened yet.
    Resolved,
    /// The file is opened; not checked yet.
    Opened,
    /// The opened file was checked; nothing is read yet.
    Checked,
}

#[cfg(target_os = "linux")]
fn read_beneath(dir: &str, path: &str, between: &mut dyn FnMut(Step)) -> Option<String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let real_dir = std::fs::canonicalize(dir).ok()?;
    between(Step::Resolved);
    // O_NONBLOCK: a FIFO put in the path must not block the thread that compiles the document.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).ok()?;
    between(Step::Opened);
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let meta = file.metadata().ok()?;
    // A file unlinked since it was opened shows as `<path> (deleted)`: refused, as is anything not regular.
    if !opened.starts_with(&real_dir) || opened == real_dir || meta.nlink() == 0 || !meta.is_file() {
        return None;
    }
    between(Step::Checked);
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text).ok()?;
    (text.len() as u64 <= MAX_FILE_BYTES).then_some(text)
}

#[cfg(not(target_os = "linux"))]
fn read_beneath(_dir: &str, _path: &str, _between: &mut dyn FnMut(Step)) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(v: serde_json::Value) -> Result<SecretScope, (&'static str, &'static str)> {
        SecretScope::compile(&v)
    }

    fn scoped() -> SecretScope {
        scope(json!({"env_prefixes": ["FTR_REGISTRY_", "TENANT_KEYS_"], "file_directory": "/etc/ftr/secrets/"}))
            .unwrap()
    }

    #[test]
    fn without_a_scope_a_registry_document_may_name_nothing() {
        let none = SecretScope::default();
        assert_eq!(scope(json!({})).unwrap(), none);
        for name in ["FTR_REGISTRY_X", "HOME", "PATH"] {
            assert!(none.check(Place::Env, name).unwrap_err().contains("allows none"));
        }
        for path in ["/etc/ftr/secrets/x", "/etc/passwd"] {
            assert!(none.check(Place::File, path).unwrap_err().contains("allows none"));
        }
        let asked = std::cell::Cell::new(0);
        let inner = |_: &str| {
            asked.set(asked.get() + 1);
            Some("value".to_string())
        };
        let lookup = none.lookup(&inner);
        assert_eq!((lookup("HOME"), lookup("\0file:/etc/passwd")), (None, None));
        assert_eq!(asked.get(), 0, "nothing outside the scope is even asked for");
    }

    #[test]
    fn a_variable_is_in_scope_only_by_a_whole_prefix_with_its_exact_case() {
        let s = scoped();
        assert_eq!(s.check(Place::Env, "FTR_REGISTRY_A_SECRET"), Ok(()));
        assert_eq!(s.check(Place::Env, "TENANT_KEYS_B"), Ok(()));
        for name in [
            "HOME",
            "FTR_REGISTRY",          // the prefix without its `_`
            "FTR_REGISTRY_",         // the prefix itself names no variable
            "FTR_REGISTRYX_SECRET",  // a longer name the prefix is only a prefix of (without the `_`)
            "ftr_registry_a_secret", // case: the process's environment is case-sensitive
            "Ftr_Registry_A_SECRET",
            "XFTR_REGISTRY_A", // the prefix inside, not at the start
        ] {
            assert!(s.check(Place::Env, name).is_err(), "{name}");
        }
    }

    #[test]
    fn a_variable_name_with_an_equals_sign_a_nul_or_a_file_key_is_refused() {
        let s = scoped();
        for name in [
            "FTR_REGISTRY_A=B",                 // getenv("A=B") may read variable A
            "FTR_REGISTRY_A\0HOME",             // a C string ends at the NUL
            "\0file:/etc/ftr/secrets/x",        // the host's file key, through an `env` field
            "\0file-beneath:/etc\0/etc/passwd", // the scoped file key, through an `env` field
            "FTR_REGISTRY_A B",
            "FTR_REGISTRY_Ä",
            "",
        ] {
            let why = s.check(Place::Env, name).unwrap_err();
            assert!(!why.contains(name) || name.is_empty(), "the refusal never repeats the name");
        }
        let asked = std::cell::RefCell::new(Vec::new());
        let inner = |n: &str| {
            asked.borrow_mut().push(n.to_string());
            Some("x".to_string())
        };
        let lookup = s.lookup(&inner);
        // The scoped lookup sees `\0file:` as a file and checks it as one; an `=` name never reaches the host.
        assert_eq!(lookup("FTR_REGISTRY_A=B"), None);
        assert_eq!(lookup("\0file:/etc/passwd"), None);
        assert_eq!(lookup("\0file-beneath:/etc\0/etc/passwd"), None);
        assert!(asked.borrow().is_empty(), "{:?}", asked.borrow());
        assert_eq!(lookup("FTR_REGISTRY_A"), Some("x".into()));
        assert_eq!(lookup("\0file:/etc/ftr/secrets/a.pem"), Some("x".into()));
        assert_eq!(
            *asked.borrow(),
            ["FTR_REGISTRY_A".to_string(), "\0file-beneath:/etc/ftr/secrets\0/etc/ftr/secrets/a.pem".to_string()]
        );
    }

    #[test]
    fn a_file_is_in_scope_only_beneath_the_directory_by_whole_components() {
        let s = scoped();
        assert_eq!(s.check(Place::File, "/etc/ftr/secrets/a.pem"), Ok(()));
        assert_eq!(s.check(Place::File, "/etc/ftr/secrets/tenant-a/sa.json"), Ok(()));
        // Kubernetes' secret volumes name `..data`: a name, not a `..` component.
        assert_eq!(s.check(Place::File, "/etc/ftr/secrets/..data/a.pem"), Ok(()));
        for path in [
            "/etc/ftr/secrets-evil/a.pem", // a sibling whose name starts with the directory's
            "/etc/ftr/secretsa.pem",
            "/etc/ftr/secrets", // the directory itself
            "/etc/ftr/secrets/",
            "/etc/ftr/secrets/../../passwd",
            "/etc/ftr/secrets/./a.pem",
            "/etc/ftr/secrets//a.pem",
            "/etc/ftr/secrets/a/..",
            "etc/ftr/secrets/a.pem", // relative
            "secrets/a.pem",
            "a.pem",
            "../a.pem",
            "/etc/ftr/secrets/a.pem\0/x",
            "/etc/ftr/secrets/a\nb",  // a control character (it would reach a log line)
            "/ETC/ftr/secrets/a.pem", // case: paths are case-sensitive
            "/etc/passwd",
            "",
        ] {
            let why = s.check(Place::File, path).unwrap_err();
            assert!(path.is_empty() || !why.contains(path), "the refusal never repeats the path");
        }
    }

    #[test]
    fn a_scope_that_could_be_routed_around_is_refused_naming_its_field() {
        for (v, field) in [
            (json!({"env_prefixes": ["FTR_REG"]}), "tenant_registry.secret_scope.env_prefixes"),
            (json!({"env_prefixes": ["OK_", ""]}), "tenant_registry.secret_scope.env_prefixes"),
            (json!({"env_prefixes": ["_"]}), "tenant_registry.secret_scope.env_prefixes"),
            (json!({"env_prefixes": ["A=B_"]}), "tenant_registry.secret_scope.env_prefixes"),
            (json!({"file_directory": "/"}), "tenant_registry.secret_scope.file_directory"),
            (json!({"file_directory": "secrets"}), "tenant_registry.secret_scope.file_directory"),
            (json!({"file_directory": "/etc/../secrets"}), "tenant_registry.secret_scope.file_directory"),
            (json!({"file_directory": ""}), "tenant_registry.secret_scope.file_directory"),
        ] {
            assert_eq!(scope(v.clone()).unwrap_err().0, field, "{v}");
        }
        assert_eq!(scope(json!({"env_prefix": ["A_"]})).unwrap_err().0, "tenant_registry.secret_scope");
        assert_eq!(scope(json!({"env_prefixes": "A_"})).unwrap_err().0, "tenant_registry.secret_scope.env_prefixes");
        assert_eq!(scope(json!({"env_prefixes": [7]})).unwrap_err().0, "tenant_registry.secret_scope.env_prefixes");
        assert_eq!(scope(json!({"file_directory": 7})).unwrap_err().0, "tenant_registry.secret_scope.file_directory");
        assert_eq!(scope(json!(["A_"])).unwrap_err().0, "tenant_registry.secret_scope");
        // A directory given with or without its trailing slash is the same directory.
        let a = scope(json!({"file_directory": "/etc/ftr/secrets"})).unwrap();
        assert_eq!(a, scope(json!({"file_directory": "/etc/ftr/secrets/"})).unwrap());
        assert!(a.check(Place::File, "/etc/ftr/secrets-evil/x").is_err());
    }

    proptest::proptest! {
        /// Whatever a registry names: no panic, and what is accepted lies in the scope by construction.
        #[test]
        fn whatever_is_accepted_lies_inside_the_scope(name in "\\PC{0,40}", path in "[/a-z.\\-]{0,40}") {
            let s = scope(json!({"env_prefixes": ["FTR_"], "file_directory": "/s"})).unwrap();
            if s.check(Place::Env, &name).is_ok() {
                proptest::prop_assert!(name.starts_with("FTR_") && name.len() > 4 && is_env_name(&name));
            }
            let path = format!("/s/{path}");
            if s.check(Place::File, &path).is_ok() {
                proptest::prop_assert!(path.split('/').skip(2).all(|c| !c.is_empty() && c != "." && c != ".."));
            }
        }
    }

    /// The reader, on a real directory: symlinks resolved, the opened file checked.
    #[cfg(target_os = "linux")]
    mod reading {
        use super::super::*;
        use std::os::unix::fs::symlink;
        use std::path::{Path, PathBuf};

        struct Dirs {
            root: PathBuf,
            scope: PathBuf,
        }

        impl Drop for Dirs {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.root);
            }
        }

        fn dirs(name: &str) -> Dirs {
            let root = std::env::temp_dir().join(format!("ftr-secret-scope-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let scope = root.join("secrets");
            std::fs::create_dir_all(&scope).unwrap();
            std::fs::create_dir_all(root.join("outside")).unwrap();
            std::fs::create_dir_all(root.join("secrets-evil")).unwrap();
            std::fs::write(scope.join("a.pem"), "in-scope").unwrap();
            std::fs::write(root.join("outside/canary"), "CANARY").unwrap();
            std::fs::write(root.join("secrets-evil/canary"), "CANARY").unwrap();
            Dirs { root, scope }
        }

        fn s(p: &Path) -> &str {
            p.to_str().unwrap()
        }

        #[test]
        fn a_file_beneath_the_directory_is_read_and_one_outside_it_is_not() {
            let d = dirs("plain");
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.scope.join("a.pem"))).as_deref(), Some("in-scope"));
            let dir = format!("{}/", s(&d.scope));
            assert_eq!(read_file_beneath(&dir, s(&d.scope.join("a.pem"))).as_deref(), Some("in-scope"));
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.root.join("outside/canary"))), None);
            // `/x/secrets-evil` starts with the string `/x/secrets`, not with its components.
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.root.join("secrets-evil/canary"))), None);
            assert_eq!(read_file_beneath(s(&d.scope), &format!("{}/../outside/canary", s(&d.scope))), None);
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.scope)), None, "the directory itself");
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.scope.join("missing"))), None);
        }

        /// The dynamic module's lookup (`config::process_lookup`) answers the scoped key with this reader only.
        #[test]
        fn the_process_lookup_reads_a_scoped_key_beneath_its_directory_only() {
            let d = dirs("process-lookup");
            let key = |dir: &Path, path: &Path| format!("{FILE_BENEATH_PREFIX}{}\0{}", s(dir), s(path));
            let lookup = crate::config::process_lookup;
            assert_eq!(lookup(&key(&d.scope, &d.scope.join("a.pem"))).as_deref(), Some("in-scope"));
            assert_eq!(lookup(&key(&d.scope, &d.root.join("outside/canary"))), None);
            assert_eq!(lookup(&format!("{FILE_BENEATH_PREFIX}{}", s(&d.root.join("outside/canary")))), None);
            // What the scoped lookup sends, end to end.
            let scope = SecretScope { env_prefixes: vec![], file_directory: Some(s(&d.scope).to_string()) };
            let scoped = scope.lookup(&lookup);
            assert_eq!(scoped(&format!("{FILE_PREFIX}{}", s(&d.scope.join("a.pem")))).as_deref(), Some("in-scope"));
            symlink(d.root.join("outside/canary"), d.scope.join("out.pem")).unwrap();
            assert_eq!(scoped(&format!("{FILE_PREFIX}{}", s(&d.scope.join("out.pem")))), None);
        }

        #[test]
        fn a_symlink_inside_pointing_out_is_refused_and_one_pointing_inside_is_followed() {
            let d = dirs("symlinks");
            symlink(d.root.join("outside/canary"), d.scope.join("out.pem")).unwrap();
            symlink("../outside", d.scope.join("outdir")).unwrap();
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.scope.join("out.pem"))), None);
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.scope.join("outdir/canary"))), None);
            // Kubernetes' layout: key -> ..data/key, ..data -> ..2026_01_01/ (all inside).
            std::fs::create_dir(d.scope.join("..2026_01_01")).unwrap();
            std::fs::write(d.scope.join("..2026_01_01/key"), "k8s").unwrap();
            symlink("..2026_01_01", d.scope.join("..data")).unwrap();
            symlink("..data/key", d.scope.join("key")).unwrap();
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.scope.join("key"))).as_deref(), Some("k8s"));
            // A directory that is itself a symlink is resolved the same way.
            symlink(&d.scope, d.root.join("link-to-secrets")).unwrap();
            let linked = d.root.join("link-to-secrets");
            assert_eq!(read_file_beneath(s(&linked), s(&linked.join("a.pem"))).as_deref(), Some("in-scope"));
            assert_eq!(read_file_beneath(s(&linked), s(&linked.join("out.pem"))), None);
        }

        #[test]
        fn a_file_swapped_for_a_symlink_out_before_it_is_opened_is_refused() {
            let d = dirs("swap-before");
            let path = d.scope.join("a.pem");
            let outside = d.root.join("outside/canary");
            let mut swap = |step: Step| {
                if step == Step::Resolved {
                    std::fs::remove_file(&path).unwrap();
                    symlink(&outside, &path).unwrap();
                }
            };
            assert_eq!(read_beneath(s(&d.scope), s(&d.scope.join("a.pem")), &mut swap), None);
        }

        #[test]
        fn a_file_swapped_after_the_check_is_read_from_what_was_checked() {
            let d = dirs("swap-after");
            let path = d.scope.join("a.pem");
            let outside = d.root.join("outside/canary");
            let mut swap = |step: Step| {
                if step == Step::Checked {
                    std::fs::rename(&path, d.scope.join("old.pem")).unwrap();
                    symlink(&outside, &path).unwrap();
                }
            };
            let read = read_beneath(s(&d.scope), s(&d.scope.join("a.pem")), &mut swap);
            assert_eq!(read.as_deref(), Some("in-scope"), "the content of the file checked, never the canary");
        }

        #[test]
        fn a_fifo_a_directory_a_deleted_file_or_a_large_file_is_not_read() {
            let d = dirs("kinds");
            let fifo = d.scope.join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
            if made {
                assert_eq!(read_file_beneath(s(&d.scope), s(&fifo)), None, "returns at once, never blocks");
            }
            std::fs::create_dir(d.scope.join("sub")).unwrap();
            assert_eq!(read_file_beneath(s(&d.scope), s(&d.scope.join("sub"))), None);
            let path = d.scope.join("a.pem");
            let mut unlink = |step: Step| {
                if step == Step::Opened {
                    std::fs::remove_file(&path).unwrap();
                }
            };
            assert_eq!(read_beneath(s(&d.scope), s(&path), &mut unlink), None, "unlinked since it was opened");
            std::fs::write(&path, "in-scope").unwrap();
            let big = d.scope.join("big");
            std::fs::write(&big, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
            assert_eq!(read_file_beneath(s(&d.scope), s(&big)), None);
            std::fs::write(&big, vec![b'a'; MAX_FILE_BYTES as usize]).unwrap();
            assert_eq!(read_file_beneath(s(&d.scope), s(&big)).map(|t| t.len()), Some(MAX_FILE_BYTES as usize));
            assert_eq!(read_file_beneath(s(&d.scope), s(&path)).as_deref(), Some("in-scope"));
        }
    }
}
