//! Directory-relative file operations that never follow a symlink (used by the receiver).
//!
//! On Unix every step is relative to a directory file descriptor that was itself opened
//! with `O_NOFOLLOW | O_DIRECTORY`: `openat`, `mkdirat`, `fstatat(AT_SYMLINK_NOFOLLOW)`,
//! `linkat`, `renameat`, `unlinkat`. Once a directory is open, swapping a path component
//! for a symlink (even by a local user racing us) cannot redirect a write outside the
//! output directory. Elsewhere a path-based fallback with `symlink_metadata` checks is used.

use std::fs::File;
use std::io;
use std::path::Path;

/// What a name in a directory is, without following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink.
    Symlink,
    /// Anything else (FIFO, socket, device).
    Other,
}

/// An open directory.
#[derive(Debug)]
pub(crate) struct SafeDir {
    #[cfg(unix)]
    fd: std::os::fd::OwnedFd,
    #[cfg(not(unix))]
    path: std::path::PathBuf,
}

#[cfg(unix)]
mod imp {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    fn cstr(name: &str) -> io::Result<CString> {
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
    }

    fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    const DIR_FLAGS: libc::c_int =
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

    impl SafeDir {
        /// Opens the root (the user's output directory; a symlink here is the user's choice
        /// and is followed).
        pub(crate) fn open_root(path: &Path) -> io::Result<SafeDir> {
            let c = CString::new(path.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
            // SAFETY: `c` is a valid NUL-terminated string; the returned fd is owned below.
            let fd = check(unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            })?;
            // SAFETY: `fd` was just opened and is not owned by anything else.
            Ok(SafeDir {
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
            })
        }

        /// Opens the child directory `name`, creating it if missing and `create`.
        /// `Ok(None)`: missing (and not created). `Err(NotADirectory)`: a symlink or not a
        /// directory.
        pub(crate) fn open_child(&self, name: &str, create: bool) -> io::Result<Option<SafeDir>> {
            let c = cstr(name)?;
            for _ in 0..2 {
                // SAFETY: valid dirfd and NUL-terminated name.
                let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), DIR_FLAGS) };
                if fd >= 0 {
                    // SAFETY: freshly opened fd, owned here.
                    return Ok(Some(SafeDir {
                        fd: unsafe { OwnedFd::from_raw_fd(fd) },
                    }));
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::ENOENT) if create => {
                        // SAFETY: valid dirfd and name.
                        let r = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o755) };
                        if r < 0 {
                            let e = io::Error::last_os_error();
                            if e.raw_os_error() != Some(libc::EEXIST) {
                                return Err(e);
                            }
                        }
                    }
                    Some(libc::ENOENT) => return Ok(None),
                    Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                        return Err(io::Error::new(io::ErrorKind::NotADirectory, name));
                    }
                    _ => return Err(err),
                }
            }
            Err(io::Error::other(format!(
                "{name}: created but cannot be opened"
            )))
        }

        /// What `name` is, without following a symlink; `None` if it does not exist.
        pub(crate) fn kind(&self, name: &str) -> io::Result<Option<Kind>> {
            let c = cstr(name)?;
            // SAFETY: zeroed `stat` is a valid out-parameter.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid dirfd, name and out-pointer.
            let r = unsafe {
                libc::fstatat(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return if e.raw_os_error() == Some(libc::ENOENT) {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
            Ok(Some(match st.st_mode & libc::S_IFMT {
                libc::S_IFREG => Kind::File,
                libc::S_IFDIR => Kind::Dir,
                libc::S_IFLNK => Kind::Symlink,
                _ => Kind::Other,
            }))
        }

        /// Opens (creating if needed) the regular file `name` for reading and writing,
        /// refusing a symlink.
        pub(crate) fn open_file(&self, name: &str) -> io::Result<File> {
            let c = cstr(name)?;
            let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: valid dirfd and name; mode passed as the variadic argument.
            let fd = check(unsafe {
                libc::openat(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    flags,
                    0o644 as libc::c_uint,
                )
            })?;
            // SAFETY: freshly opened fd, owned by the File.
            Ok(unsafe { File::from_raw_fd(fd) })
        }

        /// Opens the existing regular file `name` read-only, refusing a symlink.
        pub(crate) fn read_file(&self, name: &str) -> io::Result<File> {
            let c = cstr(name)?;
            let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: valid dirfd and name.
            let fd = check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) })?;
            // SAFETY: freshly opened fd, owned by the File.
            Ok(unsafe { File::from_raw_fd(fd) })
        }

        /// Removes the file `name` (a symlink itself, never its target).
        pub(crate) fn remove(&self, name: &str) -> io::Result<()> {
            let c = cstr(name)?;
            // SAFETY: valid dirfd and name.
            check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(|_| ())
        }

        /// Hard-links `name` here as `to_name` in `to`; fails if `to_name` exists.
        pub(crate) fn link_to(&self, name: &str, to: &SafeDir, to_name: &str) -> io::Result<()> {
            let (a, b) = (cstr(name)?, cstr(to_name)?);
            // SAFETY: valid dirfds and names; flags 0 never follows a symlink source.
            check(unsafe {
                libc::linkat(
                    self.fd.as_raw_fd(),
                    a.as_ptr(),
                    to.fd.as_raw_fd(),
                    b.as_ptr(),
                    0,
                )
            })
            .map(|_| ())
        }

        /// Renames `name` here to `to_name` in `to`, replacing it.
        pub(crate) fn rename_to(&self, name: &str, to: &SafeDir, to_name: &str) -> io::Result<()> {
            let (a, b) = (cstr(name)?, cstr(to_name)?);
            // SAFETY: valid dirfds and names.
            check(unsafe {
                libc::renameat(
                    self.fd.as_raw_fd(),
                    a.as_ptr(),
                    to.fd.as_raw_fd(),
                    b.as_ptr(),
                )
            })
            .map(|_| ())
        }

        /// Another handle on the same directory.
        pub(crate) fn try_clone(&self) -> io::Result<SafeDir> {
            Ok(SafeDir {
                fd: self.fd.try_clone()?,
            })
        }

        /// Flushes the directory's entries to disk.
        pub(crate) fn sync(&self) {
            // SAFETY: valid fd.
            let _ = unsafe { libc::fsync(self.fd.as_raw_fd()) };
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use super::*;
    use std::fs;

    impl SafeDir {
        pub(crate) fn open_root(path: &Path) -> io::Result<SafeDir> {
            if !fs::metadata(path)?.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "not a directory",
                ));
            }
            Ok(SafeDir {
                path: path.to_path_buf(),
            })
        }

        pub(crate) fn open_child(&self, name: &str, create: bool) -> io::Result<Option<SafeDir>> {
            let p = self.path.join(name);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_dir() => Ok(Some(SafeDir { path: p })),
                Ok(_) => Err(io::Error::new(io::ErrorKind::NotADirectory, name)),
                Err(_) if create => {
                    fs::create_dir(&p)?;
                    Ok(Some(SafeDir { path: p }))
                }
                Err(_) => Ok(None),
            }
        }

        pub(crate) fn kind(&self, name: &str) -> io::Result<Option<Kind>> {
            match fs::symlink_metadata(self.path.join(name)) {
                Ok(m) if m.file_type().is_symlink() => Ok(Some(Kind::Symlink)),
                Ok(m) if m.is_dir() => Ok(Some(Kind::Dir)),
                Ok(m) if m.is_file() => Ok(Some(Kind::File)),
                Ok(_) => Ok(Some(Kind::Other)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }

        pub(crate) fn open_file(&self, name: &str) -> io::Result<File> {
            if self.kind(name)? == Some(Kind::Symlink) {
                return Err(io::Error::other("symlink"));
            }
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.path.join(name))
        }

        pub(crate) fn read_file(&self, name: &str) -> io::Result<File> {
            if self.kind(name)? == Some(Kind::Symlink) {
                return Err(io::Error::other("symlink"));
            }
            File::open(self.path.join(name))
        }

        pub(crate) fn remove(&self, name: &str) -> io::Result<()> {
            fs::remove_file(self.path.join(name))
        }

        pub(crate) fn link_to(&self, name: &str, to: &SafeDir, to_name: &str) -> io::Result<()> {
            fs::hard_link(self.path.join(name), to.path.join(to_name))
        }

        pub(crate) fn rename_to(&self, name: &str, to: &SafeDir, to_name: &str) -> io::Result<()> {
            fs::rename(self.path.join(name), to.path.join(to_name))
        }

        pub(crate) fn try_clone(&self) -> io::Result<SafeDir> {
            Ok(SafeDir {
                path: self.path.clone(),
            })
        }

        pub(crate) fn sync(&self) {}
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn never_follows_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("evil")).unwrap();
        std::fs::write(outside.path().join("target"), b"secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("target"), root.path().join("flink"))
            .unwrap();
        std::fs::write(root.path().join("plain"), b"x").unwrap();
        let d = SafeDir::open_root(root.path()).unwrap();

        assert_eq!(
            d.open_child("evil", true).unwrap_err().kind(),
            io::ErrorKind::NotADirectory
        );
        assert_eq!(
            d.open_child("plain", true).unwrap_err().kind(),
            io::ErrorKind::NotADirectory
        );
        assert!(d.open_child("missing", false).unwrap().is_none());
        let sub = d.open_child("sub", true).unwrap().unwrap();
        assert_eq!(d.kind("sub").unwrap(), Some(Kind::Dir));
        assert_eq!(d.kind("evil").unwrap(), Some(Kind::Symlink));
        assert_eq!(d.kind("flink").unwrap(), Some(Kind::Symlink));
        assert_eq!(d.kind("plain").unwrap(), Some(Kind::File));
        assert_eq!(d.kind("none").unwrap(), None);
        assert!(d.open_file("flink").is_err());
        assert!(d.read_file("flink").is_err());

        let mut f = sub.open_file("a").unwrap();
        f.write_all(b"data").unwrap();
        sub.link_to("a", &d, "b").unwrap();
        assert!(sub.link_to("a", &d, "b").is_err(), "link must not replace");
        assert!(sub.link_to("a", &d, "flink").is_err());
        sub.rename_to("a", &d, "plain").unwrap();
        let mut s = String::new();
        d.read_file("plain")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "data");
        d.remove("flink").unwrap();
        assert_eq!(
            std::fs::read(outside.path().join("target")).unwrap(),
            b"secret"
        );
        d.sync();
    }
}
