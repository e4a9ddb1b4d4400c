//! Opening files inside a blog's folder, and never outside it.
//!
//! Blog folders are synced from users' Dropbox and Git, so a file may be a
//! symbolic link to anywhere, and may be swapped between a check and a use.
//! The check here is made on the file actually opened: after `open`, the
//! kernel's own name for the descriptor (`/proc/self/fd/N`) must lie inside
//! the blog's folder, and the descriptor must be a regular file. Links that
//! stay inside the folder are followed.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::domain::{BlogId, BlogPath};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no such file")]
    NotFound,
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// The blogs directory, canonicalised once at start.
#[derive(Debug, Clone)]
pub struct BlogsDir {
    root: PathBuf,
}

impl BlogsDir {
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(BlogsDir { root: dir.canonicalize()? })
    }

    pub fn blog_dir(&self, blog: &str) -> PathBuf {
        self.root.join(blog)
    }

    /// The on-disk name of a blog path (not checked; see [`BlogsDir::open`]).
    pub fn file_path(&self, blog: &str, path: &BlogPath) -> PathBuf {
        let mut p = self.blog_dir(blog);
        for seg in path.segments() {
            p.push(seg);
        }
        p
    }

    /// Opens a blog's file for reading if, once open, it is a regular file
    /// inside the blog's folder. Hidden paths are refused.
    pub fn open(&self, blog: &BlogId, path: &BlogPath) -> Result<(File, Metadata), OpenError> {
        let blog = blog.as_str();
        if path.is_hidden() {
            return Err(OpenError::Refused("hidden file"));
        }
        let full = self.file_path(blog, path);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            // A FIFO would block the read forever; refuse to wait on one.
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(&full)
        {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                return Err(OpenError::NotFound)
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(OpenError::Refused("symbolic link loop")),
            // Whatever a sync tool can put in a folder is the reader's 404,
            // not the server's 500: no permission, a socket (ENXIO), a device
            // without a driver (ENODEV), a name too long for the filesystem.
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    || matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV | libc::ENAMETOOLONG)) =>
            {
                return Err(OpenError::NotFound)
            }
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            // Directories are never listed; devices and FIFOs never read.
            return Err(OpenError::NotFound);
        }
        // A hard link is a second name for an inode that may live anywhere on
        // the same filesystem, outside the blog included; the name the kernel
        // reports for the descriptor cannot tell which name is the real one.
        // Nothing of the service links into blog folders, so refuse them all.
        if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
            return Err(OpenError::Refused("a hard link (more than one name for the file)"));
        }
        if !self.is_inside(blog, &file)? {
            return Err(OpenError::Refused("resolves outside the blog's folder"));
        }
        Ok((file, meta))
    }

    fn is_inside(&self, blog: &str, file: &File) -> io::Result<bool> {
        let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let dir = self.blog_dir(blog);
        if real.starts_with(&dir) && real != dir {
            return Ok(true);
        }
        // The blog's folder may itself be a link (to another disk, say): compare
        // against where it really is. Rare, so paid only here.
        match dir.canonicalize() {
            Ok(real_dir) => Ok(real.starts_with(&real_dir) && real != real_dir),
            Err(_) => Ok(false),
        }
    }
}
