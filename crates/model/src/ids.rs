//! Newtype ids and epochs, so that a `PgEpoch` cannot be passed where an `OwnerEpoch` is
//! expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A server running `converge serve`; drawn at random when its data dir is first used.
    NodeId(u64), "node-"
);
id_type!(
    /// A disk given whole to converge; drawn at random when it is formatted.
    DiskId(u64), "disk-"
);
id_type!(
    /// A pool: a replication factor over every disk of the cluster.
    PoolId(u32), "pool-"
);
id_type!(
    /// A placement group's index within its pool.
    PgId(u32), "pg-"
);
id_type!(
    /// A volume; assigned by the cluster state, never reused.
    VolumeId(u64), "vol-"
);
id_type!(
    /// The index of a fixed-size extent within a volume.
    ExtentIndex(u64), "extent-"
);
id_type!(
    /// Increases each time a volume's ownership moves; replicas refuse older ones.
    OwnerEpoch(u64), "owner-epoch-"
);
id_type!(
    /// Increases each time a placement group's replica set changes.
    PgEpoch(u64), "pg-epoch-"
);

/// The identity of a cluster: every disk formatted for it carries this id. Serialised as
/// 32 hex digits, since JSON numbers do not hold 128 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(pub u128);

impl Serialize for ClusterId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        u128::from_str_radix(&text, 16).map(ClusterId).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl OwnerEpoch {
    pub fn next(self) -> Self {
        OwnerEpoch(self.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_serialises_as_hex_text_without_losing_bits() {
        let id = ClusterId(u128::MAX - 1);
        let text = serde_json::to_string(&id).unwrap();
        assert_eq!(text, "\"fffffffffffffffffffffffffffffffe\"");
        assert_eq!(serde_json::from_str::<ClusterId>(&text).unwrap(), id);
    }
}
