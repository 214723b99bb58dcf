//! CNI specification versions this plugin speaks.
//!
//! Results are encoded for the version the network configuration asks for
//! (SPEC.md "Version considerations"); 0.1.0/0.2.0 are not supported because
//! their result shape (`ip4`/`ip6` objects) cannot carry interface indices that
//! chained plugins such as `tuning` rely on.

use std::fmt;

/// A supported CNI spec version. Ordered so commands can compare
/// (`GC` needs at least 1.1.0, `CHECK` at least 0.4.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// 0.3.x/0.4.0 results carry `"version": "4"` in every IP entry; 1.0.0 dropped it.
    pub fn ip_entries_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// Interface `mtu` in results was added in 1.1.0.
    pub fn interfaces_carry_mtu(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Comma-separated list for error messages.
    pub fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_orders() {
        for v in CniVersion::ALL {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
        assert!(CniVersion::V0_3_1 < CniVersion::V0_4_0);
        assert!(CniVersion::V1_0_0 < CniVersion::V1_1_0);
        assert_eq!(CniVersion::parse("0.2.0"), None);
        assert_eq!(CniVersion::parse("1.1"), None);
    }
}
