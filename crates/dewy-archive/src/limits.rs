//! Limits against oversized archives and decompression bombs.

/// Bounds an extraction. Checked while bytes stream, so a bomb is refused as
/// soon as it crosses a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes unpacked over all entries.
    pub max_total_bytes: u64,
    /// Number of entries.
    pub max_entries: u64,
    /// Bytes of one entry.
    pub max_entry_bytes: u64,
    /// Unpacked bytes per compressed byte of the archive file. Only checked
    /// once more than [`Limits::ratio_floor`] bytes are unpacked, so that tiny
    /// archives of empty files are not refused.
    pub max_ratio: u64,
    /// Unpacked bytes below which the ratio is not checked.
    pub ratio_floor: u64,
}

impl Default for Limits {
    /// 8 GiB in total, 4 GiB per entry, 100,000 entries, and a ratio of 250:1
    /// past the first 64 MiB (ordinary release archives compress 2:1 to
    /// 10:1; text-heavy ones rarely pass 50:1).
    fn default() -> Self {
        Self {
            max_total_bytes: 8 << 30,
            max_entries: 100_000,
            max_entry_bytes: 4 << 30,
            max_ratio: 250,
            ratio_floor: 64 << 20,
        }
    }
}
