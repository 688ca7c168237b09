//! The one place this crate touches the system: reading the mount table and asking sysfs which
//! block devices sit on loop devices. Everything else is pure.

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hvisd_protocol::mountinfo::{self, DeviceNumber, MountInfoError};

use crate::mount::Mount;

/// The mount table of this process's mount namespace.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Largest mount table read (a namespace holds at most `fs.mount-max`, 100 000 by default,
/// mounts; at a few hundred bytes each that is well under this).
pub const MAX_MOUNTINFO_BYTES: u64 = 64 << 20;

/// How deep the sysfs walk follows `slaves/` (device-mapper on md on loop is three).
const MAX_STACK_DEPTH: u32 = 8;

/// How many `slaves/` entries of one device the walk looks at.
const MAX_SLAVES: usize = 64;

/// Why the mount table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// Opening or reading it failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// It is larger than [`MAX_MOUNTINFO_BYTES`].
    #[error("{path} is larger than {MAX_MOUNTINFO_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A line is malformed.
    #[error("{path}: {error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line and what is wrong with it.
        error: MountInfoError,
    },
}

/// Reads `/proc/self/mountinfo` and marks loop-backed mounts from `/sys`.
pub fn read_mounts() -> Result<Vec<Mount>, SystemError> {
    read_mounts_from(Path::new(MOUNTINFO), Path::new("/sys"))
}

/// Reads a mountinfo file and marks loop-backed mounts from the sysfs tree at `sysfs`.
pub fn read_mounts_from(mountinfo_path: &Path, sysfs: &Path) -> Result<Vec<Mount>, SystemError> {
    let read_err = |source| SystemError::Read {
        path: mountinfo_path.to_owned(),
        source,
    };
    let mut text = Vec::new();
    File::open(mountinfo_path)
        .map_err(read_err)?
        .take(MAX_MOUNTINFO_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_MOUNTINFO_BYTES {
        return Err(SystemError::TooLarge {
            path: mountinfo_path.to_owned(),
        });
    }
    let infos = mountinfo::parse(&text).map_err(|error| SystemError::Parse {
        path: mountinfo_path.to_owned(),
        error,
    })?;
    // Bind mounts repeat a device many times: ask sysfs once per device.
    let mut loop_devices = std::collections::HashMap::new();
    Ok(infos
        .iter()
        .map(|info| {
            let mut m = Mount::from_mountinfo(info);
            // The C daemon stat()s the source path to learn its device. hvisd does not: a FUSE
            // user chooses the source ("/dev/shm/me/fuse/x" is a path under /dev/) and a stat
            // that enters a FUSE mount waits for a daemon that need never answer. mountinfo's
            // device number is the block device's for every block file system except btrfs,
            // whose direct loop devices the source name (/dev/loopN) gives away.
            if !m.loop_backed && m.source.as_bytes().starts_with(b"/dev/") {
                m.loop_backed = *loop_devices
                    .entry(m.device)
                    .or_insert_with(|| loop_backed_in_sysfs(m.device, sysfs));
            }
            m
        })
        .collect())
}

/// Whether the block device `device` sits on a loop device, as `hv_vss_daemon`'s `is_dev_loop`
/// tells it: `/sys/dev/block/M:m/loop` exists, or one of its `slaves/` does so, recursively.
/// hvisd also looks at the whole disk of a partition (`loop0p1` has no `loop/` of its own, so
/// the C daemon freezes partitions of loop devices).
pub fn loop_backed_in_sysfs(device: DeviceNumber, sysfs: &Path) -> bool {
    let dir = sysfs.join(format!("dev/block/{device}"));
    is_loop_dir(&dir, MAX_STACK_DEPTH)
}

fn is_loop_dir(dir: &Path, depth: u32) -> bool {
    if dir.join("loop").is_dir() {
        return true;
    }
    if depth == 0 {
        return false;
    }
    // A partition's directory sits inside its disk's: "..", resolved by the kernel after the
    // /sys/dev/block symlink, is the disk.
    if dir.join("partition").is_file() && is_loop_dir(&dir.join(".."), depth - 1) {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(dir.join("slaves")) else {
        return false;
    };
    entries
        .take(MAX_SLAVES)
        .flatten()
        .any(|e| is_loop_dir(&e.path(), depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn dev(major: u32, minor: u32) -> DeviceNumber {
        DeviceNumber { major, minor }
    }

    /// A sysfs with loop0 (7:0) and its partition loop0p1 (259:0), sda (8:0), dm-0 (253:0) on
    /// loop1 (7:1) and dm-1 (253:1) on sda.
    fn fake_sysfs() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let devices = root.path().join("devices/virtual/block");
        let mk = |p: &str| fs::create_dir_all(devices.join(p)).unwrap();
        mk("loop0/loop");
        mk("loop0/loop0p1");
        fs::write(devices.join("loop0/loop0p1/partition"), "1\n").unwrap();
        mk("loop1/loop");
        mk("sda");
        mk("dm-0/slaves");
        mk("dm-1/slaves");
        symlink(devices.join("loop1"), devices.join("dm-0/slaves/loop1")).unwrap();
        symlink(devices.join("sda"), devices.join("dm-1/slaves/sda")).unwrap();
        let block = root.path().join("dev/block");
        fs::create_dir_all(&block).unwrap();
        for (name, target) in [
            ("7:0", "loop0"),
            ("259:0", "loop0/loop0p1"),
            ("7:1", "loop1"),
            ("8:0", "sda"),
            ("253:0", "dm-0"),
            ("253:1", "dm-1"),
        ] {
            symlink(devices.join(target), block.join(name)).unwrap();
        }
        root
    }

    #[test]
    fn loop_devices_and_what_is_stacked_on_them_are_loop_backed() {
        let sysfs = fake_sysfs();
        let s = sysfs.path();
        assert!(loop_backed_in_sysfs(dev(7, 0), s));
        assert!(
            loop_backed_in_sysfs(dev(259, 0), s),
            "partition of a loop device"
        );
        assert!(
            loop_backed_in_sysfs(dev(253, 0), s),
            "device-mapper on a loop device"
        );
        assert!(!loop_backed_in_sysfs(dev(8, 0), s));
        assert!(!loop_backed_in_sysfs(dev(253, 1), s));
        assert!(!loop_backed_in_sysfs(dev(9, 9), s), "unknown device");
    }

    #[test]
    fn mount_table_is_read_and_marked_from_sysfs() {
        let sysfs = fake_sysfs();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        fs::write(
            &path,
            "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             60 27 253:0 / /img rw - ext4 /dev/mapper/x rw\n",
        )
        .unwrap();
        let mounts = read_mounts_from(&path, sysfs.path()).unwrap();
        assert_eq!(mounts.len(), 2);
        assert!(!mounts[0].loop_backed);
        assert!(mounts[1].loop_backed);
    }

    #[test]
    fn malformed_table_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        fs::write(&path, "27 1 254:0 / / rw - ext4 /dev/vda rw\nbroken\n").unwrap();
        let err = read_mounts_from(&path, dir.path()).unwrap_err().to_string();
        assert!(err.contains("mountinfo line 2"), "{err}");
        assert!(err.contains(&*path.to_string_lossy()), "{err}");
    }

    #[test]
    fn this_machines_mount_table_reads() {
        let mounts = read_mounts().unwrap();
        assert!(mounts.iter().any(Mount::is_root));
    }
}
