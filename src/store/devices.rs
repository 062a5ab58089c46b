//! The device registry: each device's last known position and the geofences it was in, so
//! that events without coordinates can be placed and enter/exit transitions survive restarts.

use rusqlite::{params, Transaction};

use super::{Store, StoreError};

/// A device's last known position and the geofences containing it.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePosition {
    /// The device id.
    pub device: String,
    /// Latitude in degrees (validated before it is stored).
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
    /// Names of the geofences containing the position, sorted.
    pub fences: Vec<String>,
    /// When the position was reported, in ms since the Unix epoch.
    pub updated_ms: u64,
}

impl Store {
    /// Every device in the registry, in device order.
    pub fn device_positions(&self) -> Result<Vec<DevicePosition>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut stmt = conn
            .prepare("SELECT device, lat, lon, fences, updated_ms FROM devices ORDER BY device")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let fences: String = r.get(3)?;
                Ok(DevicePosition {
                    device: r.get(0)?,
                    lat: r.get(1)?,
                    lon: r.get(2)?,
                    fences: serde_json::from_str(&fences).unwrap_or_default(),
                    updated_ms: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

pub(super) fn upsert(tx: &Transaction<'_>, p: &DevicePosition) -> rusqlite::Result<()> {
    let fences = serde_json::to_string(&p.fences).unwrap_or_else(|_| "[]".to_string());
    tx.prepare_cached(
        "INSERT INTO devices (device, lat, lon, fences, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(device) DO UPDATE SET lat = ?2, lon = ?3, fences = ?4, updated_ms = ?5",
    )?
    .execute(params![p.device, p.lat, p.lon, fences, p.updated_ms as i64])?;
    Ok(())
}
