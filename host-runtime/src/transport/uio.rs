//! The uio transport: VMBus channels owned in user space through `uio_hv_generic`.
//!
//! An operator binds a device to `uio_hv_generic` (see README); the kernel then exposes, under
//! `/sys/bus/vmbus/devices/<instance-id>/`: `class_id` (`{guid}`), `channels/<relid>/` (one per
//! channel, with a `ring` attribute), and `uio/uioN/` whose `maps/map0` is both rings, guest-to-host
//! first (the same order as the shm `ring` file). `/dev/uioN` is mapped at offset 0 for map 0; a 4-byte
//! read blocks until the host interrupts, and a 4-byte write signals the host (and re-enables the
//! channel's interrupt), as `tools/hv/hv_fcopy_uio_daemon` does.

use crate::channel::{Channel, RingPair, Role};
use crate::doorbell::{Doorbell, DoorbellKind};
use hvisd_protocol::guid::Guid;
use hvisd_protocol::uio_sysfs;
use hvisd_ring::{RingError, SharedMapping};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where the kernel lists VMBus devices.
pub const DEFAULT_SYSFS_DEVICES: &str = "/sys/bus/vmbus/devices";
/// Where uio device nodes live.
pub const DEFAULT_DEV_DIR: &str = "/dev";

/// A VMBus device bound to `uio_hv_generic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioDevice {
    /// The device's instance id (its sysfs directory name).
    pub instance_id: Guid,
    /// The interface type.
    pub class_id: Guid,
    /// The primary channel's relid (the lowest entry under `channels/`).
    pub relid: u32,
    /// `uioN`.
    pub uio_name: String,
    /// Bytes of one direction's ring (half of map 0).
    pub ring_size: usize,
    /// `/dev/uioN`.
    pub dev_path: PathBuf,
}

/// Why a uio device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UioError {
    /// A sysfs file is absent or unreadable.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A sysfs file has content we do not understand.
    #[error("{}: {why} (found {found:?})", path.display())]
    Malformed {
        /// The path.
        path: PathBuf,
        /// What was expected.
        why: &'static str,
        /// What was there, cut to 80 characters.
        found: String,
    },
    /// The ring memory could not be mapped or is unusable.
    #[error("{dev}: {source}")]
    Ring {
        /// `/dev/uioN`.
        dev: PathBuf,
        /// The ring error.
        source: RingError,
    },
}

/// Reads a sysfs attribute (at most 4 KiB, invalid UTF-8 replaced).
fn read_small(path: &Path) -> Result<String, UioError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut bytes))
        .map_err(|source| UioError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}

/// The UTF-8 entry names of a directory (at most 1024).
fn read_names(dir: &Path) -> Result<Vec<String>, UioError> {
    Ok(std::fs::read_dir(dir)
        .map_err(|source| UioError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .take(1024)
        .collect())
}

fn malformed(path: &Path, why: &'static str, found: &str) -> UioError {
    UioError::Malformed {
        path: path.to_owned(),
        why,
        found: found.chars().take(80).collect(),
    }
}

/// Most device directories one discovery looks at.
pub const MAX_DEVICES: usize = 1024;

/// What one discovery found.
#[derive(Debug, Default)]
pub struct UioScan {
    /// Devices, or (identity, problem) for broken ones, in identity order.
    pub offers: Vec<Result<UioDevice, (String, UioError)>>,
    /// Device directories not looked at because of [`MAX_DEVICES`].
    pub skipped: usize,
}

/// Finds every device under `devices` that is bound to uio (has a `uio/` directory). Devices not
/// bound to uio are skipped silently; broken ones are returned as errors with an identity (their
/// directory), in one total order.
pub fn discover(devices: &Path, dev_dir: &Path) -> io::Result<UioScan> {
    let mut scan = UioScan::default();
    let mut looked_at = 0usize;
    for entry in std::fs::read_dir(devices)? {
        let dir = entry?.path();
        if !dir.join("uio").is_dir() {
            continue;
        }
        if looked_at == MAX_DEVICES {
            scan.skipped += 1;
            continue;
        }
        looked_at += 1;
        let identity = hvisd_protocol::text::escape_bytes(dir.as_os_str().as_encoded_bytes(), 256);
        scan.offers
            .push(describe(&dir, dev_dir).map_err(|e| (identity, e)));
    }
    // A total order (a comparator that is not one may panic since Rust 1.81): by identity.
    scan.offers.sort_by_cached_key(|entry| match entry {
        Ok(dev) => format!("{}/{}", dev.instance_id, dev.uio_name),
        Err((identity, _)) => identity.clone(),
    });
    Ok(scan)
}

/// Reads one device directory.
pub fn describe(dir: &Path, dev_dir: &Path) -> Result<UioDevice, UioError> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let instance_id: Guid = name
        .parse()
        .map_err(|_| malformed(dir, "a device directory named by its instance GUID", name))?;
    let class_path = dir.join("class_id");
    let class_text = read_small(&class_path)?;
    let class_id = uio_sysfs::parse_class_id(&class_text)
        .map_err(|e| malformed(&class_path, e.0, &class_text))?;

    let channels = dir.join("channels");
    let with_ring: Vec<String> = read_names(&channels)?
        .into_iter()
        .filter(|n| channels.join(n).join("ring").exists())
        .collect();
    let relid = uio_sysfs::primary_relid(with_ring.iter().map(String::as_str))
        .ok_or_else(|| malformed(&channels, "a channels/<relid>/ring entry", ""))?;

    let uio_dir = dir.join("uio");
    let uio_names = read_names(&uio_dir)?;
    let (_, uio_name) = uio_sysfs::uio_device(uio_names.iter().map(String::as_str))
        .ok_or_else(|| malformed(&uio_dir, "a uioN entry", ""))?;
    let uio_name = uio_name.to_owned();

    let size_path = uio_dir.join(&uio_name).join("maps/map0/size");
    let size_text = read_small(&size_path)?;
    let ring_size = uio_sysfs::parse_map0_ring_size(&size_text)
        .map_err(|e| malformed(&size_path, e.0, &size_text))?;
    Ok(UioDevice {
        instance_id,
        class_id,
        relid,
        dev_path: dev_dir.join(&uio_name),
        uio_name,
        ring_size,
    })
}

impl UioDevice {
    /// Opens `/dev/uioN`, maps map 0 and uses the same descriptor as the doorbell.
    pub fn open(&self, label: &str) -> Result<Channel, UioError> {
        let io = |source| UioError::Io {
            path: self.dev_path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&self.dev_path)
            .map_err(io)?;
        let doorbell_fd: OwnedFd = file.try_clone().map_err(io)?.into();
        let doorbell = Doorbell::new(doorbell_fd, DoorbellKind::Uio).map_err(io)?;
        self.open_with(&file, doorbell, label)
    }

    /// Maps the rings from `ring_file` (map 0 at offset 0) and pairs them with `doorbell`. `open`
    /// calls this; tests call it with a regular file and a socket standing in for `/dev/uioN`.
    pub fn open_with(
        &self,
        ring_file: &File,
        doorbell: Doorbell,
        label: &str,
    ) -> Result<Channel, UioError> {
        let ring_err = |source| UioError::Ring {
            dev: self.dev_path.clone(),
            source,
        };
        let map = SharedMapping::map_file(ring_file, 2 * self.ring_size)
            .map_err(|e| ring_err(e.into()))?;
        let rings = RingPair::new(map, self.ring_size, Role::Guest).map_err(ring_err)?;
        rings.set_feature_bits();
        Ok(Channel::new(rings, doorbell, label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT: &str = "57164f39-9115-4e78-ab55-382f3bd5422d";
    const INSTANCE: &str = "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0";

    /// A sysfs tree as the kernel lays it out for one device bound to uio_hv_generic.
    pub(crate) fn fake_device(
        root: &Path,
        instance: &str,
        class: &str,
        map0_size: &str,
    ) -> PathBuf {
        let dev = root.join("devices").join(instance);
        std::fs::create_dir_all(dev.join("channels/14")).unwrap();
        std::fs::create_dir_all(dev.join("channels/27")).unwrap();
        std::fs::write(dev.join("channels/14/ring"), b"").unwrap();
        std::fs::write(dev.join("channels/27/ring"), b"").unwrap();
        std::fs::create_dir_all(dev.join("uio/uio3/maps/map0")).unwrap();
        std::fs::write(
            dev.join("uio/uio3/maps/map0/size"),
            format!("{map0_size}\n"),
        )
        .unwrap();
        std::fs::write(dev.join("uio/uio3/maps/map0/name"), "txrx_rings\n").unwrap();
        std::fs::write(dev.join("class_id"), format!("{{{class}}}\n")).unwrap();
        dev
    }

    #[test]
    fn discovers_a_bound_device_and_skips_unbound_ones() {
        let tmp = tempfile::tempdir().unwrap();
        fake_device(tmp.path(), INSTANCE, HEARTBEAT, "0x8000");
        // A device without uio/ is bound to another driver (hv_utils): not ours.
        let other = tmp
            .path()
            .join("devices/242ff919-07db-4180-9c2e-b86cb68c8c55");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(
            other.join("class_id"),
            "{a9a0f4e7-5a45-4d96-b827-8a841e8c03e6}\n",
        )
        .unwrap();

        let found = discover(&tmp.path().join("devices"), Path::new("/devtest"))
            .unwrap()
            .offers;
        assert_eq!(found.len(), 1);
        let dev = found
            .into_iter()
            .next()
            .unwrap()
            .map_err(|(_, e)| e)
            .unwrap();
        assert_eq!(dev.class_id, HEARTBEAT.parse().unwrap());
        assert_eq!(dev.instance_id, INSTANCE.parse().unwrap());
        assert_eq!(dev.relid, 14);
        assert_eq!(dev.uio_name, "uio3");
        assert_eq!(dev.ring_size, 0x4000);
        assert_eq!(dev.dev_path, Path::new("/devtest/uio3"));
    }

    #[test]
    fn refuses_odd_map_sizes_and_bad_class_ids() {
        let tmp = tempfile::tempdir().unwrap();
        for size in ["0x3000", "0x10", "banana", "0x5000"] {
            let dev = fake_device(tmp.path(), INSTANCE, HEARTBEAT, size);
            let err = describe(&dev, Path::new("/dev")).unwrap_err();
            assert!(matches!(err, UioError::Malformed { .. }), "{size}: {err}");
            std::fs::remove_dir_all(tmp.path().join("devices")).unwrap();
        }
        let dev = fake_device(tmp.path(), INSTANCE, "not-a-guid", "0x8000");
        assert!(matches!(
            describe(&dev, Path::new("/dev")),
            Err(UioError::Malformed { .. })
        ));
    }
}
