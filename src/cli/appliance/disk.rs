//! Choosing the data disk and deciding whether it may be formatted.
//!
//! The one rule that matters: a disk that holds anything is never formatted. A
//! disk is formatted only when its first and last MiB read as zeros (a new
//! virtual disk, or one wiped on purpose); a disk with an ext2/3/4 file system is
//! mounted; anything else is refused with a message that says why.

use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of each end of a disk is read to decide whether it is blank.
pub const PROBE_BYTES: usize = 1 << 20;

/// A whole disk as `/sys/block` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// The kernel's name (`vdb`); the device is `/dev/<name>`.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Whether the kernel found partitions on it.
    pub partitioned: bool,
    /// Whether it is read-only.
    pub read_only: bool,
}

/// The disk `data_disk = "auto"` picks: the largest writable virtio disk (`vd*`)
/// without partitions (the boot disk has them), the first by name among equals.
pub fn choose_data_disk(devices: &[BlockDevice]) -> Option<&BlockDevice> {
    devices
        .iter()
        .filter(|device| {
            device.name.starts_with("vd")
                && !device.partitioned
                && !device.read_only
                && device.size > 0
        })
        .min_by(|a, b| b.size.cmp(&a.size).then_with(|| a.name.cmp(&b.name)))
}

/// What the ends of a disk hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskContents {
    /// Only zeros: safe to format.
    Blank,
    /// An ext2, ext3 or ext4 file system: mount it.
    Ext,
    /// Something else (a partition table, another file system, encrypted data):
    /// never formatted.
    Other(&'static str),
}

/// Classifies a disk from its first and last [`PROBE_BYTES`] (fewer for a small
/// disk).
pub fn classify(head: &[u8], tail: &[u8]) -> DiskContents {
    // The ext superblock starts at byte 1024; its magic 0xEF53 is at offset 56.
    if head.get(1080..1082) == Some(&[0x53, 0xEF]) {
        return DiskContents::Ext;
    }
    if head.get(512..520) == Some(b"EFI PART") {
        return DiskContents::Other("a GPT partition table");
    }
    if head.get(510..512) == Some(&[0x55, 0xAA]) {
        return DiskContents::Other("a partition table or boot sector");
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        return DiskContents::Other("a LUKS encrypted volume");
    }
    if head.starts_with(b"XFSB") {
        return DiskContents::Other("an XFS file system");
    }
    if head.get(0x10040..0x10048) == Some(b"_BHRfS_M") {
        return DiskContents::Other("a btrfs file system");
    }
    if head.iter().chain(tail).all(|&byte| byte == 0) {
        return DiskContents::Blank;
    }
    DiskContents::Other("data of an unknown kind")
}

/// Lists the whole disks under `sys_block` (`/sys/block`).
pub fn scan(sys_block: &Path) -> Result<Vec<BlockDevice>> {
    let mut devices = Vec::new();
    let entries =
        fs::read_dir(sys_block).with_context(|| format!("cannot list {}", sys_block.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", sys_block.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let number = |file: &str| -> u64 {
            fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0)
        };
        // A partition appears as a subdirectory named after the disk (vda1).
        let partitioned = fs::read_dir(&dir)
            .map(|children| {
                children.flatten().any(|child| {
                    let child = child.file_name().to_string_lossy().into_owned();
                    child.starts_with(&name) && child.len() > name.len()
                })
            })
            .unwrap_or(false);
        devices.push(BlockDevice {
            size: number("size").saturating_mul(512),
            read_only: number("ro") != 0,
            partitioned,
            name,
        });
    }
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(devices)
}

/// Reads both ends of `device` and classifies it.
pub fn probe(device: &Path) -> Result<DiskContents> {
    let context = || format!("cannot read {}", device.display());
    let mut file = File::open(device).with_context(context)?;
    let size = file.seek(SeekFrom::End(0)).with_context(context)?;
    if size == 0 {
        bail!("{} is empty (size 0)", device.display());
    }
    let probe = (PROBE_BYTES as u64).min(size);
    let mut head = vec![0; probe as usize];
    file.seek(SeekFrom::Start(0)).with_context(context)?;
    file.read_exact(&mut head).with_context(context)?;
    let mut tail = vec![0; probe as usize];
    file.seek(SeekFrom::Start(size - probe))
        .with_context(context)?;
    file.read_exact(&mut tail).with_context(context)?;
    Ok(classify(&head, &tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, gib: u64, partitioned: bool) -> BlockDevice {
        BlockDevice {
            name: name.to_owned(),
            size: gib << 30,
            partitioned,
            read_only: false,
        }
    }

    #[test]
    fn auto_picks_the_largest_unpartitioned_virtio_disk() {
        let devices = [
            disk("loop0", 100, false),
            disk("sda", 50, false),
            disk("vda", 90, true),
            disk("vdb", 2, false),
            disk("vdc", 8, false),
            disk("vdd", 8, false),
        ];
        assert_eq!(choose_data_disk(&devices).unwrap().name, "vdc");
    }

    #[test]
    fn auto_skips_read_only_and_empty_disks_and_may_find_none() {
        let mut read_only = disk("vdb", 4, false);
        read_only.read_only = true;
        let devices = [disk("vda", 1, true), read_only, disk("vdc", 0, false)];
        assert_eq!(choose_data_disk(&devices), None);
        assert_eq!(choose_data_disk(&[]), None);
    }

    #[test]
    fn only_an_all_zero_disk_is_blank() {
        let zeros = vec![0u8; 4096];
        assert_eq!(classify(&zeros, &zeros), DiskContents::Blank);
        let mut tail = zeros.clone();
        tail[100] = 1;
        assert!(matches!(classify(&zeros, &tail), DiskContents::Other(_)));
    }

    #[test]
    fn known_signatures_are_recognised() {
        let mut ext = vec![0u8; 4096];
        ext[1080] = 0x53;
        ext[1081] = 0xEF;
        assert_eq!(classify(&ext, &[]), DiskContents::Ext);
        let mut gpt = vec![0u8; 4096];
        gpt[510] = 0x55;
        gpt[511] = 0xAA;
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert!(matches!(classify(&gpt, &[]), DiskContents::Other(what) if what.contains("GPT")));
        let mut luks = vec![0u8; 4096];
        luks[..6].copy_from_slice(b"LUKS\xba\xbe");
        assert!(matches!(classify(&luks, &[]), DiskContents::Other(what) if what.contains("LUKS")));
    }

    #[test]
    fn probe_reads_a_file_as_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let file = File::create(&path).unwrap();
        file.set_len(3 << 20).unwrap();
        assert_eq!(probe(&path).unwrap(), DiskContents::Blank);
        let mut bytes = vec![0u8; 2048];
        bytes[1080] = 0x53;
        bytes[1081] = 0xEF;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(probe(&path).unwrap(), DiskContents::Ext);
    }

    #[test]
    fn scan_reads_sysfs_layout() {
        let dir = tempfile::tempdir().unwrap();
        for (name, sectors, part) in [("vda", "2048", true), ("vdb", "4194304", false)] {
            let disk = dir.path().join(name);
            fs::create_dir(&disk).unwrap();
            fs::write(disk.join("size"), format!("{sectors}\n")).unwrap();
            fs::write(disk.join("ro"), "0\n").unwrap();
            if part {
                fs::create_dir(disk.join(format!("{name}1"))).unwrap();
            }
        }
        let devices = scan(dir.path()).unwrap();
        assert_eq!(devices.len(), 2);
        assert!(devices[0].partitioned);
        assert_eq!(devices[1].size, 2 << 30);
        assert_eq!(choose_data_disk(&devices).unwrap().name, "vdb");
    }
}
