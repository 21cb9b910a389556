//! A newc cpio writer for the initramfs: fixed inode numbers, owners and
//! times, so the same inputs give the same bytes.

#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    mtime: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub fn new(mtime: u64) -> Self {
        Self {
            out: Vec::new(),
            ino: 0,
            mtime: u32::try_from(mtime).unwrap_or(u32::MAX),
        }
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "newc's sizes are 32-bit; the initramfs's members (the init binary, kernel modules, names) are far below 4 GiB"
    )]
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            self.mtime,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name_len as u32,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, data, (0, 0));
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | perm, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        // The kernel reads initramfs in 512-byte multiples; pad like cpio(1).
        while self.out.len() % 512 != 0 {
            self.out.push(0);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_have_newc_headers_and_padding() {
        let mut c = Cpio::new(1);
        c.dir("dev");
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!"));
        // mode of the file entry: 0o100755 = 0x81ed
        assert!(text.contains("000081ed"));
    }

    #[test]
    fn same_input_same_bytes() {
        let build = || {
            let mut c = Cpio::new(42);
            c.file("a", 0o644, b"x");
            c.finish()
        };
        assert_eq!(build(), build());
    }
}
