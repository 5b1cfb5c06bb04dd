//! A writer for the "newc" cpio format the kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst): uncompressed, every entry a
//! 110-byte ASCII header, the NUL-terminated name and the data, each padded to 4 bytes.

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct Cpio<W: Write> {
    out: W,
    /// Bytes written so far (for the padding).
    offset: u64,
    next_ino: u32,
    /// Directories already written, without a leading '/'.
    dirs: BTreeSet<String>,
    /// Every path written, to refuse duplicates (the kernel would silently keep the last).
    paths: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            offset: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
            paths: BTreeSet::new(),
        }
    }

    /// A directory and its missing parents (mode 0755).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.dir_mode(path, 0o755)
    }

    /// A directory with `mode`, after its missing parents (0755).
    pub fn dir_mode(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = path.trim_matches('/').to_string();
        if path.is_empty() || self.dirs.contains(&path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(&path, S_IFDIR | mode, 2, 0, &[])?;
        self.dirs.insert(path);
        Ok(())
    }

    /// A regular file, after its missing parent directories.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = self.parents(path)?;
        self.entry(&path, S_IFREG | (mode & 0o7777), 1, 0, data)
    }

    /// A symbolic link to `target`, after its missing parent directories.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = self.parents(path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = self.parents(path)?;
        self.entry(&path, S_IFCHR | mode, 1, (major << 16) | minor, &[])
    }

    /// Whether `path` has been written already.
    pub fn contains(&self, path: &str) -> bool {
        let p = path.trim_matches('/');
        self.paths.contains(p) || self.dirs.contains(p)
    }

    /// Write the trailer and return the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<String> {
        let path = path.trim_matches('/').to_string();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(path)
    }

    /// `rdev` packs major << 16 | minor.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        data: &[u8],
    ) -> io::Result<()> {
        if name != "TRAILER!!!" && !self.paths.insert(name.to_string()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("initramfs: {name} written twice"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("initramfs: {name} is larger than newc's 4 GiB limit"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {devmajor:08x}{devminor:08x}{rdevmajor:08x}{rdevminor:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            devmajor = 0,
            devminor = 0,
            rdevmajor = rdev >> 16,
            rdevminor = rdev & 0xffff,
            namesize = name.len() + 1,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_newc() {
        let mut c = Cpio::new(Vec::new());
        c.file("bin/x", 0o755, b"hello").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        let out = c.finish().unwrap();
        let text = String::from_utf8_lossy(&out);
        // bin (dir), bin/x, bin/sh, trailer; each header starts 4-aligned.
        let starts: Vec<usize> = text.match_indices("070701").map(|(i, _)| i).collect();
        assert_eq!(starts.len(), 4);
        assert!(starts.iter().all(|i| i % 4 == 0));
        assert_eq!(&out[starts[0] + 110..starts[0] + 114], b"bin\0");
        // bin/x: mode 0100755, size 5
        let h = &text[starts[1]..starts[1] + 110];
        assert_eq!(&h[14..22], "000081ed");
        assert_eq!(&h[54..62], "00000005");
        assert!(text.contains("bin/x\0hello\0\0\0"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn duplicates_are_refused() {
        let mut c = Cpio::new(Vec::new());
        c.file("a", 0o644, b"").unwrap();
        assert!(c.file("a", 0o644, b"").is_err());
    }
}
