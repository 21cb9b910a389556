//! The boot chain on the ESP: an initramfs (our `slipway-initrd` plus the
//! kernel modules it needs) and a Unified Kernel Image, which is systemd's
//! EFI stub with the kernel, initramfs, command line and os-release added
//! as PE sections. Written in Rust so the bytes are ours and reproducible.

use super::cpio::Cpio;
use crate::fsio;
use slipway_init::layout;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error(transparent)]
    Io(#[from] crate::fsio::PathError),
    #[error("the root tree has {0} kernels under usr/lib/modules; expected exactly one")]
    Kernels(usize),
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    NoModule(String),
    #[error("EFI stub {path}: {problem}")]
    Stub { path: PathBuf, problem: String },
}

/// The single kernel version installed in `root`.
pub fn kernel_version(root: &Path) -> Result<String, UkiError> {
    let dir = root.join("usr/lib/modules");
    let versions: Vec<String> = fs::read_dir(&dir)
        .map_err(fsio::at("listing", &dir))?
        .flatten()
        .filter(|e| e.path().join("modules.dep").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(UkiError::Kernels(versions.len())),
    }
}

fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Module files (relative to the kernel's module directory) for `wanted`
/// and everything they depend on, dependencies first. Built-in modules
/// need nothing.
pub fn resolve_modules(
    modules_dep: &str,
    builtin: &str,
    wanted: &[String],
) -> Result<Vec<String>, UkiError> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        let requires = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module_name(file), (file.to_owned(), requires));
    }
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((file, requires)) = deps.get(name) {
            for r in requires {
                visit(&module_name(r), deps, seen, order);
            }
            order.push(file.clone());
        }
    }
    for w in wanted {
        let name = module_name(w);
        if !deps.contains_key(&name) {
            if builtin.contains(&name) {
                continue;
            }
            return Err(UkiError::NoModule(w.clone()));
        }
        visit(&name, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

/// Builds the initramfs: `/init`, the device nodes it needs before devtmpfs,
/// and the modules in load order.
pub fn initramfs(
    root: &Path,
    kver: &str,
    init: &[u8],
    modules: &[String],
    mtime: u64,
) -> Result<Vec<u8>, UkiError> {
    let moddir = root.join("usr/lib/modules").join(kver);
    let read = |p: &Path| fs::read(p).map_err(fsio::at("reading", p));
    let dep_path = moddir.join("modules.dep");
    let dep = fs::read_to_string(&dep_path).map_err(fsio::at("reading", &dep_path))?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let files = resolve_modules(&dep, &builtin, modules)?;

    let mut c = Cpio::new(mtime);
    for d in ["dev", "proc", "sys", "sysroot", "run", "lib", "lib/modules"] {
        c.dir(d);
    }
    c.char_device("dev/console", 0o600, 5, 1);
    c.char_device("dev/null", 0o666, 1, 3);
    c.file("init", 0o755, init);
    let mut order = String::new();
    for f in &files {
        let name = f.rsplit('/').next().unwrap_or(f);
        c.file(
            &format!("lib/modules/{name}"),
            0o644,
            &read(&moddir.join(f))?,
        );
        order.push_str(name);
        order.push('\n');
    }
    let dir = layout::INITRD_MODULE_DIR.trim_start_matches('/');
    c.file(
        &format!("{dir}/{}", layout::INITRD_LOAD_ORDER),
        0o644,
        order.as_bytes(),
    );
    Ok(c.finish())
}

fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes([b[o], b[o + 1]]) as usize
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Appends `sections` (name, contents) to the PE image `stub`.
pub fn add_sections(
    stub: &[u8],
    sections: &[(&str, &[u8])],
    stub_path: &Path,
) -> Result<Vec<u8>, UkiError> {
    let bad = |problem: &str| UkiError::Stub {
        path: stub_path.to_owned(),
        problem: problem.to_owned(),
    };
    if stub.len() < 0x40 || &stub[..2] != b"MZ" {
        return Err(bad("not a PE image (no MZ header)"));
    }
    let pe = u32_at(stub, 0x3c) as usize;
    if stub.len() < pe + 24 || &stub[pe..pe + 4] != b"PE\0\0" {
        return Err(bad("no PE signature"));
    }
    let coff = pe + 4;
    let nsections = u16_at(stub, coff + 2);
    let opt = coff + 20;
    let opt_len = u16_at(stub, coff + 16);
    if stub.len() < opt + opt_len || u16_at(stub, opt) != 0x20b {
        return Err(bad("not a PE32+ image"));
    }
    let section_align = u32_at(stub, opt + 32) as u64;
    let file_align = u32_at(stub, opt + 36) as u64;
    let header_size = u32_at(stub, opt + 60) as usize;
    let table = opt + opt_len;
    if table + 40 * (nsections + sections.len()) > header_size {
        return Err(bad("no room in the PE header for more sections"));
    }

    let mut out = stub.to_vec();
    let mut next_va = 0u64;
    let mut file_end = out.len() as u64;
    for i in 0..nsections {
        let s = table + 40 * i;
        let va = u32_at(stub, s + 12) as u64;
        let vsize = u32_at(stub, s + 8) as u64;
        let raw_end = u32_at(stub, s + 20) as u64 + u32_at(stub, s + 16) as u64;
        next_va = next_va.max(va + vsize);
        file_end = file_end.max(raw_end);
    }
    let mut next_va = next_va.next_multiple_of(section_align);
    let mut raw_ptr = file_end.next_multiple_of(file_align);
    let mut init_data = u64::from(u32_at(stub, opt + 8));
    for (i, (name, data)) in sections.iter().enumerate() {
        let raw_size = (data.len() as u64).next_multiple_of(file_align);
        let fits = |v: u64| u32::try_from(v).map_err(|_| bad("image larger than 4 GiB"));
        let s = table + 40 * (nsections + i);
        let mut header = [0u8; 40];
        let n = name.as_bytes();
        header[..n.len().min(8)].copy_from_slice(&n[..n.len().min(8)]);
        put_u32(&mut header, 8, fits(data.len() as u64)?);
        put_u32(&mut header, 12, fits(next_va)?);
        put_u32(&mut header, 16, fits(raw_size)?);
        put_u32(&mut header, 20, fits(raw_ptr)?);
        put_u32(&mut header, 36, 0x4000_0040); // initialised data, readable
        out[s..s + 40].copy_from_slice(&header);
        out.resize(fits(raw_ptr)? as usize, 0);
        out.extend_from_slice(data);
        out.resize(fits(raw_ptr + raw_size)? as usize, 0);
        raw_ptr += raw_size;
        init_data += raw_size;
        next_va = (next_va + data.len() as u64).next_multiple_of(section_align);
    }
    let total = nsections + sections.len();
    let total = u16::try_from(total).map_err(|_| bad("too many sections"))?;
    out[coff + 2..coff + 4].copy_from_slice(&total.to_le_bytes());
    put_u32(
        &mut out,
        opt + 8,
        u32::try_from(init_data).map_err(|_| bad("image too large"))?,
    );
    put_u32(
        &mut out,
        opt + 56,
        u32::try_from(next_va).map_err(|_| bad("image too large"))?,
    );
    put_u32(&mut out, opt + 64, 0); // checksum: unused by UEFI
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/md/dm-mod.ko.xz:\nkernel/drivers/md/dm-bufio.ko.xz: kernel/drivers/md/dm-mod.ko.xz\nkernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/drivers/md/dm-mod.ko.xz\nkernel/fs/erofs/erofs.ko.xz:\n";

    #[test]
    fn modules_come_with_dependencies_first() {
        let got = resolve_modules(
            DEP,
            "kernel/fs/ext4/ext4.ko\n",
            &["dm-verity".into(), "erofs".into(), "ext4".into()],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "kernel/drivers/md/dm-mod.ko.xz",
                "kernel/drivers/md/dm-bufio.ko.xz",
                "kernel/drivers/md/dm-verity.ko.xz",
                "kernel/fs/erofs/erofs.ko.xz"
            ]
        );
        let err = resolve_modules(DEP, "", &["nosuch".into()]).unwrap_err();
        assert!(err.to_string().contains("nosuch"));
    }

    /// A minimal PE32+ image with one section and room for three more.
    fn tiny_pe() -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[..2].copy_from_slice(b"MZ");
        put_u32(&mut b, 0x3c, 0x80);
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        b[coff + 2] = 1;
        b[coff + 16] = 0xf0; // optional header size
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        put_u32(&mut b, opt + 32, 0x1000);
        put_u32(&mut b, opt + 36, 0x200);
        put_u32(&mut b, opt + 56, 0x2000);
        put_u32(&mut b, opt + 60, 0x400);
        let s = opt + 0xf0;
        b[s..s + 5].copy_from_slice(b".text");
        put_u32(&mut b, s + 8, 0x10);
        put_u32(&mut b, s + 12, 0x1000);
        put_u32(&mut b, s + 16, 0x200);
        put_u32(&mut b, s + 20, 0x200);
        b
    }

    #[test]
    fn sections_are_appended_aligned() {
        let pe = tiny_pe();
        let out = add_sections(
            &pe,
            &[(".cmdline", b"ro quiet"), (".linux", &[7u8; 5000])],
            Path::new("stub"),
        )
        .unwrap();
        let coff = 0x84;
        assert_eq!(u16_at(&out, coff + 2), 3);
        let table = coff + 20 + 0xf0;
        let cmd = table + 40;
        assert_eq!(&out[cmd..cmd + 8], b".cmdline");
        assert_eq!(u32_at(&out, cmd + 12), 0x2000);
        let ptr = u32_at(&out, cmd + 20) as usize;
        assert_eq!(&out[ptr..ptr + 8], b"ro quiet");
        let linux = table + 80;
        assert_eq!(u32_at(&out, linux + 12), 0x3000);
        assert_eq!(u32_at(&out, coff + 20 + 56), 0x5000);
        assert_eq!(out.len() % 0x200, 0);
    }

    #[test]
    fn a_non_pe_stub_is_refused() {
        assert!(add_sections(b"ELF", &[], Path::new("x")).is_err());
    }
}
